"""The SigLIP vision transformer as Idefics3 / SmolVLM use it (NaViT-style
position ids for padded images), in Flax NNX.

Axis letters: N images (tiles), C channels, Y X pixel rows and columns,
P patch side, h w patch rows and columns, Q = h * w patches, K = C * P * P
values of one patch, D vision width, A attention heads, H head dim, F mlp.

  vision = SiglipVision(VisionConfig(...), rngs=nnx.Rngs(0))
  out_NQD = vision(pixels_NCYX, patch_mask_Nhw)

The patch embedding (a stride-P convolution in Hugging Face) is one matmul
over the flattened patches, `patchify` laying each out in the conv weight's
(C, P, P) order. A patch is real when any of its pixels is
(`patch_mask`); padding patches take position 0 and are never attended to,
and the real ones of an image of h' x w' patches get the positions of the
`num_patches_per_side`^2 grid their fractional coordinates fall in
(`position_ids`, transformers' Idefics3VisionEmbeddings). Layers are pre-LN
(LayerNorm with bias) with a GELU-tanh MLP, then a final LayerNorm.

Parameters carry logical axis names: the layers reuse the decoder's (embed,
q_heads, head_dim, mlp); the patch and position tables use vision_patch and
vision_positions (replicated, sharding.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from purld_jax.models import layers

_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower's architecture (HF `vision_config`)."""

  hidden_size: int = 1152  # D
  intermediate_size: int = 3072  # F
  num_layers: int = 12
  num_heads: int = 16  # A
  num_channels: int = 3  # C
  image_size: int = 224
  patch_size: int = 32  # P
  layer_norm_eps: float = 1e-6
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patches_per_side(self) -> int:
    return self.image_size // self.patch_size

  @classmethod
  def from_hf(cls, hf: dict, *, source: str = "config.json",
              param_dtype=jnp.float32, dtype=jnp.float32) -> "VisionConfig":
    """From the `vision_config` dict; errors name `source` and the field."""
    from purld_jax.models import hf_config
    act = hf.get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
      raise hf_config.ConfigError(
          f"{source}: vision_config.hidden_act={act!r} is not supported "
          "(gelu_pytorch_tanh)")
    ints = {}
    for ours, theirs, default in (
        ("hidden_size", "hidden_size", 1152),
        ("intermediate_size", "intermediate_size", 3072),
        ("num_layers", "num_hidden_layers", 12),
        ("num_heads", "num_attention_heads", 16),
        ("num_channels", "num_channels", 3),
        ("image_size", "image_size", 224),
        ("patch_size", "patch_size", 32)):
      v = hf.get(theirs, default)
      if not isinstance(v, int) or isinstance(v, bool):
        raise hf_config.ConfigError(
            f"{source}: vision_config.{theirs}={v!r} is not supported "
            "(an int)")
      ints[ours] = v
    if ints["hidden_size"] % ints["num_heads"]:
      raise hf_config.ConfigError(
          f"{source}: vision_config.hidden_size is not a multiple of "
          "num_attention_heads")
    return cls(**ints, layer_norm_eps=float(hf.get("layer_norm_eps", 1e-6)),
               param_dtype=param_dtype, dtype=dtype)

  def to_hf(self) -> dict:
    return dict(hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads,
                num_channels=self.num_channels, image_size=self.image_size,
                patch_size=self.patch_size, layer_norm_eps=self.layer_norm_eps,
                hidden_act="gelu_pytorch_tanh")


# ----------------------------------------------------------------------------
# Pure functions of pixels and masks


def patchify(pixels_NCYX: jax.Array, p: int) -> jax.Array:
  """[N, Q, K]: non-overlapping P x P patches, row-major over (h, w), each
  flattened in (C, P, P) order (the conv weight's)."""
  n, c, y, x = pixels_NCYX.shape
  h, w = y // p, x // p
  v = pixels_NCYX[:, :, :h * p, :w * p].reshape(n, c, h, p, w, p)
  return v.transpose(0, 2, 4, 1, 3, 5).reshape(n, h * w, c * p * p)


def patch_mask(pixel_mask_NYX: jax.Array, p: int) -> jax.Array:
  """bool[N, h, w]: a patch is real when any of its pixels is."""
  n, y, x = pixel_mask_NYX.shape
  h, w = y // p, x // p
  m = pixel_mask_NYX[:, :h * p, :w * p].reshape(n, h, p, w, p)
  return jnp.any(m != 0, axis=(2, 4))


def _boundaries(side: int) -> np.ndarray:
  # torch.arange(1 / side, 1.0, 1 / side) in float32, as transformers has it.
  return np.arange(1 / side, 1.0, 1 / side).astype(np.float32)


def position_ids(patch_mask_Nhw: jax.Array, side: int) -> jax.Array:
  """i32[N, Q] learned-position index of each patch.

  Real patches of an image of h' x w' real patches: the cell of a
  side x side grid that (i / h', j / w') falls in; padding patches: 0.
  """
  n, h, w = patch_mask_Nhw.shape
  bounds = jnp.asarray(_boundaries(side))
  real_h = jnp.maximum(patch_mask_Nhw[:, :, 0].sum(1), 1).astype(jnp.float32)
  real_w = jnp.maximum(patch_mask_Nhw[:, 0, :].sum(1), 1).astype(jnp.float32)

  def bucket(count, real):
    frac = jnp.arange(count, dtype=jnp.float32)[None] * (1.0 / real)[:, None]
    frac = jnp.minimum(frac, jnp.float32(1.0 - 1e-6))
    return jnp.searchsorted(bounds, frac, side="right").astype(jnp.int32)

  ids = bucket(h, real_h)[:, :, None] * side + bucket(w, real_w)[:, None, :]
  return jnp.where(patch_mask_Nhw, ids, 0).reshape(n, h * w)


# ----------------------------------------------------------------------------
# Modules


class LayerNorm(nnx.Module):
  """(x - mean) / std * scale + bias over the last axis, in float32."""

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = layers.param(rngs, (dim,), ("embed",), param_dtype,
                              init="ones")
    self.bias = layers.param(rngs, (dim,), ("embed",), param_dtype,
                             init="zeros")

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    lead = (1,) * (x.ndim - 1)
    scale = self.scale.value.astype(jnp.float32).reshape(lead + (-1,))
    bias = self.bias.value.astype(jnp.float32).reshape(lead + (-1,))
    return (y * scale + bias).astype(x.dtype)


class VisionAttention(nnx.Module):
  """Bidirectional multi-head attention with biases; padding keys masked."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    d, a, h, pd = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.param_dtype
    self.cfg = cfg
    for name in ("q", "k", "v"):
      setattr(self, f"{name}_proj",
              layers.param(rngs, (d, a, h), ("embed", "q_heads", "head_dim"),
                           pd))
      setattr(self, f"{name}_bias",
              layers.param(rngs, (a, h), ("q_heads", "head_dim"), pd,
                           init="zeros"))
    self.o_proj = layers.param(rngs, (a, h, d),
                               ("q_heads", "head_dim", "embed"), pd)
    self.o_bias = layers.param(rngs, (d,), ("embed",), pd, init="zeros")

  def __call__(self, x_NQD: jax.Array, key_mask_NQ: jax.Array) -> jax.Array:
    dt = self.cfg.dtype
    x = x_NQD.astype(dt)

    def proj(name):
      w = getattr(self, f"{name}_proj").value.astype(dt)
      b = getattr(self, f"{name}_bias").value.astype(dt)
      return jnp.einsum("nqd,dah->nqah", x, w) + b[None, None]

    q, k, v = proj("q"), proj("k"), proj("v")
    logits = jnp.einsum("nqah,nkah->naqk", q, k,
                        preferred_element_type=jnp.float32)
    logits = logits * (self.cfg.head_dim ** -0.5)
    logits = jnp.where(key_mask_NQ[:, None, None, :], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("naqk,nkah->nqah", probs, v)
    return (jnp.einsum("nqah,ahd->nqd", out, self.o_proj.value.astype(dt))
            + self.o_bias.value.astype(dt)[None, None])


class VisionMLP(nnx.Module):
  """fc2(gelu_tanh(fc1(x))), with biases."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
    self.cfg = cfg
    self.fc1 = layers.param(rngs, (d, f), ("embed", "mlp"), pd)
    self.fc1_bias = layers.param(rngs, (f,), ("mlp",), pd, init="zeros")
    self.fc2 = layers.param(rngs, (f, d), ("mlp", "embed"), pd)
    self.fc2_bias = layers.param(rngs, (d,), ("embed",), pd, init="zeros")

  def __call__(self, x_NQD: jax.Array) -> jax.Array:
    dt = self.cfg.dtype
    x = (x_NQD.astype(dt) @ self.fc1.value.astype(dt)
         + self.fc1_bias.value.astype(dt)[None, None])
    x = jax.nn.gelu(x, approximate=True)
    return (x @ self.fc2.value.astype(dt)
            + self.fc2_bias.value.astype(dt)[None, None])


class EncoderLayer(nnx.Module):
  """Pre-LN residual block: attention then MLP."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    d, eps, pd = cfg.hidden_size, cfg.layer_norm_eps, cfg.param_dtype
    self.norm1 = LayerNorm(d, eps, param_dtype=pd, rngs=rngs)
    self.attn = VisionAttention(cfg, rngs=rngs)
    self.norm2 = LayerNorm(d, eps, param_dtype=pd, rngs=rngs)
    self.mlp = VisionMLP(cfg, rngs=rngs)

  def __call__(self, x_NQD, key_mask_NQ):
    x = x_NQD + self.attn(self.norm1(x_NQD), key_mask_NQ)
    return x + self.mlp(self.norm2(x))


class SiglipVision(nnx.Module):
  """Patch embedding, learned positions, encoder layers, post LayerNorm."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, pd, p = cfg.hidden_size, cfg.param_dtype, cfg.patch_size
    self.patch_embed = layers.param(
        rngs, (cfg.num_channels * p * p, d), ("vision_patch", "embed"), pd)
    self.patch_bias = layers.param(rngs, (d,), ("embed",), pd, init="zeros")
    self.position_embed = layers.param(
        rngs, (cfg.patches_per_side ** 2, d), ("vision_positions", "embed"), pd)
    self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.post_norm = LayerNorm(d, cfg.layer_norm_eps, param_dtype=pd,
                               rngs=rngs)

  def __call__(self, pixels_NCYX: jax.Array,
               patch_mask_Nhw: jax.Array | None = None) -> jax.Array:
    """[N, Q, D] encoded patches (every patch, padding ones included).

    Args:
      pixels_NCYX: normalised pixels; Y and X multiples of P.
      patch_mask_Nhw: bool, which patches are real (`patch_mask`); default
        all.
    """
    cfg, dt = self.cfg, self.cfg.dtype
    p = cfg.patch_size
    n, _, y, x = pixels_NCYX.shape
    if patch_mask_Nhw is None:
      patch_mask_Nhw = jnp.ones((n, y // p, x // p), bool)
    patches = patchify(pixels_NCYX.astype(dt), p)
    h = (patches @ self.patch_embed.value.astype(dt)
         + self.patch_bias.value.astype(dt)[None, None])
    pos = position_ids(patch_mask_Nhw, cfg.patches_per_side)
    h = h + jnp.take(self.position_embed.value, pos, axis=0).astype(dt)
    key_mask = patch_mask_Nhw.reshape(n, -1)
    for layer in self.layers:
      h = layer(h, key_mask)
    return self.post_norm(h)
