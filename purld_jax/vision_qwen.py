"""Qwen2.5-VL students (models/qwen2_vl.py) in vision.py's pipeline: image
prompts through the same batches, sampler, scorer and trainers as
Idefics3's.

Axis letters: B prompts, T tokens, I image slots per prompt (all-False
`pixel_mask` slots are padding), Q patches of one image, K values of one
patch, S = Q / m^2 image tokens of one image, D width.

Fixed image size: every image is resized to S_px x S_px pixels, the side
the student's preprocessor_config.json fixes (size.shortest_edge =
size.longest_edge = S_px^2, S_px a multiple of patch_size * merge_size;
`image_side`). So every image has the same grid (1, g, g) in patches and
s = g / m merged tokens a side, and a batch's images stack like Idefics3
tiles: pixel_values f32[B, I, Q, K], pixel_mask bool[B, I]. The grid is
read back from Q (`grid_side`), so nothing but the arrays crosses jit.

Model side, `prompt_embeds` runs the vision tower once per image (B * I of
them, padding slots included, each attending only to itself) and merges a
row's features into its image tokens in order (`idefics3.merge`);
`mrope_positions` gives the rows' M-RoPE positions from where the image
tokens are (transformers' get_rope_index for fixed-size images), so
tokens that follow the prompt (decoded or scored) take the row's largest
position + 1, + 2, ... (one position for all three axes: plain RoPE).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from purld_jax.models import idefics3
from purld_jax.models import qwen2_vl
from purld_jax.models import qwen2_vl_vision


def is_qwen(model) -> bool:
  """True for a `qwen2_vl.Qwen2VL`."""
  return isinstance(model, qwen2_vl.Qwen2VL)


def is_qwen_processor(proc) -> bool:
  """True for a Qwen2-VL processor or image processor (transformers')."""
  ip = getattr(proc, "image_processor", proc)
  return type(ip).__name__.startswith("Qwen2VLImageProcessor")


# ----------------------------------------------------------------------------
# Host side


def image_side(image_processor) -> int:
  """S_px, the side every image is resized to.

  Raises:
    ValueError naming preprocessor_config.json's `size` unless it fixes
    one square size.
  """
  size = dict(getattr(image_processor, "size", None) or {})
  lo, hi = size.get("shortest_edge"), size.get("longest_edge")
  unit = image_processor.patch_size * image_processor.merge_size
  side = math.isqrt(hi) if isinstance(hi, int) and hi > 0 else 0
  if lo != hi or side * side != hi or side % unit:
    raise ValueError(
        f"preprocessor_config.json: size={size} must fix one image size "
        f"(shortest_edge = longest_edge = S^2, S a multiple of patch_size * "
        f"merge_size = {unit}) for a Qwen2.5-VL student")
  return side


def resized(image_processor, images: Sequence) -> list:
  """PIL images resized to `image_side` squared (bicubic)."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  s = image_side(image_processor)
  return [im if im.size == (s, s) else im.resize((s, s),
                                                 PIL.Image.Resampling.BICUBIC)
          for im in images]


def _per_image(out, n: int):
  """(pixel_values f32[I, Q, K], pixel_mask bool[I]) of n images."""
  pv = np.asarray(out["pixel_values"], np.float32)
  return pv.reshape(n, pv.shape[0] // n, pv.shape[1]), np.ones(n, bool)


def encode(processor, text: str, images: Sequence):
  """(ids, pixel_values f32[I, Q, K], pixel_mask bool[I]) of a rendered
  chat whose `<|image_pad|>` markers are `images` (PIL), in order."""
  images = resized(processor.image_processor, images)
  out = processor(text=[text], images=images, add_special_tokens=False,
                  return_tensors="np")
  ids = tuple(int(i) for i in np.asarray(out["input_ids"])[0])
  return (ids, *_per_image(out, len(images)))


def expansion(processor, image) -> tuple[int, ...]:
  """The token ids the processor writes for one `<|image_pad|>`."""
  out = processor(text=[processor.image_token],
                  images=resized(processor.image_processor, [image]),
                  add_special_tokens=False, return_tensors="np")
  return tuple(int(t) for t in np.asarray(out["input_ids"])[0])


def pixels(image_processor, images: Sequence):
  """(pixel_values f32[I, Q, K], pixel_mask bool[I]) of PIL images."""
  imgs = resized(image_processor, images)
  return _per_image(image_processor(images=imgs, return_tensors="np"),
                    len(imgs))


def stack(per_prompt: Sequence, slots: int):
  """(pixel_values f32[B, I, Q, K], pixel_mask bool[B, I]) of B per-prompt
  `pixels` pairs or None (no image), I = `slots` (all-zero padding)."""
  q, k = next(p[0].shape[1:] for p in per_prompt if p is not None)
  pv = np.zeros((len(per_prompt), slots, q, k), np.float32)
  pm = np.zeros((len(per_prompt), slots), bool)
  for r, p in enumerate(per_prompt):
    if p is not None:
      pv[r, :len(p[0])], pm[r, :len(p[0])] = p
  return pv, pm


# ----------------------------------------------------------------------------
# Model side (jittable)


def grid_side(q: int, cfg: qwen2_vl.Qwen2VLConfig) -> int:
  """g, patches a side of an image of Q patches (a square (1, g, g) grid).

  Raises:
    ValueError unless Q is g^2 with g a multiple of spatial_merge_size.
  """
  g, m = math.isqrt(q), cfg.vision.spatial_merge_size
  if g * g != q or g % m:
    raise ValueError(f"{q} patches an image: not a square grid of a "
                     f"multiple of spatial_merge_size={m} a side")
  return g


def image_features(model, pixel_values_BIQK) -> jax.Array:
  """[B, I, S, D] features of every image slot: the vision tower on each
  image alone (vmapped over the B * I slots, padding slots too), so its
  attention costs B * I * Q^2, not (B * I * Q)^2."""
  b, i, q, k = pixel_values_BIQK.shape
  g = grid_side(q, model.cfg)
  vis = {n: jnp.asarray(a) for n, a in qwen2_vl_vision.vision_inputs(
      np.asarray([[1, g, g]]), model.cfg.vision).items()}
  f = jax.vmap(lambda pv: model.image_features(pv, vis))(
      pixel_values_BIQK.reshape(b * i, q, k))
  return f.reshape(b, i, -1, f.shape[-1])


def image_mask(model, tokens_BT, image_at=None) -> jax.Array:
  """bool[B, T] image tokens (only within `image_at`, when given)."""
  is_image = tokens_BT == model.cfg.image_token_id
  return is_image if image_at is None else is_image & image_at.astype(bool)


def prompt_embeds(model, tokens_BT, pixel_values_BIQK, pixel_mask_BI,
                  image_at=None) -> jax.Array:
  """[B, T, D] decoder inputs: token rows, each row's image features at
  its image tokens, in slot order (padding slots skipped)."""
  feats = image_features(model, pixel_values_BIQK)
  valid = (jnp.ones(feats.shape[:2], bool) if pixel_mask_BI is None
           else pixel_mask_BI.astype(bool))
  return idefics3.merge(model.text.embed_tokens(tokens_BT),
                        image_mask(model, tokens_BT, image_at), feats, valid)


def mrope_positions(is_image_BT, mask_BT, side: int) -> jax.Array:
  """i32[3, B, T] M-RoPE positions of left-padded rows whose images are
  runs of side^2 image tokens (each image's tokens row-major over its
  side x side merged grid; adjacent images may share a run).

  Text counts on by 1 (three equal positions); an image starting at p
  (the previous token's + 1) has (p, p + row, p + column) and the token
  after it p + side. Padding gets 0. Equal to `qwen2_vl.rope_index`.
  """
  real = mask_BT.astype(bool)
  img = is_image_BT.astype(bool) & real
  cnt = jnp.cumsum(img, axis=1, dtype=jnp.int32)
  start = jax.lax.cummax(jnp.where(img, 0, cnt), axis=1)
  j = jnp.where(img, (cnt - start - 1) % (side * side), 0)  # in its image
  prev = jnp.pad(img[:, :-1], ((0, 0), (1, 0)))
  step = jnp.where(prev, side, 1)
  inc = jnp.where(img & (j > 0), 0, step)
  base = jnp.cumsum(jnp.where(real, inc, 0), axis=1, dtype=jnp.int32) - 1
  base = jnp.where(real, base, 0)
  row, col = jnp.where(img, j // side, 0), jnp.where(img, j % side, 0)
  return jnp.stack([base, base + row, base + col]).astype(jnp.int32)


def prompt_positions(model, tokens_BT, mask_BT, pixel_values_BIQK,
                     image_at=None) -> jax.Array:
  """i32[3, B, T] `mrope_positions` of rows with images."""
  g = grid_side(pixel_values_BIQK.shape[2], model.cfg)
  return mrope_positions(image_mask(model, tokens_BT, image_at), mask_BT,
                         g // model.cfg.vision.spatial_merge_size)
