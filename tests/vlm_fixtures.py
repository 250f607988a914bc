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
  from purld_jax.train import student
  specials = ("<pad>", "<unk>", *IMAGE_SPECIALS)
  assert len(specials) + len(student.CHAR_ALPHABET) <= VOCAB
  return student.write_char_tokenizer(path, specials=specials,
                                      eos="<end_of_utterance>",
                                      chat_template=CHAT_TEMPLATE)


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
