"""A tiny random Idefics3 (SmolVLM-style) student as a Hugging Face
directory: config, safetensors (our own random init, no torch), a character
tokenizer with the processor's special tokens and a SmolVLM-style chat
template, preprocessor_config.json (28 x 28 tiles of 7 x 7 patches: 4 image
tokens a tile). For tests and the `:tiny` variant of configs/vlm_shapes.py
(seconds on CPU); it has learnt nothing.

  path = tiny_vlm.ensure(DIR)   # built once (atomically), then reused
"""

import os
import shutil

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
  from purld_jax.train import student  # pylint: disable=g-import-not-at-top
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



def ensure(path, seed=0) -> str:
  """`make_vlm_dir` at `path` unless a finished one is there (its
  config.json is written last, by a rename); returns `path`."""
  path = str(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  make_vlm_dir(tmp, seed=seed)
  try:
    os.rename(tmp, path)
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
  return path
