"""One mesh, logical axis rules, and the shardings they give.

Mesh axes (always all three, size 1 where unused):
  data    pure data parallelism: batch split, params replicated
  fsdp    batch split AND params split (ZeRO-3 style; gathered per layer)
  tensor  Megatron-style split of heads, mlp and vocab

Parameters are created with logical axis names (models/llama.py):
  vocab, table_embed, embed, q_heads, kv_heads, head_dim, mlp
and, for a vision tower (models/siglip.py, idefics3.py), vision_patch,
vision_positions, vision_shuffled;
activations use act_batch, act_len, act_embed, act_heads, logits_batch,
act_vocab, and the KV cache cache_layers, cache_batch, cache_len,
cache_heads, cache_head_dim.
A rule list maps each logical name to mesh axes (or None: replicated). It is
data in the config, e.g. `config.mesh.rules`; `DEFAULT_RULES` is below.

A logical axis whose size is not divisible by the mesh axes it maps to is
replicated instead (e.g. SmolLM2's 3 kv heads on tensor=2); the choice is
made per array, so it is visible in `describe`.

The vocabulary is vocab-parallel: the embedding table [V, D] (and an untied
lm_head [D, V]) is split on V over (fsdp, tensor) and whole on D (its
hidden dim is `table_embed`, not `embed`, so the layers' weights keep embed
on fsdp). A layer's weights are small and gathered one layer at a time; the
table is not (Qwen2.5-1.5B: 151936 x 1536 f32 = 0.9 GB, tied), and split
on D over fsdp it was all-gathered whole on every device for the lookup
and the logits, its gradient all-reduced whole. Split on V it never moves:
the lookup (`Llama.embed_tokens`) is a masked local gather whose result,
the [B, T, D] rows of the device's data shard, is all-reduced over the V
shards and sliced to the device's rows (XLA's gather partitioning; the
backward pass gathers the rows' gradients the same way and scatters into
the local shard); the logits (`Llama.logits`) are computed against the
local rows, split [rows over data, V over (fsdp, tensor)] (`logits_batch`,
`act_vocab`): the hidden states, not the table, are gathered across
fsdp, and the log-softmax reduces over the split V with all-reduces of
per-row scalars (scoring.py). With fsdp = tensor = 1 nothing changes.
The HLO check is tests/test_sharding.py; the figures, `tools/aot.py`.

The K candidate axis is never sharded: a prompt's K candidates live on
the device of the prompt (its B index follows act_batch / cache_batch), so
the prompt's keys and values, computed once, are read by its candidates
without moving between devices. How the train step, sampler and scorer are
jitted with these shardings (optimizer state, donation, batches): sharded.py.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    # parameters
    ("vocab", ("fsdp", "tensor")),
    ("table_embed", None),  # D of the embedding table and lm_head
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    # vision tower (siglip.py, idefics3.py): its layers use the names above
    ("vision_patch", None),  # C * P * P values of one patch
    ("vision_positions", None),  # rows of the learned position table
    ("vision_shuffled", "tensor"),  # the connector's input, D * scale^2
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("logits_batch", "data"),  # rows of the logits (V takes fsdp, tensor)
    ("act_vocab", ("fsdp", "tensor")),
    # KV cache
    ("cache_layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_len", None),
    ("cache_heads", "tensor"),
    ("cache_head_dim", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one entry of `shape` may be -1 (inferred).

  Raises:
    ValueError naming the shape when it does not match the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != 3:
    raise ValueError(f"mesh shape {tuple(shape)} must have 3 entries "
                     f"{MESH_AXES}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide "
                       f"{len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} "
                     f"devices, found {len(devices)}")
  grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_cfg, devices: Sequence | None = None) -> Mesh:
  """`make_mesh` from the config's `mesh` block (data, fsdp, tensor).

  On one process, explicit sizes (no -1) that need fewer devices than there
  are take the first ones (e.g. mesh 1 x 1 x 1 on an 8-GPU machine); with
  several processes the mesh must cover every device.
  """
  shape = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
  devices = list(jax.devices() if devices is None else devices)
  if (-1 not in shape and jax.process_count() == 1
      and 0 < math.prod(shape) < len(devices)):
    devices = devices[:math.prod(shape)]
  return make_mesh(shape, devices)


def _axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
         shape: Sequence[int] | None = None) -> P:
  """PartitionSpec of an array with logical axis `names`.

  With `mesh` and `shape`, a dimension not divisible by its mesh axes is
  replicated. A mesh axis is used at most once per array (first come).
  """
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    if name is not None and name not in table:
      raise KeyError(f"logical axis {name!r} has no rule (rules: "
                     f"{sorted(table)})")
    axes = tuple(a for a in _axes(table.get(name)) if a not in used)
    if mesh is not None and axes:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes:
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[i] % size:
          axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def logical_axes(model_or_abstract) -> dict:
  """Pure-dict tree of each parameter's logical axis names."""
  state = nnx.state(model_or_abstract, nnx.Param)
  out: dict = {}
  for path, var in state.flat_state():
    names = var.get_metadata().get("out_sharding")
    if names is None:
      raise ValueError(f"parameter {'/'.join(map(str, path))} has no logical "
                       "axis names")
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = tuple(names)
  return out


def param_shardings(cfg, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
  """NamedShardings for `Llama(cfg)`'s params (pure-dict layout), or
  `Idefics3(cfg)`'s for an `Idefics3Config`, `Qwen2VL(cfg)`'s for a
  `Qwen2VLConfig`."""
  from purld_jax.models import idefics3
  from purld_jax.models import llama
  from purld_jax.models import qwen2_vl
  if isinstance(cfg, qwen2_vl.Qwen2VLConfig):
    from purld_jax.models import qwen2_vl_hf
    abstract = nnx.eval_shape(lambda: qwen2_vl.Qwen2VL(cfg,
                                                       rngs=nnx.Rngs(0)))
    _, shapes = qwen2_vl_hf.abstract_model(cfg)
  elif isinstance(cfg, idefics3.Idefics3Config):
    from purld_jax.models import idefics3_hf
    abstract = nnx.eval_shape(lambda: idefics3.Idefics3(cfg,
                                                        rngs=nnx.Rngs(0)))
    _, shapes = idefics3_hf.abstract_model(cfg)
  else:
    abstract = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
    _, shapes = llama.abstract_model(cfg)
  names = logical_axes(abstract)
  return jax.tree.map(
      lambda n, s: NamedSharding(mesh, spec(n, rules, mesh, s.shape)),
      names, shapes, is_leaf=lambda x: isinstance(x, tuple))


def named(mesh: Mesh, names: Sequence[str | None], rules: Rules = DEFAULT_RULES,
          shape: Sequence[int] | None = None) -> NamedSharding:
  """NamedSharding of one array with logical axis `names`."""
  return NamedSharding(mesh, spec(names, rules, mesh, shape))


def cache_sharding(mesh: Mesh, cache, rules: Rules = DEFAULT_RULES):
  """Shardings of a `structs.KVCache` (a pytree of the same structure)."""
  kv = ("cache_layers", "cache_batch", "cache_len", "cache_heads",
        "cache_head_dim")
  return type(cache)(
      k=named(mesh, kv, rules, cache.k.shape),
      v=named(mesh, kv, rules, cache.v.shape),
      mask=named(mesh, ("cache_batch", "cache_len"), rules, cache.mask.shape),
      end=NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------
# Activation constraints inside the model

_ACTIVE: list[tuple[Mesh, Rules]] = []


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Within this context `constrain` pins activations to the mesh."""
  _ACTIVE.append((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.pop()


def constrain(x: jax.Array, names: Iterable[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names; a no-op outside use_rules."""
  if not _ACTIVE:
    return x
  mesh, rules = _ACTIVE[-1]
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, spec(tuple(names), rules, mesh, x.shape)))


def describe(shardings: dict) -> str:
  """One line per parameter: path and PartitionSpec (for logs)."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return "\n".join(f"{jax.tree_util.keystr(k)}: {v.spec}" for k, v in flat)
