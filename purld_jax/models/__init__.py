"""The student model: decoder, checkpoints, tokenizer.

  model, tok = load_pretrained(path, dtype=jnp.float32)
  logits = model(tokens, positions=..., attention_mask=...)   # f32[B, T, V]
  save_pretrained(model, tok, out_dir)
"""

from __future__ import annotations

import os
import pathlib
import shutil

import jax.numpy as jnp
from flax import nnx

from purld_jax.models import hf
from purld_jax.models import llama
from purld_jax.models import tokenizer as tokenizer_lib

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "generation_config.json",
                    "chat_template.jinja", "vocab.json", "merges.txt",
                    # a vision-language model's image processor
                    "preprocessor_config.json", "processor_config.json",
                    "chat_template.json")


def load_model(path: str | os.PathLike, *, dtype=jnp.float32,
               param_dtype=None, shardings=None) -> llama.Llama:
  """A `Llama` with weights from a Hugging Face directory (a `Qwen2VL`,
  qwen2_vl.py, when its config.json model_type is qwen2_5_vl).

  Args:
    path: directory with config.json and safetensors.
    dtype: compute dtype.
    param_dtype: storage dtype (default: `dtype`).
    shardings: optional shardings of the param state (see sharding.py).
  """
  from purld_jax.models import qwen2_vl  # pylint: disable=g-import-not-at-top
  if hf.read_json(path)[0].get("model_type") in qwen2_vl.SUPPORTED:
    from purld_jax.models import qwen2_vl_hf  # pylint: disable=g-import-not-at-top
    return qwen2_vl_hf.load_model(path, dtype=dtype, param_dtype=param_dtype,
                                  shardings=shardings)
  cfg = hf.read_config(path, dtype=dtype, param_dtype=param_dtype or dtype)
  params = hf.load_params(path, cfg, shardings=shardings)
  graphdef, _ = llama.abstract_model(cfg)
  return nnx.merge(graphdef, params)


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32,
                    param_dtype=None, shardings=None
                    ) -> tuple[llama.Llama, tokenizer_lib.Tokenizer]:
  """(model, tokenizer) from a Hugging Face directory, offline."""
  model = load_model(path, dtype=dtype, param_dtype=param_dtype,
                     shardings=shardings)
  return model, tokenizer_lib.load(path)


def save_pretrained(model: llama.Llama, tokenizer, path: str | os.PathLike,
                    *, dtype=None, max_shard_bytes: int | None = None) -> None:
  """Writes an HF directory transformers loads: config, weights, tokenizer.

  The tokenizer files are copied from the directory the tokenizer was loaded
  from (or written by transformers when it has none on disk).
  """
  path = pathlib.Path(path)
  extra = {}
  if tokenizer is not None:
    hf_tok = tokenizer.hf if hasattr(tokenizer, "hf") else tokenizer
    extra = {k: getattr(hf_tok, k) for k in
             ("bos_token_id", "eos_token_id", "pad_token_id")
             if getattr(hf_tok, k, None) is not None}
  from purld_jax.models import idefics3  # pylint: disable=g-import-not-at-top
  from purld_jax.models import qwen2_vl  # pylint: disable=g-import-not-at-top
  if isinstance(model, qwen2_vl.Qwen2VL):
    from purld_jax.models import qwen2_vl_hf  # pylint: disable=g-import-not-at-top
    qwen2_vl_hf.save_model(model, path, dtype=dtype, extra_config=extra,
                           max_shard_bytes=max_shard_bytes)
  elif isinstance(model, idefics3.Idefics3):
    from purld_jax.models import idefics3_hf  # pylint: disable=g-import-not-at-top
    idefics3_hf.save_model(model, path, dtype=dtype, extra_config=extra,
                           max_shard_bytes=max_shard_bytes)
  else:
    hf.save_params(model, path, dtype=dtype, extra_config=extra,
                   max_shard_bytes=max_shard_bytes)
  if tokenizer is None:
    return
  src = pathlib.Path(getattr(hf_tok, "name_or_path", "") or "")
  copied = False
  for name in _TOKENIZER_FILES:
    if (src / name).is_file() and src.resolve() != path.resolve():
      shutil.copyfile(src / name, path / name)
      copied = True
  if not copied:
    hf_tok.save_pretrained(str(path))
