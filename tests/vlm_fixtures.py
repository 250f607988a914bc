"""A tiny random Idefics3 student saved as a Hugging Face directory (config,
safetensors, a character tokenizer with the processor's special tokens and
a SmolVLM-style chat template, preprocessor_config.json), and image prompts
made from small PIL images. No torch: the weights are our own random init
written by `idefics3_hf.save_model`."""

import io
import os

import numpy as np

from purld_jax.models.tiny_vlm import (  # noqa: F401  (re-exported)
    CHAT_TEMPLATE, IMAGE_SIZE, IMAGE_SPECIALS, PATCH, VOCAB, make_vlm_dir,
    write_tokenizer)


def png(seed, h=20, w=24) -> bytes:
  """Encoded PNG bytes of a small random RGB image."""
  import PIL.Image
  rng = np.random.default_rng(seed)
  img = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def write_prompt_file(path, records) -> str:
  """A JSONL prompt file at `path` whose records carry an `images` list of
  PNG paths relative to the file (written to `<folder>/images/`): each of
  `records` is a dict of the record's fields with `images` as a list of
  PNG bytes. Returns the file's path (str)."""
  import hashlib
  import json
  folder = os.path.dirname(os.path.abspath(str(path)))
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  with open(str(path), "w", encoding="utf-8") as f:
    for rec in records:
      rec = dict(rec)
      names = []
      for data in rec.pop("images", ()):
        name = f"images/{hashlib.sha256(data).hexdigest()[:16]}.png"
        with open(os.path.join(folder, name), "wb") as img:
          img.write(data)
        names.append(name)
      if names:
        rec["images"] = names
      f.write(json.dumps(rec) + "\n")
  return str(path)


COLORS = ("red", "blue", "green", "black")


def colour_records(prefix="", seed=10):
  """Four image prompt records (one with two images, one without any)."""
  out = []
  for i, c in enumerate(COLORS):
    n = 2 if i == 1 else 0 if i == 3 else 1
    out.append(dict(id=f"{prefix}{i}", prompt=f"Colour {i}?", answer=c,
                    solution=c, images=[png(seed + i + j, 16 + 4 * i, 20)
                                        for j in range(n)]))
  return out
