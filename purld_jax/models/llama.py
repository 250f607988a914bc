"""One Flax NNX decoder for Llama 2/3.x, SmolLM2, Qwen2/2.5 and Qwen3.

Axis letters (see structs.py): B batch, T tokens of this call, S cache slots,
L layers, V vocab, D width, N query heads, G kv heads, H head dim, F mlp,
R = N // G query heads per kv head.

The families differ only in switches of `LlamaConfig`:
  Llama 2/3.x, SmolLM2  no biases, rope scaling "llama3" for 3.1+
  Qwen2 / 2.5           q/k/v biases (`qkv_bias`)
  Qwen3                 RMSNorm on q and k per head (`qk_norm`)

Three entry points share one `_forward`:
  `model(tokens, positions, attention_mask)` -> logits f32[B, T, V]
  `model.hidden(...)`                        -> final-norm hidden [B, T, D]
  `model.extend(tokens, cache, ...)`         -> (logits, cache): writes T
    tokens into the cache at `cache.end`; prefill (empty cache, T = P) and
    decode (T = 1) are both this call.

Every parameter carries logical axis names (`sharding_names` metadata):
weights use vocab, table_embed (D of the embedding table and lm_head),
embed, q_heads, kv_heads, head_dim, mlp. `LlamaConfig.lora` adds LoRA
adapters (`nnx.LoRAParam`) beside the projections: models/lora.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from purld_jax import sharding
from purld_jax import structs
from purld_jax.models import lora

_NEG_INF = -1e30  # finite, so fully masked rows (pads) stay NaN-free
_ACT = ("act_batch", "act_len", "act_embed")
_ACT_HEADS = ("act_batch", "act_len", "act_heads", None)
_TABLE = ("vocab", "table_embed")  # the embedding table [V, D]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a decoder. `from_hf` builds it from a config.json."""

  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # G
  head_dim: int  # H
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_pos)
  # or ("linear", factor) or None.
  rope_scaling: tuple | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2/2.5
  o_bias: bool = False  # Llama `attention_bias` also biases o_proj
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3
  model_type: str = "llama"
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32  # compute dtype
  # What a layer keeps for the backward pass (REMAT_POLICIES): "none" keeps
  # every activation, "full" only the layer's input (the layer is run again
  # in the backward pass), "dots" the weight matmuls' outputs (attention and
  # elementwise ops are recomputed). The values computed are the same.
  remat: str = "none"
  # Run the layers as one `lax.scan` over their parameters stacked on a
  # leading axis (`over_layers`): one layer is traced and compiled instead
  # of L, so compilation is several times faster; each call stacks a copy
  # of the layer weights. False: a Python loop, unrolled by XLA.
  scan_layers: bool = False
  # LoRA adapters on the projections (models/lora.py), None = none.
  lora: lora.LoraSpec | None = None

  @property
  def q_per_kv(self) -> int:
    """R, query heads that share one kv head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count (what the checkpoint holds)."""
    d, f, n, g, h = (self.hidden_size, self.intermediate_size,
                     self.num_heads, self.num_kv_heads, self.head_dim)
    attn = d * n * h * 2 + d * g * h * 2
    if self.qkv_bias:
      attn += n * h + 2 * g * h
    if self.o_bias:
      attn += d
    if self.qk_norm:
      attn += 2 * h
    mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
    layer = attn + mlp + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * layer + emb + d

  @classmethod
  def from_hf(cls, hf: dict, *, source: str = "config.json",
              param_dtype=jnp.float32, dtype=jnp.float32) -> "LlamaConfig":
    """Builds a config from a Hugging Face config dict.

    Args:
      hf: the parsed config.json.
      source: where `hf` came from, used in error messages.
      param_dtype: dtype parameters are stored in.
      dtype: compute dtype.

    Raises:
      ValueError naming the file and the field for anything unsupported.
    """
    from purld_jax.models import hf_config  # local: keeps this file model-only
    return cls(**hf_config.parse(hf, source=source),
               param_dtype=param_dtype, dtype=dtype)


REMAT_POLICIES = ("none", "full", "dots")


def remat_policy(name: str):
  """The `jax.checkpoint` policy of a `LlamaConfig.remat` name (None for
  "none": no checkpointing)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat {name!r} is not one of {REMAT_POLICIES}")
  return {"none": None,
          "full": jax.checkpoint_policies.nothing_saveable,
          "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
          }[name]


def layer_states(model):
  """(the layers' shared graph definition, their states): stacked on a
  leading axis L with `model.cfg.scan_layers` (each call stacks a copy of
  the weights: build it once outside a loop that runs the layers many
  times, as the sampler's decode does), else a list of L states."""
  splits = [nnx.split(layer) for layer in model.layers]
  states = [state for _, state in splits]
  if model.cfg.scan_layers:
    states = _stack_layers(model, states)
  return splits[0][0], states


def over_layers(model, body, carry, xs=None, *, remat: str | None = None,
                layers=None):
  """Runs `body(layer, carry, x_l) -> (carry, y_l)` through the L layers.

  With `model.cfg.scan_layers`, one `lax.scan` over the layers' parameters
  stacked on a leading axis (the layers share one graph definition), else a
  Python loop. Each layer's step runs under `jax.checkpoint` with the remat
  policy (`remat`, default `model.cfg.remat`). Both give the same values.

  Args:
    model: a `Llama`.
    body: a pure function of (a `Block`, carry, x_l).
    carry: a pytree threaded through the layers.
    xs: None or a pytree of arrays with leading axis L; layer l sees x_l.
    remat: overrides `model.cfg.remat`.
    layers: `layer_states(model)`, when the caller built it already.

  Returns:
    (the last carry, the y_l stacked on a leading axis L; None if every y_l
    is None).
  """
  policy = remat_policy(model.cfg.remat if remat is None else remat)
  layer_def, states = layers if layers is not None else layer_states(model)

  def step(state, c, x):
    return body(nnx.merge(layer_def, state), c, x)

  if policy is not None:
    step = jax.checkpoint(step, policy=policy, prevent_cse=False)
  if model.cfg.scan_layers:
    return jax.lax.scan(lambda c, sx: step(sx[0], c, sx[1]), carry,
                        (states, xs))
  ys = []
  for l, state in enumerate(states):
    x = None if xs is None else jax.tree.map(lambda a, l=l: a[l], xs)
    carry, y = step(state, carry, x)
    ys.append(y)
  if all(y is None for y in ys):
    return carry, None
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _stack_layers(model, states):
  """The layers' states stacked on a leading axis L, each stack constrained
  to the parameter's own sharding (`sharding_names`) with L unsharded: an
  FSDP-sharded weight stays sharded in the stack, not gathered whole."""
  names = sharding.logical_axes(model.layers[0])

  def stack(path, *leaves):
    node = names
    for key in path:
      if isinstance(key, jax.tree_util.DictKey):
        node = node[key.key]
    return sharding.constrain(jnp.stack(leaves), (None,) + tuple(node))

  return jax.tree_util.tree_map_with_path(stack, *states)


def tiny_config(**overrides) -> LlamaConfig:
  """A random-init config small enough for unit tests on CPU."""
  base = dict(vocab_size=128, hidden_size=32, intermediate_size=64,
              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              rms_norm_eps=1e-6, rope_theta=10000.0,
              max_position_embeddings=256)
  base.update(overrides)
  return LlamaConfig(**base)


# ----------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: LlamaConfig) -> jax.Array:
  """f32[H/2] inverse frequencies, with llama3 / linear scaling applied."""
  h = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
  sc = cfg.rope_scaling
  if sc is None:
    return inv
  if sc[0] == "linear":
    return inv / sc[1]
  if sc[0] == "llama3":
    _, factor, low, high, orig = sc
    low_wavelen = orig / low
    high_wavelen = orig / high
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed by `factor`, short ones kept, and the band
    # between them interpolated smoothly.
    scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(mid, smoothed, scaled)
  raise ValueError(f"rope scaling {sc[0]!r} is not supported")


def apply_rope(x_BTXH: jax.Array, positions_BT: jax.Array,
               inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE (the Hugging Face layout) on [B, T, heads, H]."""
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_BTXH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTXH.dtype)


# ----------------------------------------------------------------------------
# Layers


def _param(rngs, shape, names, dtype, init="normal", scale=0.02):
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (scale * jax.random.normal(rngs.params(), shape)).astype(dtype)
  with nnx.use_eager_sharding(False):
    return nnx.Param(value, sharding_names=names)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 (as Hugging Face does)."""

  def __init__(self, dim: int, eps: float, *, name: str, param_dtype,
               rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(rngs, (dim,), (name,), param_dtype, init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    scale = self.scale.value.astype(x.dtype)
    return y * scale.reshape((1,) * (x.ndim - 1) + scale.shape)


class Attention(nnx.Module):
  """Grouped-query attention with RoPE, optional q/k/v bias and q/k norm."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, n, g, h, pd = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim, cfg.param_dtype)
    self.cfg = cfg
    self.q_proj = _param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), pd)
    self.k_proj = _param(rngs, (d, g, h), ("embed", "kv_heads", "head_dim"), pd)
    self.v_proj = _param(rngs, (d, g, h), ("embed", "kv_heads", "head_dim"), pd)
    self.o_proj = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, (n, h), ("q_heads", "head_dim"), pd)
      self.k_bias = _param(rngs, (g, h), ("kv_heads", "head_dim"), pd)
      self.v_bias = _param(rngs, (g, h), ("kv_heads", "head_dim"), pd)
    if cfg.o_bias:
      self.o_bias = _param(rngs, (d,), ("embed",), pd)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg.rms_norm_eps, name="head_dim",
                            param_dtype=pd, rngs=rngs)
      self.k_norm = RMSNorm(h, cfg.rms_norm_eps, name="head_dim",
                            param_dtype=pd, rngs=rngs)
    lora.attach(self, cfg, lora.ATTN, rngs)

  def __call__(self, x_BTD, positions_BT, inv_freq, k_cache_BSGH,
               v_cache_BSGH, mask_BTS, write_at):
    """One attention block.

    Args:
      x_BTD: normed input.
      positions_BT: i32 RoPE positions.
      inv_freq: f32[H/2].
      k_cache_BSGH, v_cache_BSGH: this layer's cache, or None for a plain
        forward (keys are then this call's own T tokens, S = T).
      mask_BTS: bool, query t may attend slot s.
      write_at: i32[] slot where this call's keys go.

    Returns:
      (out_BTD, k_cache_BSGH, v_cache_BSGH).
    """
    cfg, dt = self.cfg, self.cfg.dtype
    q, k, v = self.project(x_BTD, positions_BT, inv_freq)
    if k_cache_BSGH is not None:
      zero = jnp.zeros((), jnp.int32)
      idx = (zero, write_at, zero, zero)
      k_cache_BSGH = jax.lax.dynamic_update_slice(
          k_cache_BSGH, k.astype(k_cache_BSGH.dtype), idx)
      v_cache_BSGH = jax.lax.dynamic_update_slice(
          v_cache_BSGH, v.astype(v_cache_BSGH.dtype), idx)
      keys, values = k_cache_BSGH.astype(dt), v_cache_BSGH.astype(dt)
    else:
      keys, values = k, v
    b, t, n, h = q.shape
    g = cfg.num_kv_heads
    q = q.reshape(b, t, g, n // g, h)
    logits = jnp.einsum("btgrh,bsgh->bgrts", q, keys,
                        preferred_element_type=jnp.float32)
    logits = logits * (h ** -0.5)
    logits = jnp.where(mask_BTS[:, None, None, :, :], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    attn = jnp.einsum("bgrts,bsgh->btgrh", probs, values).reshape(b, t, n, h)
    return self.output(attn), k_cache_BSGH, v_cache_BSGH

  def project(self, x_BTD, positions_BT, inv_freq):
    """(q [B, T, N, H], k [B, T, G, H], v [B, T, G, H]) of normed input,
    RoPE applied to q and k. Shared with the sampler's decode step."""
    cfg, dt = self.cfg, self.cfg.dtype
    x = x_BTD.astype(dt)
    q = jnp.einsum("btd,dnh->btnh", x, self.q_proj.value.astype(dt))
    k = jnp.einsum("btd,dgh->btgh", x, self.k_proj.value.astype(dt))
    v = jnp.einsum("btd,dgh->btgh", x, self.v_proj.value.astype(dt))
    q, k, v = (lora.add(self, name, x, y) for name, y in
               (("q_proj", q), ("k_proj", k), ("v_proj", v)))
    if cfg.qkv_bias:
      q = q + self.q_bias.value.astype(dt)[None, None]
      k = k + self.k_bias.value.astype(dt)[None, None]
      v = v + self.v_bias.value.astype(dt)[None, None]
    if cfg.qk_norm:
      q = self.q_norm(q)
      k = self.k_norm(k)
    q = sharding.constrain(apply_rope(q, positions_BT, inv_freq), _ACT_HEADS)
    k = sharding.constrain(apply_rope(k, positions_BT, inv_freq), _ACT_HEADS)
    return q, k, v

  def output(self, attn_BTNH):
    """[B, T, D]: the output projection of attended values."""
    dt = self.cfg.dtype
    b, t, n, h = attn_BTNH.shape
    # One [B*T, N*H] x [N*H, D] product: an einsum over (n, h) made XLA:CPU
    # transpose the whole o_proj weight on every call.
    w = self.o_proj.value.astype(dt).reshape(n * h, -1)
    out = (attn_BTNH.reshape(b * t, n * h) @ w).reshape(b, t, -1)
    out = lora.add(self, "o_proj", attn_BTNH.reshape(b, t, n * h), out)
    if self.cfg.o_bias:
      out = out + self.o_bias.value.astype(dt)[None, None]
    return out


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
    self.cfg = cfg
    self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
    self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
    self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)
    if cfg.mlp_bias:
      self.gate_bias = _param(rngs, (f,), ("mlp",), pd, init="zeros")
      self.up_bias = _param(rngs, (f,), ("mlp",), pd, init="zeros")
      self.down_bias = _param(rngs, (d,), ("embed",), pd, init="zeros")
    lora.attach(self, cfg, lora.MLP, rngs)

  def __call__(self, x_BTD):
    dt = self.cfg.dtype
    x = x_BTD.astype(dt)
    gate = lora.add(self, "gate_proj", x, x @ self.gate_proj.value.astype(dt))
    up = lora.add(self, "up_proj", x, x @ self.up_proj.value.astype(dt))
    if self.cfg.mlp_bias:
      gate = gate + self.gate_bias.value.astype(dt)[None, None]
      up = up + self.up_bias.value.astype(dt)[None, None]
    act = jax.nn.silu(gate) * up
    out = lora.add(self, "down_proj", act, act @ self.down_proj.value.astype(dt))
    if self.cfg.mlp_bias:
      out = out + self.down_bias.value.astype(dt)[None, None]
    return out


class Block(nnx.Module):
  """Pre-norm residual block: attention then MLP."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    pd, eps = cfg.param_dtype, cfg.rms_norm_eps
    self.input_norm = RMSNorm(cfg.hidden_size, eps, name="embed",
                              param_dtype=pd, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, eps, name="embed",
                                  param_dtype=pd, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, inv_freq, k_cache, v_cache, mask, write_at):
    a, k_cache, v_cache = self.attn(self.input_norm(x), positions, inv_freq,
                                    k_cache, v_cache, mask, write_at)
    x = x + a
    x = x + self.mlp(self.post_attn_norm(x))
    return x, k_cache, v_cache


# ----------------------------------------------------------------------------
# The model


def default_positions(attention_mask_BT: jax.Array) -> jax.Array:
  """i32[B, T] positions for a left-padded batch: 0 at the first real token."""
  m = attention_mask_BT.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


class Llama(nnx.Module):
  """The decoder. See the module docstring for the three entry points."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.param_dtype
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), _TABLE, pd)
    self.layers = nnx.List([Block(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, name="embed",
                              param_dtype=pd, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size),
                            _TABLE[::-1], pd)

  # -- helpers ---------------------------------------------------------------

  def init_cache(self, batch: int, size: int, dtype=None) -> structs.KVCache:
    """An empty cache of `size` slots for `batch` rows."""
    cfg = self.cfg
    shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return structs.KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                           mask=jnp.zeros((batch, size), bool),
                           end=jnp.zeros((), jnp.int32))

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """f32[..., V] logits from final-norm hidden states [..., D].

    Vocab-parallel under a mesh (sharding.py): the result is split on V
    like the table's rows (`act_vocab`) and on the leading axis by
    `logits_batch`, so each device multiplies the hidden states of its
    rows (gathered across the V axes: small) by its own table rows; the
    table is never gathered.
    """
    dt = self.cfg.dtype
    lead = ("logits_batch",) + (None,) * (h_BTD.ndim - 2)
    h = sharding.constrain(h_BTD.astype(dt), lead + ("act_embed",))
    if self.cfg.tie_word_embeddings:
      out = jnp.einsum("...d,vd->...v", h, self.embed.value.astype(dt),
                       preferred_element_type=jnp.float32)
    else:
      out = jnp.einsum("...d,dv->...v", h, self.lm_head.value.astype(dt),
                       preferred_element_type=jnp.float32)
    return sharding.constrain(out, lead + ("act_vocab",))

  def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
    """[B, T, D] embedding rows of i32 tokens, in the compute dtype.

    Under a mesh the table is split on V (sharding.py): each device gathers
    the rows it holds (zero elsewhere) for every row of its data shard, and
    the results are summed over the V shards, then cut to its own rows
    (XLA's gather partitioning). That sum is data / (data x fsdp) of the
    batch per device (all of it with data = 1: Llama 3.1 8B on fsdp 16 x
    tensor 2, 1 GiB f32 per copy), so it runs `_LOOKUP_ELEMENTS` at a time
    over T (`lookup_chunk`).
    """
    table, dt = self.embed.value, self.cfg.dtype

    def lookup(tok_BC):
      return sharding.constrain(jnp.take(table, tok_BC, axis=0).astype(dt),
                                _ACT)

    b, t = tokens_BT.shape
    c = lookup_chunk(b, t, self.cfg.hidden_size)
    if c == t:
      return lookup(tokens_BT)
    n = -(-t // c)
    tok = jnp.pad(tokens_BT, ((0, 0), (0, n * c - t)))
    x = jax.lax.map(lookup, tok.reshape(b, n, c).swapaxes(0, 1))
    return sharding.constrain(x.swapaxes(0, 1).reshape(b, n * c, -1)[:, :t],
                              _ACT)

  def _forward(self, tokens_BT, positions_BT, attention_mask_BT, cache):
    cfg = self.cfg
    b, t = tokens_BT.shape
    if attention_mask_BT is None:
      attention_mask_BT = jnp.ones((b, t), bool)
    attention_mask_BT = attention_mask_BT.astype(bool)
    if positions_BT is None:
      if cache is not None:
        raise ValueError("a cached forward needs explicit positions")
      positions_BT = default_positions(attention_mask_BT)
    x = self.embed_tokens(tokens_BT)
    inv_freq = rope_inv_freq(cfg)
    if cache is None:
      causal = jnp.tril(jnp.ones((t, t), bool))
      mask = causal[None] & attention_mask_BT[:, None, :]
      write_at = jnp.zeros((), jnp.int32)
      slot_mask = None
    else:
      write_at = cache.end
      slot_mask = jax.lax.dynamic_update_slice(
          cache.mask, attention_mask_BT, (jnp.zeros((), jnp.int32), write_at))
      slots = jnp.arange(cache.size)
      q_slot = write_at + jnp.arange(t)
      causal = slots[None, :] <= q_slot[:, None]  # [T, S]
      mask = causal[None] & slot_mask[:, None, :]

    def layer_step(layer, x, kv):
      kc, vc = (None, None) if kv is None else kv
      x, kc, vc = layer(x, positions_BT, inv_freq, kc, vc, mask, write_at)
      x = sharding.constrain(x, _ACT)
      return x, (None if kv is None else (kc, vc))

    x, new_kv = over_layers(
        self, layer_step, x, None if cache is None else (cache.k, cache.v))
    h = self.final_norm(x)
    if cache is None:
      return h, None
    new_cache = structs.KVCache(k=new_kv[0], v=new_kv[1],
                                mask=slot_mask, end=cache.end + t)
    return h, new_cache

  # -- entry points ----------------------------------------------------------

  def hidden(self, tokens, *, positions=None, attention_mask=None):
    """Final-norm hidden states [B, T, D] (no vocab projection)."""
    return self._forward(tokens, positions, attention_mask, None)[0]

  def __call__(self, tokens, *, positions=None, attention_mask=None):
    """Logits f32[B, T, V] of a plain (uncached) forward.

    Args:
      tokens: i32[B, T].
      positions: i32[B, T]; default `default_positions(attention_mask)`.
      attention_mask: bool[B, T], False on padding; default all True.
    """
    return self.logits(self.hidden(tokens, positions=positions,
                                   attention_mask=attention_mask))

  def extend(self, tokens, cache: structs.KVCache, *, positions,
             attention_mask=None, return_hidden: bool = False):
    """Cached forward: writes T tokens into the cache at `cache.end`.

    Args:
      tokens: i32[B, T].
      cache: the cache, with `cache.end + T <= S`.
      positions: i32[B, T] RoPE positions of these tokens.
      attention_mask: bool[B, T] which of these tokens are real.
      return_hidden: return final-norm hidden states instead of logits.

    Returns:
      (f32[B, T, V] logits or [B, T, D] hidden, the updated cache).
    """
    h, cache = self._forward(tokens, positions, attention_mask, cache)
    return (h if return_hidden else self.logits(h)), cache


# Most embedding values one lookup chunk holds over all rows: 2^24 (64 MiB
# of f32 over the devices of a data shard; `Llama.embed_tokens`).
_LOOKUP_ELEMENTS = 1 << 24


def lookup_chunk(rows: int, length: int, width: int) -> int:
  """Positions of [rows, length] tokens embedded at once (width D): all of
  them when rows * length * D <= _LOOKUP_ELEMENTS, else a slice of T."""
  return max(1, min(length, _LOOKUP_ELEMENTS // max(rows * width, 1)))


@functools.lru_cache(maxsize=8)
def abstract_model(cfg: LlamaConfig):
  """(graphdef, param shapes) of `Llama(cfg)` without allocating weights.

  The shapes are a nested dict of `jax.ShapeDtypeStruct` in NNX's pure-dict
  layout; `nnx.merge(graphdef, arrays_like_shapes)` builds a model. Cached:
  tracing the initialiser of a 30-layer model takes seconds.
  """
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(state))
  return graphdef, shapes
