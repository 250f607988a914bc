"""A tiny random Qwen2.5-VL student as a Hugging Face directory: config,
safetensors (our own random init, no torch), a character tokenizer with
Qwen's special tokens and a Qwen2.5-VL-style chat template (string or
{"type": "text" | "image"} part contents), preprocessor_config.json with a
fixed image size (min_pixels = max_pixels = 16 x 16: 4 x 4 patches of 4
pixels, merged 2 x 2, so 4 image tokens an image; vision_qwen.py). For
tests (seconds on CPU); it has learnt nothing. transformers loads it as
`Qwen2_5_VLForConditionalGeneration`.

  path = tiny_qwen_vl.ensure(DIR)   # built once (atomically), then reused
"""

import os
import shutil

import numpy as np

IMAGE_SIDE, PATCH = 16, 4
SPECIALS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>",
            "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}" + IMAGE +
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 112
VISION = dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2,
              in_channels=3, patch_size=PATCH, temporal_patch_size=2,
              spatial_merge_size=2, window_size=8, out_hidden_size=32,
              fullatt_block_indexes=[1])
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-6, max_position_embeddings=512,
            hidden_act="silu", rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0,
                "mrope_section": [1, 1, 2]})


def write_tokenizer(path):
  """Characters (printable ASCII, newline) plus Qwen's specials."""
  from purld_jax.train import student  # pylint: disable=g-import-not-at-top
  specials = ("<pad>", "<unk>", *SPECIALS)
  assert len(specials) + len(student.CHAR_ALPHABET) <= VOCAB
  return student.write_char_tokenizer(path, specials=specials,
                                      eos="<|im_end|>",
                                      chat_template=CHAT_TEMPLATE)


def hf_config(tok) -> dict:
  """The config.json dict (transformers 5 layout) over `tok`'s ids."""
  ids = {k: tok.convert_tokens_to_ids(v) for k, v in (
      ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
      ("vision_start_token_id", "<|vision_start|>"),
      ("vision_end_token_id", "<|vision_end|>"))}
  return dict(model_type="qwen2_5_vl", tie_word_embeddings=False,
              vision_config=dict(VISION),
              text_config=dict(TEXT, eos_token_id=tok.eos_token_id), **ids)


def make_qwen_vl_dir(path, seed=0):
  """A random tiny Qwen2.5-VL HF directory at `path`; returns `path`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from purld_jax.models import qwen2_vl
  from purld_jax.models import qwen2_vl_hf
  from purld_jax.models import qwen2_vl_processing as proc_lib
  tok = write_tokenizer(path)
  cfg = qwen2_vl.Qwen2VLConfig.from_hf(hf_config(tok))
  model = qwen2_vl.Qwen2VL(cfg, rngs=nnx.Rngs(seed))
  # larger weights than the 0.02 init, so images visibly move the logits
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda x: jnp.asarray(x + 0.1 * rng.standard_normal(x.shape), x.dtype)
      if x.ndim >= 2 else x, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  nnx.update(model, params)
  qwen2_vl_hf.save_model(model, path, extra_config=dict(
      bos_token_id=None, eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id))
  side = IMAGE_SIDE * IMAGE_SIDE
  proc_lib.image_processor(cfg, min_pixels=side, max_pixels=side
                           ).save_pretrained(str(path))
  return path


def ensure(path, seed=0) -> str:
  """`make_qwen_vl_dir` at `path` unless a finished one is there (built in
  a temporary folder, then renamed); returns `path`."""
  path = str(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    return path
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  make_qwen_vl_dir(tmp, seed=seed)
  try:
    os.rename(tmp, path)
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
  return path
