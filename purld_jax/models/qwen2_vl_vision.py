"""The Qwen2.5-VL vision encoder and patch merger, in Flax NNX.

Axis letters: N images (frames), Q patches of all images packed in one
sequence (the processor's order), K = C * Tp * P * P values of one patch,
E vision width, A heads, H head dim, F mlp (or H/2 rotary frequencies in
`rotary_angles`), m the spatial merge size, S = Q / m^2 merged tokens, D
the decoder's width.

  vis = vision_inputs(image_grid_thw, cfg)          # host side, numpy
  feats_SD = VisionTower(cfg, rngs=...)(pixel_values_QK, **vis)

The patch embedding (a bias-free Conv3d with stride = kernel in Hugging
Face) is one matmul over the flattened patches the processor gives. Every
block is pre-RMSNorm: attention with a fused qkv projection and 2-D rotary
(the first H/4 frequencies turn with the patch row, the next H/4 with its
column), then a SwiGLU MLP with biases. Attention is over one frame in the
`fullatt_block_indexes` blocks and over one window of
(window_size / m / P)^2 merge blocks in the others. Hugging Face reorders
the patches window by window so each window is contiguous and undoes the
order after the merger; here every patch keeps its place and attention is
masked to equal segment ids (`vision_inputs`): the same values. The merger
RMS-normalises each patch, concatenates each m x m block (m^2 consecutive
patches in the processor's order) and maps it to D with a GELU MLP.

Parameters reuse the decoder's logical axis names (embed, q_heads,
head_dim, mlp); the patch embedding's input is vision_patch and the
merger's vision_shuffled (sharding.py).
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
_EPS = 1e-6  # Hugging Face fixes the vision RMSNorms' epsilon


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower's architecture (HF `vision_config`)."""

  hidden_size: int = 1280  # E
  intermediate_size: int = 3420  # F
  num_layers: int = 32  # HF depth
  num_heads: int = 16  # A
  num_channels: int = 3  # C
  patch_size: int = 14  # P
  temporal_patch_size: int = 2  # Tp
  spatial_merge_size: int = 2  # m
  window_size: int = 112  # pixels
  out_hidden_size: int = 3584  # D
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  rope_theta: float = 10000.0
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """K, values of one flattened patch."""
    return (self.num_channels * self.temporal_patch_size
            * self.patch_size ** 2)

  @property
  def window_blocks(self) -> int:
    """Merge blocks per window side."""
    return self.window_size // self.spatial_merge_size // self.patch_size

  @classmethod
  def from_hf(cls, hf: dict, *, source: str = "config.json",
              param_dtype=jnp.float32, dtype=jnp.float32) -> "VisionConfig":
    """From the `vision_config` dict; errors name `source` and the field."""
    from purld_jax.models import hf_config

    def bad(field, why):
      return hf_config.ConfigError(
          f"{source}: vision_config.{field}={hf.get(field)!r} {why}")

    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
      raise bad("hidden_act", "is not supported (silu)")
    ints = {}
    for ours, theirs, default in (
        ("hidden_size", "hidden_size", 1280),
        ("intermediate_size", "intermediate_size", 3420),
        ("num_layers", "depth", 32), ("num_heads", "num_heads", 16),
        ("num_channels", "in_channels", 3), ("patch_size", "patch_size", 14),
        ("temporal_patch_size", "temporal_patch_size", 2),
        ("spatial_merge_size", "spatial_merge_size", 2),
        ("window_size", "window_size", 112),
        ("out_hidden_size", "out_hidden_size", 3584)):
      v = hf.get(theirs, default)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise bad(theirs, "is not supported (a positive int)")
      ints[ours] = v
    if ints["hidden_size"] % (4 * ints["num_heads"]):
      raise bad("hidden_size", "is not 4 x num_heads x an int (2-D rotary)")
    if ints["window_size"] < ints["spatial_merge_size"] * ints["patch_size"]:
      raise bad("window_size", "is less than one merge block")
    full = hf.get("fullatt_block_indexes", (7, 15, 23, 31))
    if not all(isinstance(i, int) and 0 <= i for i in full):
      raise bad("fullatt_block_indexes", "is not a list of layer indexes")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") not in ("axial", "default"):
      raise bad("rope_parameters", "is not supported (rope_type axial)")
    return cls(**ints, fullatt_block_indexes=tuple(full),
               rope_theta=float(rope.get("rope_theta", 10000.0)),
               param_dtype=param_dtype, dtype=dtype)

  def to_hf(self) -> dict:
    return dict(depth=self.num_layers, hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                num_heads=self.num_heads, in_channels=self.num_channels,
                patch_size=self.patch_size,
                temporal_patch_size=self.temporal_patch_size,
                spatial_merge_size=self.spatial_merge_size,
                window_size=self.window_size,
                out_hidden_size=self.out_hidden_size,
                fullatt_block_indexes=list(self.fullatt_block_indexes),
                hidden_act="silu",
                rope_parameters={"rope_type": "axial",
                                 "rope_theta": self.rope_theta})


# ----------------------------------------------------------------------------
# Host-side indices (numpy, from the processor's image_grid_thw)


def vision_inputs(grid_thw_N3, cfg: VisionConfig) -> dict[str, np.ndarray]:
  """Per-patch indices of N images packed as the processor packs them.

  Within a frame of h x w patches the processor lays out m x m blocks in
  row-major order, each block's patches row-major.

  Returns:
    {"rows_cols": i32[Q, 2] each patch's (row, column) in its frame,
     "frames": i32[Q] the frame it is in (full attention segments),
     "windows": i32[Q] its window (window attention segments)}.
  """
  m, wb = cfg.spatial_merge_size, cfg.window_blocks
  rows_cols, frames, windows = [], [], []
  frame = window = 0
  for t, h, w in np.asarray(grid_thw_N3, np.int64).reshape(-1, 3).tolist():
    if h % m or w % m:
      raise ValueError(f"image grid {(t, h, w)}: h and w must be multiples "
                       f"of spatial_merge_size {m}")
    bh, bw, ih, iw = np.meshgrid(np.arange(h // m), np.arange(w // m),
                                 np.arange(m), np.arange(m), indexing="ij")
    rc = np.stack([bh * m + ih, bw * m + iw], -1).reshape(-1, 2)
    nw_w = -(-(w // m) // wb)
    win = ((bh // wb) * nw_w + bw // wb).reshape(-1)
    n_win = -(-(h // m) // wb) * nw_w
    for _ in range(t):
      rows_cols.append(rc)
      frames.append(np.full(h * w, frame))
      windows.append(win + window)
      frame += 1
      window += n_win
  return {"rows_cols": np.concatenate(rows_cols).astype(np.int32),
          "frames": np.concatenate(frames).astype(np.int32),
          "windows": np.concatenate(windows).astype(np.int32)}


def rotary_angles(rows_cols_Q2: jax.Array, cfg: VisionConfig) -> jax.Array:
  """f32[Q, H/2]: H/4 frequencies times the row, then the same times the
  column."""
  h4 = cfg.head_dim // 2
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h4, 2, dtype=jnp.float32)
                                  / h4))
  ang = rows_cols_Q2.astype(jnp.float32)[..., None] * inv[None, None]
  return ang.reshape(ang.shape[0], -1)


# ----------------------------------------------------------------------------
# Modules


class VisionAttention(nnx.Module):
  """Bidirectional attention over equal segment ids, 2-D rotary on q, k."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    e, a, h, pd = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.param_dtype
    self.cfg = cfg
    self.qkv = layers.param(rngs, (e, 3, a, h),
                            ("embed", None, "q_heads", "head_dim"), pd)
    self.qkv_bias = layers.param(rngs, (3, a, h),
                                 (None, "q_heads", "head_dim"), pd,
                                 init="zeros")
    self.o_proj = layers.param(rngs, (a, h, e),
                               ("q_heads", "head_dim", "embed"), pd)
    self.o_bias = layers.param(rngs, (e,), ("embed",), pd, init="zeros")

  def __call__(self, x_QE, angles_QF, mask_QQ):
    dt = self.cfg.dtype
    qkv = (jnp.einsum("qe,ejah->qjah", x_QE.astype(dt),
                      self.qkv.value.astype(dt))
           + self.qkv_bias.value.astype(dt)[None])
    q, k = (layers.rotate(qkv[None, :, j], angles_QF[None])[0]
            for j in (0, 1))
    logits = jnp.einsum("qah,kah->aqk", q, k,
                        preferred_element_type=jnp.float32)
    logits = logits * (self.cfg.head_dim ** -0.5)
    logits = jnp.where(mask_QQ[None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    out = jnp.einsum("aqk,kah->qah", probs, qkv[:, 2])
    return (jnp.einsum("qah,ahe->qe", out, self.o_proj.value.astype(dt))
            + self.o_bias.value.astype(dt)[None])


class VisionMLP(nnx.Module):
  """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    e, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
    self.cfg = cfg
    self.gate_proj = layers.param(rngs, (e, f), ("embed", "mlp"), pd)
    self.gate_bias = layers.param(rngs, (f,), ("mlp",), pd, init="zeros")
    self.up_proj = layers.param(rngs, (e, f), ("embed", "mlp"), pd)
    self.up_bias = layers.param(rngs, (f,), ("mlp",), pd, init="zeros")
    self.down_proj = layers.param(rngs, (f, e), ("mlp", "embed"), pd)
    self.down_bias = layers.param(rngs, (e,), ("embed",), pd, init="zeros")

  def __call__(self, x_QE):
    dt = self.cfg.dtype
    x = x_QE.astype(dt)

    def lin(name, v):
      return (v @ getattr(self, f"{name}_proj").value.astype(dt)
              + getattr(self, f"{name}_bias").value.astype(dt)[None])

    return lin("down", jax.nn.silu(lin("gate", x)) * lin("up", x))


class VisionBlock(nnx.Module):
  """Pre-RMSNorm residual block: attention then MLP."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    e, pd = cfg.hidden_size, cfg.param_dtype
    self.norm1 = layers.RMSNorm(e, _EPS, name="embed", param_dtype=pd,
                                rngs=rngs)
    self.attn = VisionAttention(cfg, rngs=rngs)
    self.norm2 = layers.RMSNorm(e, _EPS, name="embed", param_dtype=pd,
                                rngs=rngs)
    self.mlp = VisionMLP(cfg, rngs=rngs)

  def __call__(self, x_QE, angles_QF, mask_QQ):
    x = x_QE + self.attn(self.norm1(x_QE), angles_QF, mask_QQ)
    return x + self.mlp(self.norm2(x))


class VisionTower(nnx.Module):
  """Patch embedding, blocks, patch merger: patches -> [S, D] features."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    e, pd = cfg.hidden_size, cfg.param_dtype
    wide = e * cfg.spatial_merge_size ** 2
    self.patch_embed = layers.param(rngs, (cfg.patch_dim, e),
                                    ("vision_patch", "embed"), pd)
    self.layers = nnx.List([VisionBlock(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.merger_norm = layers.RMSNorm(e, _EPS, name="embed", param_dtype=pd,
                                      rngs=rngs)
    self.merger_fc1 = layers.param(rngs, (wide, wide),
                                   ("vision_shuffled", "mlp"), pd)
    self.merger_fc1_bias = layers.param(rngs, (wide,), ("mlp",), pd,
                                        init="zeros")
    self.merger_fc2 = layers.param(rngs, (wide, cfg.out_hidden_size),
                                   ("mlp", "embed"), pd)
    self.merger_fc2_bias = layers.param(rngs, (cfg.out_hidden_size,),
                                        ("embed",), pd, init="zeros")

  def encode(self, pixel_values_QK, rows_cols, frames, windows):
    """[Q, E] patches after the last block (before the merger)."""
    cfg, dt = self.cfg, self.cfg.dtype
    x = pixel_values_QK.astype(dt) @ self.patch_embed.value.astype(dt)
    angles = rotary_angles(rows_cols, cfg)
    full = frames[:, None] == frames[None, :]
    local = windows[:, None] == windows[None, :]
    for i, layer in enumerate(self.layers):
      x = layer(x, angles, full if i in cfg.fullatt_block_indexes else local)
    return x

  def __call__(self, pixel_values_QK, rows_cols, frames, windows):
    """[S, D] merged features in the compute dtype, S = Q / m^2.

    Args:
      pixel_values_QK: the processor's flattened patches.
      rows_cols, frames, windows: `vision_inputs` of the images' grids.
    """
    dt = self.cfg.dtype
    x = self.merger_norm(self.encode(pixel_values_QK, rows_cols, frames,
                                     windows))
    x = x.reshape(-1, self.merger_fc1.value.shape[0])
    x = jax.nn.gelu(x @ self.merger_fc1.value.astype(dt)
                    + self.merger_fc1_bias.value.astype(dt)[None],
                    approximate=False)
    return (x @ self.merger_fc2.value.astype(dt)
            + self.merger_fc2_bias.value.astype(dt)[None])
