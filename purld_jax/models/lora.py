"""LoRA adapters on the decoder's projections (flax NNX's own `nnx.LoRA`).

  spec = lora.LoraSpec(rank=8, alpha=16.0)          # targets: all seven
  cfg = cfg.replace(lora=spec)     # `Llama(cfg)` holds one nnx.LoRA per target
  adapters, base = lora.split(params)       # pure dicts: LoRAParam | the rest
  params = lora.join(adapters, base)
  merged = lora.fold(params, cfg)           # base layout, W + s A B folded in
  lora.write_peft(adapters, cfg, out_dir, base_model_name_or_path=...)

A target projection W (q_proj [D, N, H], k/v_proj [D, G, H], o_proj
[N, H, D], gate/up_proj [D, F], down_proj [F, D]) gets an `nnx.LoRA` named
`<target>_lora` beside it with A [in, r] and B [r, out] (in, out: W's input
and output axes flattened, e.g. q_proj in = D, out = N * H), and the
projection's output becomes

  y = x W + s (x A) B,    s = alpha / r,

B starting at zero, so the adapted model equals its base at the start. A
and B carry logical axes (`sharding_names`) so they shard like their base
weight: A (W's input axis, None), B (None, W's leading output axis; a
flattened [N * H] split in t blocks is N split on t with H whole).

Why nnx.LoRA and not qwix: qwix adds LoRA by intercepting the model's ops
(model surgery on a traced module) and is not installed here; `nnx.LoRA`
ships with the pinned flax, and its variables are `nnx.LoRAParam`, so
`nnx.split(model, nnx.LoRAParam, ...)` (here `split` on the pure dict)
separates the adapters from the frozen base: the optimizer, its state,
gradients and checkpoints see the adapters alone.

Dropout on the adapter input is not offered: the model's call is pure and
takes no rng (configs refuse `model.lora.dropout > 0`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTN + MLP
SUFFIX = "_lora"
LEAVES = ("lora_a", "lora_b")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Adapters of a `LlamaConfig` (its `lora` field).

  Attributes:
    rank: r > 0.
    alpha: the delta is scaled by alpha / r.
    targets: projections adapted, a subset of TARGETS.
  """

  rank: int
  alpha: float = 16.0
  targets: tuple[str, ...] = TARGETS

  @property
  def scale(self) -> float:
    return float(self.alpha) / self.rank


def spec_from_config(lora_cfg) -> LoraSpec | None:
  """The LoraSpec of a config's `model.lora` block; None when rank is 0."""
  if lora_cfg is None or not lora_cfg.rank:
    return None
  return LoraSpec(rank=int(lora_cfg.rank), alpha=float(lora_cfg.alpha),
                  targets=tuple(lora_cfg.targets))


def base_config(cfg):
  """`cfg` without adapters (the architecture an HF directory holds)."""
  return cfg if cfg.lora is None else cfg.replace(lora=None)


def _geometry(cfg, target: str):
  """(in features, out features, A's logical axes, B's logical axes)."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  nh, gh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {
      "q_proj": (d, nh, ("embed", None), (None, "q_heads")),
      "k_proj": (d, gh, ("embed", None), (None, "kv_heads")),
      "v_proj": (d, gh, ("embed", None), (None, "kv_heads")),
      "o_proj": (nh, d, ("q_heads", None), (None, "embed")),
      "gate_proj": (d, f, ("embed", None), (None, "mlp")),
      "up_proj": (d, f, ("embed", None), (None, "mlp")),
      "down_proj": (f, d, ("mlp", None), (None, "embed")),
  }[target]


def attach(module: nnx.Module, cfg, names, rngs: nnx.Rngs) -> None:
  """Sets `module.<name>_lora = nnx.LoRA(...)` for each of `names` that
  `cfg.lora` targets (nothing without `cfg.lora`). B starts at zero."""
  if cfg.lora is None:
    return
  for name in names:
    if name not in cfg.lora.targets:
      continue
    fan_in, fan_out, a_axes, b_axes = _geometry(cfg, name)
    with nnx.use_eager_sharding(False):
      setattr(module, name + SUFFIX, nnx.LoRA(
          fan_in, cfg.lora.rank, fan_out, dtype=cfg.dtype,
          param_dtype=cfg.param_dtype, rngs=rngs,
          a_metadata={"sharding_names": a_axes},
          b_metadata={"sharding_names": b_axes}))


def add(module: nnx.Module, name: str, x_BTI: jax.Array, y: jax.Array
        ) -> jax.Array:
  """y + s (x A) B reshaped to y's shape, or y when `name` has no adapter.

  Args:
    module: the Attention or MLP holding `<name>_lora`.
    name: the projection (e.g. "q_proj").
    x_BTI: the projection's input [B, T, in] (o_proj: [B, T, N * H]).
    y: its output, e.g. [B, T, N, H] for q_proj, [B, T, D] for o_proj.
  """
  adapter = getattr(module, name + SUFFIX, None)
  if adapter is None:
    return y
  delta = adapter(x_BTI) * jnp.asarray(module.cfg.lora.scale, y.dtype)
  return y + delta.reshape(y.shape).astype(y.dtype)


# ----------------------------------------------------------------------------
# Param trees (NNX pure-dict layout)


def _pick(tree: dict, keep_adapters: bool) -> dict:
  out = {}
  for key, value in tree.items():
    if str(key).endswith(SUFFIX):
      if keep_adapters:
        out[key] = value
    elif isinstance(value, dict):
      sub = _pick(value, keep_adapters)
      if sub or not keep_adapters:
        out[key] = sub
    elif not keep_adapters:
      out[key] = value
  return out


def split(tree: dict) -> tuple[dict, dict]:
  """(adapters, base) of a pure-dict tree (params, shapes or shardings):
  the `<target>_lora` subtrees and the rest, both nested like `tree`. The
  same partition as `nnx.split(model, nnx.LoRAParam, ...)`."""
  return _pick(tree, True), _pick(tree, False)


def join(adapters: dict | None, base: dict) -> dict:
  """The union of two disjoint nested dicts (`split`'s inverse). Leaves are
  not copied: the result holds the very arrays of `base`."""
  if not adapters:
    return base
  out = dict(base)
  for key, value in adapters.items():
    if key in out and isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = join(value, out[key])
    else:
      out[key] = value
  return out


def init_adapters(cfg, seed: int) -> dict:
  """Host-side (numpy) initial adapters of `Llama(cfg)`, a pure dict: A
  ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default: kaiming_uniform, a =
  sqrt(5)), B = 0."""
  from purld_jax.models import llama  # pylint: disable=g-import-not-at-top
  adapters, _ = split(llama.abstract_model(cfg)[1])
  rng = np.random.default_rng(seed)

  def init(path, s):
    if getattr(path[-1], "key", None) == "lora_b":
      return jnp.zeros(s.shape, s.dtype)
    bound = 1.0 / np.sqrt(s.shape[0])
    return jnp.asarray(rng.uniform(-bound, bound, s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(init, adapters)


def _targets(cfg):
  """(layer, "attn" | "mlp", target) of every adapter, in layer order."""
  for i in range(cfg.num_layers):
    for name in cfg.lora.targets:
      yield i, ("attn" if name in ATTN else "mlp"), name


def fold(params: dict, cfg) -> dict:
  """The base params (no adapter leaves) with each adapted weight
  W' = W + s (A B).reshape(W.shape), computed in float32 and stored in W's
  dtype. Host or device arrays; a tree without `cfg.lora` is returned as is.

  Args:
    params: the full pure dict of `Llama(cfg)` (adapters and base).
    cfg: its LlamaConfig.
  """
  if cfg.lora is None:
    return params
  adapters, base = split(params)
  base = jax.tree.map(lambda x: x, base)  # fresh dicts, the same leaves
  s = cfg.lora.scale
  for i, block, name in _targets(cfg):
    ad = adapters["layers"][i][block][name + SUFFIX]
    w = base["layers"][i][block][name]
    a = jnp.asarray(ad["lora_a"], jnp.float32)
    b = jnp.asarray(ad["lora_b"], jnp.float32)
    delta = (s * (a @ b)).reshape(w.shape)
    base["layers"][i][block][name] = (
        jnp.asarray(w, jnp.float32) + delta).astype(w.dtype)
  return base


# ----------------------------------------------------------------------------
# PEFT adapter directory


def peft_tensors(adapters: dict, cfg, *, dtype=None) -> dict[str, np.ndarray]:
  """PEFT's tensors of `adapters`: `base_model.model.model.layers.{i}.
  self_attn.q_proj.lora_A.weight` [r, in] = A^T and `...lora_B.weight`
  [out, r] = B^T, in/out in Hugging Face's flattening of the projection
  (q_proj out = N * H, head-major, as models/hf.py's key table)."""
  out = {}
  for i, block, name in _targets(cfg):
    ad = adapters["layers"][i][block][name + SUFFIX]
    hf_block = "self_attn" if block == "attn" else "mlp"
    key = f"base_model.model.model.layers.{i}.{hf_block}.{name}"
    for leaf, hf_leaf in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
      arr = np.asarray(jax.device_get(ad[leaf]))
      arr = arr.astype(dtype) if dtype is not None else arr
      out[f"{key}.{hf_leaf}.weight"] = np.ascontiguousarray(arr.T)
  return out


def peft_config(cfg, base_model_name_or_path: str) -> dict[str, Any]:
  """The adapter_config.json of `cfg.lora` (task CAUSAL_LM, no bias, no
  dropout: the forward is pure)."""
  spec = cfg.lora
  return dict(peft_type="LORA", task_type="CAUSAL_LM", r=spec.rank,
              lora_alpha=spec.alpha, lora_dropout=0.0,
              target_modules=sorted(spec.targets), bias="none",
              fan_in_fan_out=False, use_rslora=False, inference_mode=True,
              modules_to_save=None,
              base_model_name_or_path=base_model_name_or_path)


def write_peft(adapters: dict, cfg, out: str | os.PathLike, *,
               base_model_name_or_path: str, dtype=None) -> None:
  """Writes a PEFT adapter directory: adapter_config.json and
  adapter_model.safetensors (`peft.PeftModel.from_pretrained(base, out)`
  loads it onto the transformers model of the base directory)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  save_file(peft_tensors(adapters, cfg, dtype=dtype),
            os.path.join(out, PEFT_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(out, PEFT_CONFIG), "w", encoding="utf-8") as f:
    json.dump(peft_config(cfg, base_model_name_or_path), f, indent=2)
    f.write("\n")
