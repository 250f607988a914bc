r"""Per-device memory of the train step and the sampler, from the config.

  python -m purld_jax.tools.memory --config=configs/h100_qwen25_0p5b.py
  python -m purld_jax.tools.memory --config=configs/llama31_8b_v5p64.py --devices=32
  python -m purld_jax.tools.memory --config=configs/demo.py:tiny --config.model.remat=full

The estimate is arithmetic on the architecture (`config.json` only), the
mesh sizes, the rules (`sharding.DEFAULT_RULES`: a dimension that does not
divide its mesh axes counts whole) and the dtypes:

  params, gradients   one copy each in param_dtype, split as the rules say
  optimizer           Adam's mu and nu (param_dtype, split like params;
                      mu in bf16 with opt.mu_dtype = bfloat16),
                      + a gradient accumulator when opt.grad_accum > 1
  reference params    DPO and LDL steps take the frozen reference as input
                      (in bf16 with rl.reference_dtype = bfloat16)
  activations         what the backward pass keeps, per layer and token, in
                      the compute dtype c (heads and F split over tensor):
                        none  c (4 D + 2 N H + 2 G H + 3 F) + (4 + c) N S
                              (S: the attention context of the token)
                        dots  c (3 D + N H + 2 G H + 2 F), attention redone
                        full  c D (the layer input), one layer redone at a
                              time: + that layer's `none` share
                      rows split over data x fsdp
  logits              one vocabulary chunk of scoring (at most 2^27 f32
                      values over all rows), twice (logits, softmax),
                      split on rows by logits_batch and on V by act_vocab
                      (vocab-parallel: the table is never gathered, so
                      the estimate counts it split like the params)
  LoRA                with `model.lora.rank` > 0 (models/lora.py) the
                      trained params are the adapters A [in, r], B [r, out]
                      alone: params, gradients, Adam's moments (and the
                      accumulator) are the adapters'; the frozen base is
                      held once (an argument, not donated, not returned);
                      the reference of DPO / LDL is that base with zero
                      adapters, so it costs one adapter-sized tree; the
                      activations are counted as a full fine-tune's (the
                      rank-r x A kept per target, c r a token, is left out)
  vision-language     (Idefics3 / SmolVLM, Qwen2.5-VL) the vision tower and
                      connector are trained with the decoder: their params
                      count in params, gradients, optimizer and reference;
                      activations, logits and the KV cache are the
                      decoder's; the tower's own activations (run once per
                      prompt) are left out
  KV cache            sampling B prompts x K candidates: ours keeps the
                      prompt once (B x P) + each row's own T slots (in
                      chunks of 32); the naive layout B K x (P + T) is
                      printed next to it

With as many devices as the mesh needs (`--devices=N` fakes N CPU devices),
the train step is also compiled (`tools/aot.py`) and XLA's
`memory_analysis()` printed beside the estimate: arguments (params,
optimizer, reference, batch), temporaries (gradients, activations, logits)
and outputs, with the donated state aliased. CPU reports these figures;
its temporaries follow XLA:CPU's buffer assignment, not a GPU's or TPU's.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from absl import app
from absl import flags
from jax.sharding import AbstractMesh
from ml_collections import config_flags

from purld_jax import sharding
from purld_jax.models import layer_stack
from purld_jax.models import llama
from purld_jax.models import lora
from purld_jax.tools import aot

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs: `main --dry_run`
  imports this module beside main's own --config)."""
  config_flags.DEFINE_config_file("config", None, "a configs/*.py file",
                                  lock_config=True)
  flags.DEFINE_integer("devices", 0, "fake this many CPU devices (0: the "
                       "real ones); needed to compile for a slice's mesh")
  flags.DEFINE_bool("compile", True, "compile the step when the devices fit "
                    "the mesh, and print memory_analysis() beside the "
                    "estimate")

_AUTO_CHUNK = 1 << 27  # scoring._AUTO_CHUNK_ELEMENTS
_OWN_CHUNK = 32  # prefix_cache.CHUNK


def abstract_mesh(mesh_cfg, n_devices: int) -> AbstractMesh:
  """The config's (data, fsdp, tensor) sizes, -1 inferred from n_devices."""
  sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
  if -1 in sizes:
    sizes[sizes.index(-1)] = n_devices // math.prod(s for s in sizes if s > 0)
  return AbstractMesh(tuple(sizes), sharding.MESH_AXES)


def _pieces(mesh, spec) -> int:
  """How many pieces a PartitionSpec cuts an array into on `mesh`."""
  axes = lambda e: () if e is None else (e,) if isinstance(e, str) else e
  return math.prod(mesh.shape[a] for e in spec for a in axes(e))


def _split(mesh, names, size: int, rules) -> int:
  """How many pieces a dimension of `size` named `names` is cut into."""
  return _pieces(mesh, sharding.spec(names, rules, mesh, (size,)))


def _decoder(cfg) -> llama.LlamaConfig:
  """The decoder's config: `cfg` itself, or a vision-language model's
  `cfg.text`."""
  return getattr(cfg, "text", cfg)


@functools.lru_cache(maxsize=8)
def _shapes(cfg) -> dict:
  """The model's param shapes (pure dict): a text or vision-language
  config (configs are frozen dataclasses: traced once each, not once per
  figure; a few seconds for a 3B model)."""
  if _decoder(cfg) is cfg:
    return llama.abstract_model(cfg)[1]
  from purld_jax.train import student  # pylint: disable=g-import-not-at-top
  return student.vlm_hf(cfg).abstract_model(cfg)[1]


def num_params(cfg) -> int:
  """The model's params without LoRA adapters (a vision-language model's
  tower and connector included)."""
  _, base = lora.split(_shapes(cfg))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(base))


def part_bytes(cfg: llama.LlamaConfig, mesh, rules=sharding.DEFAULT_RULES
               ) -> tuple[int, int]:
  """(adapters, base): bytes of one device's share of the LoRA adapters
  (0 without `cfg.lora`) and of every other param."""
  p_sh = sharding.param_shardings(cfg, mesh, rules)
  shapes = _shapes(cfg)
  size = jnp.dtype(_decoder(cfg).param_dtype).itemsize
  per_leaf = jax.tree.map(
      lambda x, sh: math.prod(x.shape) * size // _pieces(mesh, sh.spec),
      shapes, p_sh)
  adapters, base = lora.split(per_leaf)
  return sum(jax.tree.leaves(adapters)), sum(jax.tree.leaves(base))


def param_bytes(cfg: llama.LlamaConfig, mesh, rules=sharding.DEFAULT_RULES
                ) -> int:
  """Bytes of one device's share of the params (with LoRA: base and
  adapters)."""
  return sum(part_bytes(cfg, mesh, rules))


def activation_bytes(cfg: llama.LlamaConfig, mesh, *, tokens: int,
                     attended: int, remat: str,
                     rules=sharding.DEFAULT_RULES) -> int:
  """Bytes the backward pass keeps on one device (module docstring).

  Args:
    tokens: tokens in the policy's forward, all rows.
    attended: sum over those tokens of their attention context.
    remat: none | full | dots.
  """
  layer_stack.remat_policy(remat)  # raises on an unknown name
  c = jnp.dtype(cfg.dtype).itemsize
  dp = _split(mesh, ("act_batch",), tokens, rules)
  d, h = cfg.hidden_size, cfg.head_dim
  n = cfg.num_heads // _split(mesh, ("act_heads",), cfg.num_heads, rules)
  g = cfg.num_kv_heads // _split(mesh, ("cache_heads",), cfg.num_kv_heads,
                                 rules)
  f = cfg.intermediate_size // _split(mesh, ("mlp",), cfg.intermediate_size,
                                      rules)
  per_tok = {"none": c * (4 * d + 2 * n * h + 2 * g * h + 3 * f),
             "dots": c * (3 * d + n * h + 2 * g * h + 2 * f),
             "full": c * d}[remat]
  probs = (4 + c) * n * attended  # attention logits f32 + probs, per layer
  layer = per_tok * tokens + (probs if remat == "none" else 0)
  redo = 0 if remat == "none" else (c * (4 * d + 2 * n * h + 2 * g * h + 3 * f)
                                    * tokens + probs)
  return (cfg.num_layers * layer + redo) // dp


def estimate(cfg: llama.LlamaConfig, mesh, s: aot.Shapes, *,
             grad_accum: int = 1, micro_batches: int = 1,
             mu_dtype: str = "float32", reference_dtype: str = "float32",
             rules=sharding.DEFAULT_RULES) -> dict:
  """Bytes per device by item (module docstring); `s` from `aot.shapes`.

  `micro_batches` n (`opt.micro_batches`): activations and logits are those
  of one slice of b / n prompts, plus a gradient accumulator. With
  `cfg.lora`, `params` are the adapters (what is trained) and `frozen` the
  base (module docstring). `mu_dtype`, `reference_dtype` (opt.mu_dtype,
  rl.reference_dtype): "bfloat16" counts Adam's mu, the reference, at 2
  bytes a parameter."""
  adapters, base = part_bytes(cfg, mesh, rules)
  total = num_params(cfg)
  cfg = _decoder(cfg)  # from here on, the decoder's shapes
  # What is trained (gradients, Adam's moments) and what is held frozen.
  params, frozen = (adapters, base) if cfg.lora else (adapters + base, 0)
  bf16 = params * 2 // jnp.dtype(cfg.param_dtype).itemsize
  mu = bf16 if mu_dtype == "bfloat16" else params
  ref = bf16 if reference_dtype == "bfloat16" else params
  b = s.b // micro_batches  # prompts alive at a time
  if s.recipe == "sft":
    tokens, attended = b * (s.p + s.t), b * (s.p + s.t) ** 2
  else:
    tokens = b * (s.p + s.u * s.t)
    attended = b * (s.p * s.p + s.u * s.t * (s.p + s.t))
  dp_all = _split(mesh, ("act_batch",), s.b, rules)
  # Logits are vocab-parallel: rows split by logits_batch, V by act_vocab.
  logit_pieces = _pieces(mesh, sharding.spec(
      ("logits_batch", "act_vocab"), rules, mesh, (b, cfg.vocab_size)))
  c = jnp.dtype(cfg.dtype).itemsize
  cache_heads = cfg.num_kv_heads // _split(mesh, ("cache_heads",),
                                           cfg.num_kv_heads, rules)
  kv = 2 * cfg.num_layers * cache_heads * cfg.head_dim * c
  own_t = -(-max(s.t - 1, 1) // _OWN_CHUNK) * _OWN_CHUNK
  outside = cfg.vocab_size * cfg.hidden_size * (
      1 if cfg.tie_word_embeddings else 2) + cfg.hidden_size
  in_layers = cfg.num_params() - outside  # decoder layers (no adapters)
  # scan_layers: the layers' weights stacked per call (the frozen ones
  # too), and the trained ones' gradient stacked before it is split back
  # per layer (the adapters all live in the layers).
  stacked = (2 * params * in_layers // total if not cfg.lora
             else base * in_layers // total + 2 * adapters)
  out = dict(
      params=params,
      frozen=frozen,
      optimizer=mu + params * (1 + (grad_accum > 1)),
      # LoRA: the reference is the frozen base with zero adapters.
      reference=ref if s.recipe in ("dpo", "ldl") else 0,
      gradients=params * (1 + (micro_batches > 1)),
      stacked_layers=stacked if cfg.scan_layers else 0,
      activations=activation_bytes(cfg, mesh, tokens=tokens,
                                   attended=attended, remat=cfg.remat,
                                   rules=rules),
      logits=2 * 4 * min(tokens * cfg.vocab_size, _AUTO_CHUNK) // logit_pieces,
      # The sampler runs the whole batch (micro-batches are the step's).
      kv_cache=kv * (s.b * s.p + s.b * s.k * own_t) // dp_all,
      kv_cache_naive=kv * s.b * s.k * (s.p + s.t) // dp_all)
  for policy in layer_stack.REMAT_POLICIES:
    out[f"activations_{policy}"] = activation_bytes(
        cfg, mesh, tokens=tokens, attended=attended, remat=policy,
        rules=rules)
  return out


def estimate_from_config(config, cfg, mesh) -> dict:
  """`estimate` for the config's batch shapes and dtypes, with a title; `cfg`
  a text or a vision-language architecture."""
  est = estimate(cfg, mesh, aot.shapes(config),
                 grad_accum=config.opt.grad_accum,
                 micro_batches=config.opt.get("micro_batches", 1),
                 mu_dtype=config.opt.get("mu_dtype", "float32"),
                 reference_dtype=config.rl.get("reference_dtype", "float32"))
  text = _decoder(cfg)
  tower = (num_params(cfg) - text.num_params()) / 1e6
  vision = ("" if text is cfg
            else f" ({tower:.1f} M in the vision tower and connector)")
  est["_title"] = (f"{aot.shapes(config)}; mesh {dict(mesh.shape)}; params "
                   f"{jnp.dtype(text.param_dtype).name}, compute "
                   f"{jnp.dtype(text.dtype).name}, remat {text.remat}, "
                   f"scan_layers {text.scan_layers}; "
                   f"{num_params(cfg) / 1e6:.1f} M params" + vision
                   + lora_title(text))
  return est


def lora_title(cfg: llama.LlamaConfig) -> str:
  """'; LoRA r 8 on 7 targets: 1.2 M trained' ('' without LoRA)."""
  if getattr(cfg, "lora", None) is None:
    return ""
  adapters, _ = lora.split(llama.abstract_model(cfg)[1])
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
  return (f"; LoRA r {cfg.lora.rank} on {len(cfg.lora.targets)} targets: "
          f"{n / 1e6:.3f} M trained, the base frozen")


def _mib(x) -> str:
  return f"{'-':>10s}" if x is None else f"{x / 2**20:10.1f}"


def table(est: dict, compiled_stats=None) -> str:
  """The estimate (MiB per device), with XLA's figures when given."""
  m = compiled_stats
  get = lambda name: None if m is None else getattr(m, name, None)
  frozen = est.get("frozen", 0)
  args = est["params"] + frozen + est["optimizer"] + est["reference"]
  temp = (est["gradients"] + est["activations"] + est["logits"]
          + est["stacked_layers"])
  rows = [("params", est["params"], None)] if not frozen else [
      ("params trained (LoRA adapters)", est["params"], None),
      ("frozen base (held once, not donated)", frozen, None)]
  rows += [
      ("optimizer state", est["optimizer"], None),
      ("reference params", est["reference"], None),
      ("= arguments (without the batch)", args,
       get("argument_size_in_bytes")),
      ("gradients", est["gradients"], None),
      ("activations kept for backward", est["activations"], None),
      ("logits chunk", est["logits"], None),
      ("stacked layer weights + grads (scan)", est["stacked_layers"], None),
      ("= temporaries", temp, get("temp_size_in_bytes")),
      ("outputs (new state; donated)", args - est["reference"] - frozen,
       get("output_size_in_bytes")),
      ("aliased (donated state reused)", args - est["reference"] - frozen,
       get("alias_size_in_bytes")),
      ("= train step peak", args + temp,
       None if m is None else m.argument_size_in_bytes + m.temp_size_in_bytes
       + m.output_size_in_bytes - m.alias_size_in_bytes),
  ]
  rows += [(f"activations if remat={p}", est[f"activations_{p}"], None)
           for p in layer_stack.REMAT_POLICIES]
  rows += [("sampling KV cache (prompt once)", est["kv_cache"], None),
           ("sampling KV cache (naive BK x (P+T))", est["kv_cache_naive"],
            None)]
  lines = [f"per device, MiB  ({est.get('_title', '')})",
           f"  {'item':40s} {'estimate':>10s} {'compiled':>10s}"]
  lines += [f"  {name:40s} {_mib(e)} {_mib(c)}" for name, e, c in rows]
  if m is None:
    lines.append("  (compiled: not compiled here; give --devices=N equal to "
                 "the mesh size)")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  config = FLAGS.config
  if FLAGS.devices:
    aot.fake_devices(FLAGS.devices)
  from purld_jax.train import student as student_lib  # pylint: disable=g-import-not-at-top
  cfg = student_lib.config_architecture(config.model)
  n = jax.device_count()
  mesh = abstract_mesh(config.mesh, n)
  stats = None
  if FLAGS.compile and math.prod(mesh.shape.values()) == n:
    real = sharding.mesh_from_config(config.mesh)
    compiled, seconds, _, _ = aot.compile_train_step(config, real)
    stats = compiled.memory_analysis()
    print(f"compiled the train step on {n} {jax.devices()[0].platform} "
          f"devices in {seconds:.1f} s")
  print(table(estimate_from_config(config, cfg, mesh), stats))


if __name__ == "__main__":
  define_flags()
  app.run(main)
