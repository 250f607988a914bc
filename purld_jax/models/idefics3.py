"""Idefics3 / SmolVLM: SigLIP vision tower, pixel-shuffle connector, and the
Llama decoder (models/llama.py), in Flax NNX.

Axis letters: B batch, T tokens, I image slots per row (tiles of the
processor; all-zero slots are padding), C Y X channels and pixels, Q
patches of one image, S = Q / scale^2 image tokens per image, E vision
width, D text width, V vocab.

Three pure steps, so that a caller can run the vision tower and the prefill
once per prompt and decode many continuations from the cache:

  feats_BISD, valid_BI = model.image_features(pixel_values, pixel_mask)
  x_BTD = model.embed(tokens, feats_BISD, valid_BI)
  logits, cache = model.text.extend(None, cache, positions=...,
                                    attention_mask=..., embeds=x_BTD)

`model(tokens, pixel_values, pixel_mask, attention_mask=...)` chains them
for a plain forward. The k-th image token of a row takes the k-th feature
row of that row's real images in slot order (transformers'
`inputs_merger`, a masked scatter): the prompt must hold exactly S image
tokens per real image (`check_image_tokens`); the processor builds such
prompts (idefics3_processing.py).

Padding image slots (all pixels zero) go through the vision tower too
(static shapes: transformers drops them first; the real images' features
are the same either way, the padding ones are never read).

Checkpoints: idefics3_hf.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from purld_jax.models import hf_config
from purld_jax.models import layers
from purld_jax.models import llama
from purld_jax.models import siglip

SUPPORTED = {"idefics3": "Idefics3ForConditionalGeneration",
             "smolvlm": "SmolVLMForConditionalGeneration"}


@dataclasses.dataclass(frozen=True)
class Idefics3Config:
  """A vision-language model: vision tower, connector, decoder."""

  vision: siglip.VisionConfig
  text: llama.LlamaConfig
  scale_factor: int = 2
  image_token_id: int = 128257
  model_type: str = "idefics3"

  @property
  def lora(self):
    """The decoder's LoRA spec (`Student.cfg.lora`); always None here:
    vision-language students train without adapters."""
    return self.text.lora

  @property
  def image_seq_len(self) -> int:
    """S, tokens per image (per tile)."""
    return (self.vision.patches_per_side // self.scale_factor) ** 2

  @classmethod
  def from_hf(cls, hf: dict, *, source: str = "config.json",
              param_dtype=jnp.float32, dtype=jnp.float32) -> "Idefics3Config":
    """From an idefics3 / smolvlm config.json dict.

    Raises:
      hf_config.ConfigError naming `source` and the field.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
      raise hf_config.ConfigError(
          f"{source}: model_type={model_type!r} is not supported "
          f"(supported: {', '.join(sorted(SUPPORTED))})")
    sub = {}
    for key in ("vision_config", "text_config"):
      if not isinstance(hf.get(key), dict):
        raise hf_config.ConfigError(f"{source}: required field {key!r} is "
                                    "missing or not an object")
      sub[key] = hf[key]
    vision = siglip.VisionConfig.from_hf(sub["vision_config"], source=source,
                                         param_dtype=param_dtype, dtype=dtype)
    text_hf = dict(sub["text_config"])
    text_hf.setdefault("model_type", "llama")
    text = llama.LlamaConfig.from_hf(
        text_hf, source=f"{source} (text_config)", param_dtype=param_dtype,
        dtype=dtype).replace(
            # the top-level flag is the one transformers ties lm_head by
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    scale = hf.get("scale_factor", 2)
    if (not isinstance(scale, int) or scale < 1
        or vision.patches_per_side % scale):
      raise hf_config.ConfigError(
          f"{source}: scale_factor={scale!r} does not divide the "
          f"{vision.patches_per_side} patches per side")
    token = hf.get("image_token_id", 128257)
    if not isinstance(token, int) or not 0 <= token < text.vocab_size:
      raise hf_config.ConfigError(
          f"{source}: image_token_id={token!r} is not a token id of the "
          f"text vocabulary ({text.vocab_size})")
    return cls(vision=vision, text=text, scale_factor=scale,
               image_token_id=token, model_type=model_type)

  def to_hf(self, *, torch_dtype: str = "float32",
            extra: dict | None = None) -> dict:
    """A config.json dict that transformers reads back as this model."""
    text = hf_config.to_hf(self.text, torch_dtype=torch_dtype, extra=extra)
    text.pop("architectures", None)
    return dict(architectures=[SUPPORTED[self.model_type]],
                model_type=self.model_type,
                image_token_id=self.image_token_id,
                scale_factor=self.scale_factor,
                tie_word_embeddings=self.text.tie_word_embeddings,
                vision_config=dict(self.vision.to_hf(),
                                   model_type=f"{self.model_type}_vision"),
                text_config=text, torch_dtype=torch_dtype, dtype=torch_dtype)


# ----------------------------------------------------------------------------
# Pure functions


def pixel_shuffle(x_NQE: jax.Array, scale: int) -> jax.Array:
  """[N, Q / scale^2, E * scale^2]: each scale x scale block of the
  sqrt(Q) x sqrt(Q) patch grid stacked into one vector (transformers'
  `Idefics3Connector.pixel_shuffle`, step for step)."""
  n, q, e = x_NQE.shape
  side = int(round(q ** 0.5))
  if side * side != q or side % scale:
    raise ValueError(f"pixel_shuffle: {q} patches are not a square grid "
                     f"divisible by scale {scale}")
  x = x_NQE.reshape(n, side, side // scale, e * scale)
  x = x.transpose(0, 2, 1, 3)
  x = x.reshape(n, side // scale, side // scale, e * scale * scale)
  x = x.transpose(0, 2, 1, 3)
  return x.reshape(n, q // (scale * scale), e * scale * scale)


def real_images(pixel_values_BICYX) -> jax.Array:
  """bool[B, I]: image slots with any nonzero pixel (the others are
  padding, as in transformers)."""
  return jnp.any(pixel_values_BICYX != 0, axis=(2, 3, 4))


def merge(x_BTD, is_image_BT, features_BISD, valid_BI) -> jax.Array:
  """[B, T, D]: `x` with the k-th image position of each row replaced by
  row k of that row's real images' features (flattened in slot order)."""
  b, i, s, d = features_BISD.shape
  k = jnp.cumsum(is_image_BT.astype(jnp.int32), axis=1) - 1
  order = jnp.argsort(~valid_BI, axis=1, stable=True)  # real slots first
  slot = jnp.take_along_axis(order, jnp.clip(k // s, 0, i - 1), axis=1)
  src = slot * s + jnp.clip(k, 0) % s
  rows = jnp.take_along_axis(features_BISD.reshape(b, i * s, d),
                             src[..., None], axis=1)
  return jnp.where(is_image_BT[..., None], rows.astype(x_BTD.dtype), x_BTD)


def check_image_tokens(tokens_BT, pixel_values_BICYX, cfg: Idefics3Config
                       ) -> None:
  """Raises ValueError unless every row holds S image tokens per real
  image (host-side; the model itself cannot check under jit)."""
  tokens = np.asarray(tokens_BT)
  n_tok = (tokens == cfg.image_token_id).sum(1)
  n_img = np.asarray(real_images(jnp.asarray(pixel_values_BICYX))).sum(1)
  bad = np.nonzero(n_tok != n_img * cfg.image_seq_len)[0]
  if bad.size:
    r = int(bad[0])
    raise ValueError(
        f"row {r}: {int(n_tok[r])} image tokens (id {cfg.image_token_id}) "
        f"for {int(n_img[r])} images of {cfg.image_seq_len} tokens each")


# ----------------------------------------------------------------------------
# The model


class Idefics3(nnx.Module):
  """Vision tower, connector and decoder; see the module docstring."""

  def __init__(self, cfg: Idefics3Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    s2 = cfg.scale_factor ** 2
    self.vision = siglip.SiglipVision(cfg.vision, rngs=rngs)
    # modality_projection: bias-free [E * scale^2, D]
    self.connector = layers.param(
        rngs, (cfg.vision.hidden_size * s2, cfg.text.hidden_size),
        ("vision_shuffled", "embed"), cfg.text.param_dtype)
    self.text = llama.Llama(cfg.text, rngs=rngs)

  def image_features(self, pixel_values, pixel_mask=None):
    """(features [B, I, S, D] in the decoder's dtype, valid bool[B, I]).

    Args:
      pixel_values: f32[B, I, C, Y, X] as the processor gives them.
      pixel_mask: [B, I, Y, X], nonzero on real pixels; default all.
    """
    b, i, c, y, x = pixel_values.shape
    p = self.cfg.vision.patch_size
    valid = real_images(pixel_values)
    pix = pixel_values.reshape(b * i, c, y, x)
    if pixel_mask is None:
      pmask = jnp.ones((b * i, y // p, x // p), bool)
    else:
      pmask = siglip.patch_mask(pixel_mask.reshape(b * i, y, x), p)
    h = self.vision(pix, pmask)
    h = pixel_shuffle(h, self.cfg.scale_factor)
    dt = self.cfg.text.dtype
    f = h.astype(dt) @ self.connector.value.astype(dt)
    return f.reshape(b, i, f.shape[1], f.shape[2]), valid

  def embed(self, tokens, features=None, valid=None):
    """[B, T, D] decoder inputs: token rows, image features at the image
    tokens (`merge`). Without features: the tokens' rows only."""
    x = self.text.embed_tokens(tokens)
    if features is None:
      return x
    if valid is None:
      valid = jnp.ones(features.shape[:2], bool)
    return merge(x, tokens == self.cfg.image_token_id, features, valid)

  def hidden(self, tokens, pixel_values=None, pixel_mask=None, *,
             positions=None, attention_mask=None):
    """Final-norm hidden states [B, T, D] of a plain forward."""
    feats = valid = None
    if pixel_values is not None:
      feats, valid = self.image_features(pixel_values, pixel_mask)
    return self.text.hidden(embeds=self.embed(tokens, feats, valid),
                            positions=positions,
                            attention_mask=attention_mask)

  def __call__(self, tokens, pixel_values=None, pixel_mask=None, *,
               positions=None, attention_mask=None):
    """Logits f32[B, T, V] of a plain (uncached) forward.

    Args:
      tokens: i32[B, T] with S image tokens per real image.
      pixel_values: f32[B, I, C, Y, X] or None (text only).
      pixel_mask: [B, I, Y, X] real pixels (`pixel_attention_mask`).
      positions, attention_mask: as `llama.Llama.__call__` (left padding:
        positions count real tokens from 0).
    """
    return self.text.logits(self.hidden(
        tokens, pixel_values, pixel_mask, positions=positions,
        attention_mask=attention_mask))
