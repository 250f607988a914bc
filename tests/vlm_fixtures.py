"""A tiny random Idefics3 student saved as a Hugging Face directory (config,
safetensors, a character tokenizer with the processor's special tokens and
a SmolVLM-style chat template, preprocessor_config.json), and image prompts
made from small PIL images. No torch: the weights are our own random init
written by `idefics3_hf.save_model`."""

import io
import os

import numpy as np

IMAGE_SIZE, PATCH = 28, 7  # 4 x 4 patches, scale 2: 4 tokens a tile
IMAGE_SPECIALS = (["<fake_token_around_image>", "<image>", "<global-img>",
                   "<end_of_utterance>"]
                  + [f"<row_{i}_col_{j}>" for i in range(1, 7)
                     for j in range(1, 7)])
# SmolVLM's template: content is a list of {"type": "text" | "image"} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}"
    "{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
VOCAB = 160


def write_tokenizer(path):
  """Characters (printable ASCII, newline) plus the image specials."""
  import tokenizers
  import transformers
  from purld_jax.train import student
  specials = ["<pad>", "<unk>"] + IMAGE_SPECIALS
  vocab = {t: i for i, t in enumerate(specials + list(student.CHAR_ALPHABET))}
  assert len(vocab) <= VOCAB
  core = tokenizers.Tokenizer(
      tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  core.pre_tokenizer = tokenizers.pre_tokenizers.Split(
      tokenizers.Regex("(?m)."), behavior="isolated")
  core.decoder = tokenizers.decoders.Fuse()
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
      eos_token="<end_of_utterance>",
      additional_special_tokens=IMAGE_SPECIALS)
  tok.chat_template = CHAT_TEMPLATE
  tok.save_pretrained(str(path))
  return tok


def make_vlm_dir(path, seed=0):
  """A random tiny Idefics3 HF directory at `path`; returns `path`."""
  import jax.numpy as jnp
  from flax import nnx
  from purld_jax.models import idefics3
  from purld_jax.models import idefics3_hf
  from purld_jax.models import idefics3_processing as proc_lib
  from purld_jax.models import llama
  from purld_jax.models import siglip
  tok = write_tokenizer(path)
  text = llama.tiny_config(vocab_size=VOCAB, dtype=jnp.float32,
                           param_dtype=jnp.float32)
  vision = siglip.VisionConfig(
      hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
      image_size=IMAGE_SIZE, patch_size=PATCH)
  cfg = idefics3.Idefics3Config(
      vision=vision, text=text, scale_factor=2,
      image_token_id=tok.convert_tokens_to_ids("<image>"))
  model = idefics3.Idefics3(cfg, rngs=nnx.Rngs(seed))
  # larger weights than the 0.02 init, so images visibly move the logits
  params = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)
  params = nnx.to_pure_dict(params)
  import jax
  params = jax.tree.map(
      lambda x: jnp.asarray(x + 0.1 * rng.standard_normal(x.shape), x.dtype)
      if x.ndim >= 2 else x, params)
  nnx.update(model, params)
  idefics3_hf.save_model(model, path)
  proc_lib.image_processor(max_image_size=IMAGE_SIZE, longest_edge=IMAGE_SIZE,
                           do_image_splitting=False).save_pretrained(str(path))
  return path


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
