"""Images and prompts for Qwen2.5-VL, through transformers' own processor
classes (no torch needed: the PIL image processor and the processor's
token expansion run on numpy).

  proc = processor(tokenizer.hf, cfg)
  batch = preprocess(proc, cfg, ["<|vision_start|><|image_pad|>"
                                 "<|vision_end|>What is this?"], [[image]])
  logits = model(batch["input_ids"], batch["pixel_values"],
                 batch["vision_inputs"], positions=batch["positions"],
                 attention_mask=batch["attention_mask"])

transformers' `Qwen2VLImageProcessorPil` resizes each image to multiples
of patch_size x merge_size (keeping its pixel count between min_pixels and
max_pixels), normalises it, repeats it temporal_patch_size times and
flattens it into patches [Q_i, K], m x m blocks in row-major order, with
its grid (t, h, w) in patches. `Qwen2_5_VLProcessor` writes each
`<|image_pad|>` of a prompt out as t * h * w / m^2 copies. Its video
processor needs torchvision, so `processor` builds the same class
without one. `preprocess` adds the host-side model inputs (qwen2_vl.py):
the M-RoPE positions and the vision tower's indices.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from purld_jax.models import qwen2_vl
from purld_jax.models import qwen2_vl_vision


def image_processor(cfg: qwen2_vl.Qwen2VLConfig | None = None, **kwargs):
  """transformers' `Qwen2VLImageProcessorPil`, its patch_size,
  temporal_patch_size and merge_size those of `cfg.vision` (when given);
  other settings (min_pixels, max_pixels, ...) from `kwargs`."""
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as m
  if cfg is not None:
    v = cfg.vision
    kwargs = dict(dict(patch_size=v.patch_size,
                       temporal_patch_size=v.temporal_patch_size,
                       merge_size=v.spatial_merge_size), **kwargs)
  return m.Qwen2VLImageProcessorPil(**kwargs)


def _processor_class():
  from transformers.models.qwen2_5_vl import processing_qwen2_5_vl as m

  class Qwen2_5_VLProcessor(m.Qwen2_5_VLProcessor):  # pylint: disable=invalid-name
    """transformers' class with no video processor (images and text); the
    same name, which it writes as `processor_class` into saved configs."""

    def __init__(  # pylint: disable=redefined-outer-name
        self, image_processor=None, tokenizer=None, chat_template=None,
        **kwargs):
      super().__init__(image_processor, tokenizer, None,
                       chat_template=chat_template, **kwargs)

  return Qwen2_5_VLProcessor


def processor(tokenizer, cfg: qwen2_vl.Qwen2VLConfig, image_proc=None):
  """transformers' Qwen2.5-VL processor (images only) over a Hugging Face
  tokenizer; the image processor defaults to `image_processor(cfg)`.

  Raises:
    ValueError when the tokenizer's `<|image_pad|>` id is not the config's
    `image_token_id`, or the image processor's patching is not the
    vision tower's.
  """
  if image_proc is None:
    image_proc = image_processor(cfg)
  proc = _processor_class()(image_processor=image_proc, tokenizer=tokenizer)
  if proc.image_token_id != cfg.image_token_id:
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: "
        f"{proc.image_token} is id {proc.image_token_id}, config.json "
        f"image_token_id is {cfg.image_token_id}")
  v = cfg.vision
  for ours, theirs in ((v.patch_size, "patch_size"),
                       (v.temporal_patch_size, "temporal_patch_size"),
                       (v.spatial_merge_size, "merge_size")):
    if getattr(image_proc, theirs) != ours:
      raise ValueError(f"image processor {theirs}="
                       f"{getattr(image_proc, theirs)} is not the vision "
                       f"tower's {ours}")
  return proc


def load_processor(path, cfg: qwen2_vl.Qwen2VLConfig):
  """`processor` from a model directory: its tokenizer and, when present,
  its preprocessor_config.json."""
  import pathlib
  import transformers
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as m
  tok = transformers.AutoTokenizer.from_pretrained(str(path))
  image_proc = None
  if (pathlib.Path(path) / "preprocessor_config.json").is_file():
    image_proc = m.Qwen2VLImageProcessorPil.from_pretrained(str(path))
  return processor(tok, cfg, image_proc)


def preprocess(proc, cfg: qwen2_vl.Qwen2VLConfig, texts: Sequence[str],
               images: Sequence[Sequence], *, padding_side: str = "left",
               **kwargs) -> dict:
  """numpy model inputs of B prompts and their images (row b: the images
  of text b's `<|image_pad|>` markers, in order).

  Returns:
    {"input_ids": i32[B, T], "attention_mask": bool[B, T],
     "positions": i32[3, B, T] (`qwen2_vl.rope_index`),
     and with images "pixel_values": f32[Q, K], "image_grid_thw":
     i64[N, 3], "vision_inputs": `qwen2_vl_vision.vision_inputs`};
    rows are padded on `padding_side`.
  """
  flat = [im for row in images for im in row]
  out = proc(text=list(texts), images=flat or None, padding=True,
             padding_side=padding_side, return_tensors="np", **kwargs)
  res = {"input_ids": np.asarray(out["input_ids"], np.int32),
         "attention_mask": np.asarray(out["attention_mask"]).astype(bool)}
  grid = None
  if "pixel_values" in out:
    grid = np.asarray(out["image_grid_thw"], np.int64)
    res["pixel_values"] = np.asarray(out["pixel_values"], np.float32)
    res["image_grid_thw"] = grid
    res["vision_inputs"] = qwen2_vl_vision.vision_inputs(grid, cfg.vision)
    qwen2_vl.check_image_tokens(res["input_ids"], grid, cfg)
  res["positions"] = qwen2_vl.rope_index(res["input_ids"],
                                         res["attention_mask"], grid, cfg)
  return res
