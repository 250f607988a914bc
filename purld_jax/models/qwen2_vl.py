"""Qwen2.5-VL: the vision tower (qwen2_vl_vision.py) and the Qwen2 decoder
(models/llama.py) with multimodal RoPE, in Flax NNX.

Axis letters: B batch, T tokens, N images, Q patches of all N images
packed (the processor's order), K values of one patch, S = Q / m^2 image
tokens of all images, D text width, V vocab.

M-RoPE: every token has three positions i32[3, B, T] (temporal, height,
width); the decoder's `cfg.mrope_section` says which rotary frequencies
follow which (layers.rope_angles). Text tokens have three equal positions,
counting on from the previous token; the h' x w' tokens of an image
starting at p have (p, p + row, p + column), and the text after it goes on
from the largest of them plus one (`rope_index`, transformers'
`get_rope_index` for images). Padding (left) gets position 0.

Host-side (numpy) steps come first, from the processor's output
(qwen2_vl_processing.py):

  vis = qwen2_vl_vision.vision_inputs(image_grid_thw, cfg.vision)
  positions_3BT = rope_index(input_ids, attention_mask, image_grid_thw, cfg)
  logits = model(input_ids, pixel_values, vis, positions=positions_3BT,
                 attention_mask=attention_mask)

or in separate jittable steps, for a cached prefill and decoding:

  feats_SD = model.image_features(pixel_values, vis)
  x_BTD = model.embed(input_ids, feats_SD)
  logits, cache = model.text.extend(None, cache, positions=positions_3BT,
                                    attention_mask=..., embeds=x_BTD)

A decoded token's three positions are all the row's `next_position` (then
+1 a step). The k-th image token of the batch (row-major over B, T) takes
row k of the features (transformers' masked scatter): the prompt must hold
each image's S_i tokens in order (`check_image_tokens`).

Checkpoints: qwen2_vl_hf.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from purld_jax.models import hf_config
from purld_jax.models import llama
from purld_jax.models import qwen2_vl_vision

SUPPORTED = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
_MROPE_DEFAULT = (16, 24, 24)  # transformers' default mrope_section


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig:
  """A vision-language model: vision tower with merger, decoder."""

  vision: qwen2_vl_vision.VisionConfig
  text: llama.LlamaConfig
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  model_type: str = "qwen2_5_vl"

  @property
  def lora(self):
    """The decoder's LoRA spec (None: trained whole)."""
    return self.text.lora

  @classmethod
  def from_hf(cls, hf: dict, *, source: str = "config.json",
              param_dtype=jnp.float32, dtype=jnp.float32) -> "Qwen2VLConfig":
    """From a qwen2_5_vl config.json dict: text fields in `text_config`
    (transformers 5) or at the top level (older checkpoints).

    Raises:
      hf_config.ConfigError naming `source` and the field.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
      raise hf_config.ConfigError(
          f"{source}: model_type={model_type!r} is not supported "
          f"(supported: {', '.join(sorted(SUPPORTED))})")
    if not isinstance(hf.get("vision_config"), dict):
      raise hf_config.ConfigError(f"{source}: required field 'vision_config' "
                                  "is missing or not an object")
    vision = qwen2_vl_vision.VisionConfig.from_hf(
        hf["vision_config"], source=source, param_dtype=param_dtype,
        dtype=dtype)
    nested = isinstance(hf.get("text_config"), dict)
    text_hf = dict(hf["text_config"] if nested else hf)
    where = "text_config." if nested else ""
    text_hf["model_type"] = "qwen2"  # q/k/v biases, no o bias
    rope = dict(text_hf.get("rope_parameters") or text_hf.get("rope_scaling")
                or {})
    section = tuple(rope.pop("mrope_section", _MROPE_DEFAULT))
    if rope.get("type") == "mrope" or rope.get("rope_type") == "mrope":
      rope.pop("type", None)
      rope["rope_type"] = "default"
    text_hf.pop("rope_scaling", None)
    text_hf["rope_parameters"] = rope
    text = llama.LlamaConfig.from_hf(
        text_hf, source=f"{source} (text_config)" if nested else source,
        param_dtype=param_dtype, dtype=dtype)
    if text.head_dim * text.num_heads != text.hidden_size:
      raise hf_config.ConfigError(
          f"{source}: {where}head_dim={text.head_dim} is not hidden_size / "
          "num_attention_heads (transformers ignores it for qwen2_5_vl)")
    if (len(section) != 3 or not all(isinstance(s, int) for s in section)
        or sum(section) != text.head_dim // 2):
      raise hf_config.ConfigError(
          f"{source}: {where}rope_parameters.mrope_section={list(section)} "
          f"is not 3 ints summing to head_dim / 2 = {text.head_dim // 2}")
    if vision.out_hidden_size != text.hidden_size:
      raise hf_config.ConfigError(
          f"{source}: vision_config.out_hidden_size="
          f"{vision.out_hidden_size} is not the text hidden_size "
          f"{text.hidden_size}")
    tie = bool(hf.get("tie_word_embeddings")
               or text_hf.get("tie_word_embeddings"))
    text = text.replace(mrope_section=section, tie_word_embeddings=tie)
    ids = {}
    for key, default in (("image_token_id", 151655),
                         ("video_token_id", 151656),
                         ("vision_start_token_id", 151652),
                         ("vision_end_token_id", 151653)):
      v = hf.get(key, default)
      if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise hf_config.ConfigError(f"{source}: {key}={v!r} is not a token "
                                    "id")
      ids[key] = v
    if ids["image_token_id"] >= text.vocab_size:
      raise hf_config.ConfigError(
          f"{source}: image_token_id={ids['image_token_id']} is not a token "
          f"id of the text vocabulary ({text.vocab_size})")
    return cls(vision=vision, text=text, model_type=model_type, **ids)

  def to_hf(self, *, torch_dtype: str = "float32",
            extra: dict | None = None) -> dict:
    """A config.json dict (transformers 5 layout) transformers reads back
    as this model."""
    text = hf_config.to_hf(self.text, torch_dtype=torch_dtype, extra=extra)
    for key in ("architectures", "head_dim", "tie_word_embeddings"):
      text.pop(key, None)
    text["model_type"] = f"{self.model_type}_text"
    text["rope_parameters"] = dict(text["rope_parameters"],
                                   mrope_section=list(self.text.mrope_section))
    return dict(architectures=[SUPPORTED[self.model_type]],
                model_type=self.model_type,
                image_token_id=self.image_token_id,
                video_token_id=self.video_token_id,
                vision_start_token_id=self.vision_start_token_id,
                vision_end_token_id=self.vision_end_token_id,
                tie_word_embeddings=self.text.tie_word_embeddings,
                vision_config=dict(self.vision.to_hf(),
                                   model_type=f"{self.model_type}_vision"),
                text_config=text, torch_dtype=torch_dtype, dtype=torch_dtype)


# ----------------------------------------------------------------------------
# Host-side positions (numpy)


def rope_index(input_ids_BT, attention_mask_BT, image_grid_thw_N3,
               cfg: Qwen2VLConfig) -> np.ndarray:
  """i32[3, B, T] M-RoPE positions of a batch of prompts with images.

  The images (rows of the grid) belong to the batch's runs of image tokens
  in row-major order, image i taking the next t * h * w / m^2 of them.
  Padding (attention_mask False) gets 0.

  Raises:
    ValueError when the image tokens and the grids do not match.
  """
  ids = np.asarray(input_ids_BT)
  b, t = ids.shape
  mask = (np.ones((b, t), bool) if attention_mask_BT is None
          else np.asarray(attention_mask_BT).astype(bool))
  grids = (np.zeros((0, 3), np.int64) if image_grid_thw_N3 is None
           else np.asarray(image_grid_thw_N3, np.int64).reshape(-1, 3))
  m = cfg.vision.spatial_merge_size
  out = np.zeros((3, b, t), np.int64)
  img = 0
  for r in range(b):
    row = ids[r][mask[r]]
    starts = np.flatnonzero(row == cfg.image_token_id)
    pos, i, p = [], 0, 0
    while i < len(row):
      k = np.searchsorted(starts, i)
      j = int(starts[k]) if k < len(starts) else len(row)
      if j > i:  # text: three equal positions, counting on
        pos.append(np.broadcast_to(np.arange(p, p + j - i), (3, j - i)))
        i, p = j, p + j - i
        continue
      if img >= len(grids):
        raise ValueError(f"row {r}: more image tokens than image grids "
                         f"({len(grids)})")
      gt, gh, gw = grids[img]
      gh, gw = gh // m, gw // m
      n = gt * gh * gw
      if not (row[i:i + n] == cfg.image_token_id).all() or i + n > len(row):
        raise ValueError(f"row {r}: image {img} needs {n} image tokens "
                         f"(id {cfg.image_token_id}) in a run")
      tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw),
                               indexing="ij")
      pos.append(np.stack([tt, hh, ww]).reshape(3, -1) + p)
      i, p, img = i + n, p + max(gh, gw), img + 1
    if pos:
      out[:, r, mask[r]] = np.concatenate(pos, axis=1)
  if img != len(grids):
    raise ValueError(f"{len(grids)} image grids for {img} images in the "
                     "prompts")
  return out.astype(np.int32)


def next_position(positions_3BT) -> jax.Array:
  """i32[B]: the position of each row's next token (largest + 1)."""
  return jnp.max(jnp.asarray(positions_3BT), axis=(0, 2)) + 1


def check_image_tokens(tokens_BT, image_grid_thw_N3, cfg: Qwen2VLConfig
                       ) -> None:
  """Raises ValueError unless the batch holds as many image tokens as the
  images have merged patches (host-side)."""
  n_tok = int((np.asarray(tokens_BT) == cfg.image_token_id).sum())
  grids = np.asarray(image_grid_thw_N3, np.int64).reshape(-1, 3)
  n_feat = int(grids.prod(-1).sum()) // cfg.vision.spatial_merge_size ** 2
  if n_tok != n_feat:
    raise ValueError(f"{n_tok} image tokens (id {cfg.image_token_id}) for "
                     f"{len(grids)} images of {n_feat} tokens in all")


def merge(x_BTD, is_image_BT, features_SD) -> jax.Array:
  """[B, T, D]: `x` with the k-th image position (row-major over B, T)
  replaced by features row k."""
  b, t, d = x_BTD.shape
  flat = is_image_BT.reshape(-1)
  k = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0,
               features_SD.shape[0] - 1)
  rows = jnp.take(features_SD, k, axis=0).astype(x_BTD.dtype)
  return jnp.where(flat[:, None], rows, x_BTD.reshape(b * t, d)
                   ).reshape(b, t, d)


# ----------------------------------------------------------------------------
# The model


class Qwen2VL(nnx.Module):
  """Vision tower and decoder; see the module docstring."""

  def __init__(self, cfg: Qwen2VLConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vision = qwen2_vl_vision.VisionTower(cfg.vision, rngs=rngs)
    self.text = llama.Llama(cfg.text, rngs=rngs)

  def image_features(self, pixel_values_QK, vision_inputs: dict):
    """[S, D] image-token embeddings in the decoder's dtype.

    Args:
      pixel_values_QK: the processor's flattened patches of N images.
      vision_inputs: `qwen2_vl_vision.vision_inputs` of their grids.
    """
    f = self.vision(pixel_values_QK, vision_inputs["rows_cols"],
                    vision_inputs["frames"], vision_inputs["windows"])
    return f.astype(self.cfg.text.dtype)

  def embed(self, tokens, features=None):
    """[B, T, D] decoder inputs: token rows, image features at the image
    tokens (`merge`). Without features: the tokens' rows only."""
    x = self.text.embed_tokens(tokens)
    if features is None:
      return x
    return merge(x, tokens == self.cfg.image_token_id, features)

  def hidden(self, tokens, pixel_values=None, vision_inputs=None, *,
             positions=None, attention_mask=None):
    """Final-norm hidden states [B, T, D] of a plain forward."""
    feats = None
    if pixel_values is not None:
      if positions is None:
        raise ValueError("a prompt with images needs its M-RoPE positions "
                         "(qwen2_vl.rope_index)")
      feats = self.image_features(pixel_values, vision_inputs)
    return self.text.hidden(embeds=self.embed(tokens, feats),
                            positions=positions,
                            attention_mask=attention_mask)

  def __call__(self, tokens, pixel_values=None, vision_inputs=None, *,
               positions=None, attention_mask=None):
    """Logits f32[B, T, V] of a plain (uncached) forward.

    Args:
      tokens: i32[B, T] with each image's tokens in order.
      pixel_values: f32[Q, K] patches of the batch's images, or None.
      vision_inputs: `qwen2_vl_vision.vision_inputs` of their grids.
      positions: i32[3, B, T] (`rope_index`); without images also None
        (left padding: positions count real tokens from 0) or i32[B, T].
      attention_mask: bool[B, T], False on padding.
    """
    return self.text.logits(self.hidden(
        tokens, pixel_values, vision_inputs, positions=positions,
        attention_mask=attention_mask))
