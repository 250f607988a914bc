"""Images and prompts for Idefics3 / SmolVLM, through transformers' own
processor classes (no torch needed: the PIL image processor and
`Idefics3Processor` run on numpy).

  proc = processor(tokenizer.hf, cfg, max_image_size=364)
  batch = preprocess(proc, ["User:<image>What is this?"], [[pil_image]])
  logits = model(batch["input_ids"], batch["pixel_values"],
                 batch["pixel_attention_mask"],
                 attention_mask=batch["attention_mask"])

The image processor resizes each image (longest edge `size`), splits it
into tiles of `max_image_size` plus a downscaled global view (when
`do_image_splitting`), normalises, and pads the tiles of a batch into
pixel_values [B, I, 3, Y, X] with all-zero padding slots and a
pixel_attention_mask [B, I, Y, X]. The processor writes each `<image>` of a
prompt out as transformers does: per tile `<fake_token_around_image>`,
`<row_i_col_j>` and S `<image>` tokens, then the global view with
`<global-img>` (`Idefics3Processor.replace_image_token`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from purld_jax.models import idefics3


def image_processor(*, max_image_size: int | None = None,
                    longest_edge: int | None = None, **kwargs):
  """transformers' `Idefics3ImageProcessorPil`.

  Args:
    max_image_size: tile side (the vision tower's `image_size`).
    longest_edge: images are first resized to this longest edge (default
      4 tiles' worth, as transformers).
    **kwargs: other image-processor settings (do_image_splitting, ...).
  """
  from transformers.models.idefics3 import image_processing_pil_idefics3 as m
  if max_image_size is not None:
    kwargs["max_image_size"] = {"longest_edge": int(max_image_size)}
    if longest_edge is None:
      longest_edge = 4 * int(max_image_size)
  if longest_edge is not None:
    kwargs["size"] = {"longest_edge": int(longest_edge)}
  return m.Idefics3ImageProcessorPil(**kwargs)


def processor(tokenizer, cfg: idefics3.Idefics3Config, image_proc=None):
  """transformers' `Idefics3Processor` over a Hugging Face tokenizer.

  The image processor defaults to tiles of the vision tower's
  `image_size`. Note: transformers adds its special tokens to `tokenizer`
  (they must already be in the vocabulary).

  Raises:
    ValueError when the tokenizer's `<image>` id is not the config's
    `image_token_id`.
  """
  from transformers.models.idefics3.processing_idefics3 import (
      Idefics3Processor)
  if image_proc is None:
    image_proc = image_processor(max_image_size=cfg.vision.image_size)
  proc = Idefics3Processor(image_processor=image_proc, tokenizer=tokenizer,
                           image_seq_len=cfg.image_seq_len)
  if proc.image_token_id != cfg.image_token_id:
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: <image> is "
        f"id {proc.image_token_id}, config.json image_token_id is "
        f"{cfg.image_token_id}")
  return proc


def load_processor(path, cfg: idefics3.Idefics3Config):
  """`processor` from a model directory: its tokenizer and, when present,
  its preprocessor_config.json."""
  import pathlib
  import transformers
  from transformers.models.idefics3 import image_processing_pil_idefics3 as m
  tok = transformers.AutoTokenizer.from_pretrained(str(path))
  image_proc = None
  if (pathlib.Path(path) / "preprocessor_config.json").is_file():
    image_proc = m.Idefics3ImageProcessorPil.from_pretrained(str(path))
  return processor(tok, cfg, image_proc)


def preprocess(proc, texts: Sequence[str], images: Sequence[Sequence],
               *, padding_side: str = "left", **kwargs) -> dict:
  """numpy model inputs of B prompts and their images (row b: the images
  of text b's `<image>` markers, in order).

  Returns:
    {"input_ids": i32[B, T], "attention_mask": bool[B, T],
     "pixel_values": f32[B, I, 3, Y, X],
     "pixel_attention_mask": bool[B, I, Y, X]} (no pixel keys without
    images); rows are padded on `padding_side`.
  """
  out = proc(text=list(texts), images=[list(r) for r in images] or None,
             padding=True, padding_side=padding_side, return_tensors="np",
             **kwargs)
  res = {"input_ids": np.asarray(out["input_ids"], np.int32),
         "attention_mask": np.asarray(out["attention_mask"]).astype(bool)}
  if "pixel_values" in out:
    res["pixel_values"] = np.asarray(out["pixel_values"], np.float32)
    res["pixel_attention_mask"] = np.asarray(
        out["pixel_attention_mask"]).astype(bool)
  return res
