"""The decoder's building blocks: RoPE, RMSNorm, Attention, MLP, Block.

Axis letters (see structs.py): B batch, T tokens of this call, S cache slots,
D width, N query heads, G kv heads, H head dim, F mlp, R = N // G query heads
per kv head; X stands for either N or G.

Every parameter carries logical axis names (`sharding_names` metadata):
embed, q_heads, kv_heads, head_dim, mlp (sharding.py maps them to a mesh).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from purld_jax import sharding
from purld_jax.models import lora
from purld_jax.models import llama_config

_NEG_INF = -1e30  # finite, so fully masked rows (pads) stay NaN-free
_ACT_HEADS = ("act_batch", "act_len", "act_heads", None)


# ----------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: llama_config.LlamaConfig) -> jax.Array:
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


def rope_angles(positions, inv_freq: jax.Array,
                mrope_section: tuple[int, ...] | None = None) -> jax.Array:
  """f32[B, T, H/2] rotation angles of i32[B, T] positions, or of M-RoPE
  positions i32[3, B, T] (temporal, height, width; Qwen2.5-VL): frequency f
  takes its position from the component whose `mrope_section` span (in
  order, summing to H/2) holds f."""
  if positions.ndim == 3:
    if mrope_section is None:
      raise ValueError("positions [3, B, T] need the config's mrope_section")
    comp = np.repeat(np.arange(len(mrope_section)), mrope_section)
    positions_BTF = jnp.moveaxis(positions[comp], 0, -1)
    return positions_BTF.astype(jnp.float32) * inv_freq[None, None]
  return positions.astype(jnp.float32)[..., None] * inv_freq[None, None]


def rotate(x_BTXH: jax.Array, angles_BTF: jax.Array) -> jax.Array:
  """Rotate-half RoPE (the Hugging Face layout) of [B, T, heads, H] by
  angles f32[B, T, H/2] (each used for both halves)."""
  cos = jnp.cos(angles_BTF)[:, :, None, :]
  sin = jnp.sin(angles_BTF)[:, :, None, :]
  x = x_BTXH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTXH.dtype)


def apply_rope(x_BTXH: jax.Array, positions_BT: jax.Array,
               inv_freq: jax.Array,
               mrope_section: tuple[int, ...] | None = None) -> jax.Array:
  """RoPE on [B, T, heads, H] at positions i32[B, T] (or M-RoPE's
  i32[3, B, T], `rope_angles`)."""
  return rotate(x_BTXH, rope_angles(positions_BT, inv_freq, mrope_section))


def default_positions(attention_mask_BT: jax.Array) -> jax.Array:
  """i32[B, T] positions for a left-padded batch: 0 at the first real token."""
  m = attention_mask_BT.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


# ----------------------------------------------------------------------------
# Layers


def param(rngs, shape, names, dtype, init="normal", scale=0.02):
  """An `nnx.Param` of `shape` with logical axis `names`: N(0, scale^2)
  ("normal"), ones or zeros."""
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
    self.scale = param(rngs, (dim,), (name,), param_dtype, init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    scale = self.scale.value.astype(x.dtype)
    return y * scale.reshape((1,) * (x.ndim - 1) + scale.shape)


class Attention(nnx.Module):
  """Grouped-query attention with RoPE, optional q/k/v bias and q/k norm."""

  def __init__(self, cfg: llama_config.LlamaConfig, *, rngs: nnx.Rngs):
    d, n, g, h, pd = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                      cfg.head_dim, cfg.param_dtype)
    self.cfg = cfg
    self.q_proj = param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), pd)
    self.k_proj = param(rngs, (d, g, h), ("embed", "kv_heads", "head_dim"), pd)
    self.v_proj = param(rngs, (d, g, h), ("embed", "kv_heads", "head_dim"), pd)
    self.o_proj = param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      self.q_bias = param(rngs, (n, h), ("q_heads", "head_dim"), pd)
      self.k_bias = param(rngs, (g, h), ("kv_heads", "head_dim"), pd)
      self.v_bias = param(rngs, (g, h), ("kv_heads", "head_dim"), pd)
    if cfg.o_bias:
      self.o_bias = param(rngs, (d,), ("embed",), pd)
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
      positions_BT: i32 RoPE positions [B, T] (M-RoPE: [3, B, T]).
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
    sec = cfg.mrope_section
    q = sharding.constrain(apply_rope(q, positions_BT, inv_freq, sec),
                           _ACT_HEADS)
    k = sharding.constrain(apply_rope(k, positions_BT, inv_freq, sec),
                           _ACT_HEADS)
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

  def __init__(self, cfg: llama_config.LlamaConfig, *, rngs: nnx.Rngs):
    d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
    self.cfg = cfg
    self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), pd)
    self.up_proj = param(rngs, (d, f), ("embed", "mlp"), pd)
    self.down_proj = param(rngs, (f, d), ("mlp", "embed"), pd)
    if cfg.mlp_bias:
      self.gate_bias = param(rngs, (f,), ("mlp",), pd, init="zeros")
      self.up_bias = param(rngs, (f,), ("mlp",), pd, init="zeros")
      self.down_bias = param(rngs, (d,), ("embed",), pd, init="zeros")
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

  def __init__(self, cfg: llama_config.LlamaConfig, *, rngs: nnx.Rngs):
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
