"""Vision-language students (Idefics3 / SmolVLM, models/idefics3.py): prompts
with images through the same sampler, scorer and trainers as text.

Axis letters: B prompts, P prompt tokens, I image slots per prompt (tiles of
the processor; all-zero slots are padding), C Y X channels and pixels, D
width.

A prompt's images (`Prompt.images`, encoded PNG/JPEG bytes) belong to its
last user message and are rendered before its text. Host side, the
Idefics3 processor writes each image out as its tile tokens (S `<image>`
tokens per tile, plus the row/column and global tags) and gives the tiles'
pixels (`encode_prompt`); a batch stacks them into pixel_values
[B, I, C, Y, X] and pixel_mask [B, I, Y, X], I rounded up (`image_slots`)
with all-zero slots (`stack_images`).

Model side, the images are part of the prompt prefix: `prompt_embeds` runs
the vision tower once per prompt row and merges the features into the
prompt's embeddings, which the sampler and the scorer prefill once
(`Llama.extend(embeds=)`); the K candidates / M responses of a prompt then
attend to that prefix exactly as to a text prompt's. A text model (a
`Llama`) is its own decoder (`decoder`): the text path is untouched.

Qwen2.5-VL students (`qwen2_vl.Qwen2VL`) take the same path through
vision_qwen.py: fixed-size images stacked as pixel_values [B, I, Q, K]
(patches) and pixel_mask [B, I], and M-RoPE positions for the prompt rows
(`prompt_positions`; None for Idefics3 and text, whose positions are the
default ones).
"""

from __future__ import annotations

import hashlib
import io
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from purld_jax import vision_qwen
from purld_jax.models import idefics3


def is_vlm(model) -> bool:
  """True for a vision-language model (an `idefics3.Idefics3` or a
  `qwen2_vl.Qwen2VL`)."""
  return isinstance(model, idefics3.Idefics3) or vision_qwen.is_qwen(model)


def decoder(model):
  """The text decoder (`llama.Llama`) of `model`: itself for a text model,
  `.text` for a vision-language one."""
  return model.text if is_vlm(model) else model


def prompt_embeds(model, tokens_BT, pixel_values, pixel_mask=None,
                  image_at=None) -> jax.Array:
  """[B, T, D] decoder inputs of rows whose prompts hold images: token
  rows, with the image features (vision tower + connector, run once per
  row: [B, I] tiles) at the image tokens, in order (`idefics3.merge`).

  Args:
    model: an `idefics3.Idefics3`.
    tokens_BT: i32[B, T] rows (a prompt, or prompt + response).
    pixel_values: f32[B, I, C, Y, X]; all-zero slots are padding.
    pixel_mask: [B, I, Y, X] real pixels; default all.
    image_at: bool[B, T] where image tokens may be (the prompt's columns);
      default everywhere. An image token id sampled into a response is then
      an ordinary token, as the sampler fed it.
  """
  if not is_vlm(model):
    raise ValueError("images given to a text model (a Llama has no vision "
                     "tower)")
  if vision_qwen.is_qwen(model):
    return vision_qwen.prompt_embeds(model, tokens_BT, pixel_values,
                                     pixel_mask, image_at)
  feats, valid = model.image_features(pixel_values, pixel_mask)
  is_image = tokens_BT == model.cfg.image_token_id
  if image_at is not None:
    is_image = is_image & image_at.astype(bool)
  return idefics3.merge(model.text.embed_tokens(tokens_BT), is_image, feats,
                        valid)


def prompt_positions(model, tokens_BT, mask_BT, pixel_values, image_at=None):
  """i32[3, B, T] M-RoPE positions of a Qwen2.5-VL model's rows with images
  (`vision_qwen.prompt_positions`; `image_at` as `prompt_embeds`); None
  for other models or without images (the default positions hold)."""
  if pixel_values is None or not vision_qwen.is_qwen(model):
    return None
  return vision_qwen.prompt_positions(model, tokens_BT, mask_BT,
                                      pixel_values, image_at)


# ----------------------------------------------------------------------------
# Host side: prompts -> tokens and pixels


def chat_messages(prompt) -> list[dict]:
  """`prompt`'s messages as chat dicts; with images, the last user
  message's content is a list of parts: one {"type": "image"} per image,
  then {"type": "text"} (the SmolVLM / Idefics3 chat templates' form)."""
  return with_image_parts(prompt.as_dicts(), len(getattr(prompt, "images",
                                                         ())))


def with_image_parts(messages, n: int, at: int = 0) -> list[dict]:
  """Chat dicts (string contents) with `n` image parts put before the last
  user message's text (`chat_messages`' form), or after its first `at`
  characters (a judge row: where the prompt's text begins in the
  template); as they are when n = 0."""
  out = [dict(m) for m in messages]
  if not n:
    return out
  last = max(i for i, m in enumerate(out) if m["role"] == "user")
  text = out[last]["content"]
  head = [{"type": "text", "text": text[:at]}] if at else []
  out[last] = dict(out[last], content=head + [{"type": "image"}] * n + [
      {"type": "text", "text": text[at:]}])
  return out


class PromptImages:
  """The images of a batch of B prompts, for rows that rebuild the prompts
  from a template (the ranking schemes that run model rows: anchor_recon,
  pmi, judge, self_reward, pairwise_judge): each row is its prompt's
  conversation with the user turn rewritten, its images still in front of
  the last user message's text (a judge row: in front of the prompt's text
  inside the template), written out as the same tile tokens as the
  prompt's own (`encode_chat`); the rows of prompt b are scored with that
  prompt's pixels (`pixel_values[b]`).

  Attributes:
    expansions: B lists (one per image) of the token ids the processor
      writes for that image (its tile tags and `<image>` tokens).
    pixel_values: f32[B, I, C, Y, X]; pixel_mask: bool[B, I, Y, X] (the
      batch's, `data.PromptBatch`).
    image_token_id: the `<image>` id.
  """

  def __init__(self, processor, prompts, pixel_values, pixel_mask):
    self.image_token_id = int(processor.image_token_id)
    self.pixel_values, self.pixel_mask = pixel_values, pixel_mask
    self.expansions = [[list(image_expansion(processor, p, i))
                        for i in range(len(getattr(p, "images", ())))]
                       for p in prompts]

  def image_tokens(self, b: int) -> int:
    """How many `<image>` tokens prompt b's images are written as."""
    return sum(e.count(self.image_token_id) for e in self.expansions[b])

  def encode_chat(self, tok, b: int, messages, at: int = 0) -> list[int]:
    """Token ids of `messages` (prompt b's conversation, rewritten, string
    contents) with prompt b's images before the last user message's text
    (after its first `at` characters: `with_image_parts`): the chat
    rendered with one `<image>` marker per image, each marker then
    replaced by that image's tile tokens (what the processor writes; special
    tokens are split before anything else is tokenized, so the text around
    them tokenizes the same)."""
    exp = self.expansions[b]
    ids = tok.encode(tok.render_chat(with_image_parts(messages, len(exp),
                                                      at)))
    out, i = [], 0
    for t in ids:
      if t == self.image_token_id and i < len(exp):
        out.extend(exp[i])
        i += 1
      else:
        out.append(t)
    if i != len(exp):
      raise ValueError(f"the chat template wrote {i} image markers for "
                       f"{len(exp)} images")
    return out


# processor -> {sha256 of an image's bytes: its expansion}
_EXPANSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def image_expansion(processor, prompt, i: int) -> tuple[int, ...]:
  """The token ids `processor` writes for image i of `prompt` (its tile
  tags and `<image>` tokens), remembered per processor and image bytes: a
  training run expands each distinct image once, not once a step."""
  memo = _EXPANSIONS.setdefault(processor, {})
  key = hashlib.sha256(prompt.images[i]).digest()
  if key not in memo:
    img = pil_images(prompt)[i]
    if vision_qwen.is_qwen_processor(processor):
      memo[key] = vision_qwen.expansion(processor, img)
      return memo[key]
    out = processor(text=[processor.image_token], images=[[img]],
                    add_special_tokens=False, return_tensors="np")
    memo[key] = tuple(int(t) for t in np.asarray(out["input_ids"])[0])
  return memo[key]


def pil_images(prompt) -> list:
  """The prompt's images decoded (PIL, RGB)."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  out = []
  for i, data in enumerate(prompt.images):
    try:
      img = PIL.Image.open(io.BytesIO(data))
      img.load()
    except Exception as e:  # PIL raises several kinds
      raise ValueError(f"prompt {prompt.id!r}: image {i} cannot be decoded "
                       f"({type(e).__name__}: {e})") from e
    out.append(img.convert("RGB"))
  return out


def encode_prompt(processor, tok, prompt):
  """(ids, pixel_values f32[I, C, Y, X], pixel_mask bool[I, Y, X]) of a
  prompt with images: the chat rendered by the student's tokenizer (the
  generation prompt included), each `<image>` expanded by the processor
  into its tile tokens; (ids, None, None) without images. A Qwen2.5-VL
  processor gives pixel_values f32[I, Q, K], pixel_mask bool[I]
  (`vision_qwen.encode`)."""
  if not getattr(prompt, "images", ()):
    return tuple(tok.encode_chat(prompt.as_dicts())), None, None
  if processor is None:
    raise ValueError(f"prompt {prompt.id!r} has images but the student has "
                     "no image processor (a text model?)")
  text = tok.render_chat(chat_messages(prompt))
  if vision_qwen.is_qwen_processor(processor):
    return vision_qwen.encode(processor, text, pil_images(prompt))
  out = processor(text=[text], images=[pil_images(prompt)],
                  add_special_tokens=False, return_tensors="np")
  ids = tuple(int(i) for i in np.asarray(out["input_ids"])[0])
  pv = np.asarray(out["pixel_values"], np.float32)[0]
  pm = np.asarray(out["pixel_attention_mask"]).astype(bool)[0]
  return ids, pv, pm


def image_slots(n: int) -> int:
  """I for a batch whose prompts hold at most n tiles: 1, 2 or 4, then the
  next multiple of 4. Few distinct shapes (few compiles) and at most 3
  all-zero tiles through the vision tower: SmolVLM's 4 x 4 + 1 = 17 tiles
  take 20 slots, not the 32 of the next power of two."""
  if n <= 4:
    return 1 << max(n - 1, 0).bit_length()
  return -(-n // 4) * 4


def stack_images(pixels: Sequence, image_size: int):
  """(pixel_values f32[B, I, 3, Y, X], pixel_mask bool[B, I, Y, X]) from B
  per-prompt (pv [I_b, 3, y, x], pm [I_b, y, x]) pairs or None (no image);
  tiles padded with zeros to Y = X = `image_size`, slots to
  I = `image_slots(max I_b)`. None when no prompt has an image."""
  if all(p is None for p in pixels):
    return None, None
  i = image_slots(max(p[0].shape[0] for p in pixels if p is not None))
  b = len(pixels)
  pv = np.zeros((b, i, 3, image_size, image_size), np.float32)
  pm = np.zeros((b, i, image_size, image_size), bool)
  for r, p in enumerate(pixels):
    if p is None:
      continue
    v, m = p
    n, _, y, x = v.shape
    if y > image_size or x > image_size:
      raise ValueError(f"a {y} x {x} tile is larger than the vision tower's "
                       f"{image_size} x {image_size}")
    pv[r, :n, :, :y, :x] = v
    pm[r, :n, :y, :x] = m
  return pv, pm


def prompt_pixels(image_processor, prompt):
  """(pixel_values f32[I, C, Y, X], pixel_mask bool[I, Y, X]) of the
  prompt's images, as `encode_prompt` gives them; None without images."""
  if not getattr(prompt, "images", ()):
    return None
  out = image_processor(images=[pil_images(prompt)], return_tensors="np")
  return (np.asarray(out["pixel_values"], np.float32)[0],
          np.asarray(out["pixel_attention_mask"]).astype(bool)[0])


def tile_size(image_processor) -> int:
  """The side of the processor's tiles (the vision tower's image_size)."""
  return int(image_processor.max_image_size["longest_edge"])


def pixels_of(image_processor, prompts) -> tuple:
  """`stack_images` of the prompts' images (None, None when none has any)."""
  if image_processor is None or not any(
      getattr(p, "images", ()) for p in prompts):
    return None, None
  if vision_qwen.is_qwen_processor(image_processor):
    per = [vision_qwen.pixels(image_processor, pil_images(p))
           if getattr(p, "images", ()) else None for p in prompts]
    return vision_qwen.stack(per, image_slots(max(
        len(p[0]) for p in per if p is not None)))
  return stack_images([prompt_pixels(image_processor, p) for p in prompts],
                      tile_size(image_processor))


def as_jnp(x):
  """jnp array of x, None kept."""
  return None if x is None else jnp.asarray(x)
