"""Hugging Face directory -> GGUF with float16 weights, for llama.cpp serving.

  python -m purld_jax.tools.export_gguf --hf DIR --out FILE.gguf

The inverse of import_gguf.py, from the HF directory alone (config.json,
safetensors, tokenizer files), written as llama.cpp's own HF->GGUF converter
writes it:
  * architecture `llama` (model_type llama: Llama 2/3.x, SmolLM2) or `qwen2`
    (Qwen2/2.5); any other family, MLP biases or Qwen3's q/k norms are
    refused with the reason;
  * matrices in float16; norms, biases and RoPE factors in float32;
  * for `llama`, the rows of q_proj / k_proj (and their biases) interleaved
    per head (`import_gguf.permute_qk`), for llama.cpp's GPT-J style RoPE;
  * RoPE: freq_base, linear scaling as metadata, Llama 3 scaling as the
    `rope_freqs.weight` factors tensor;
  * the tokenizer: a byte-level ("gpt2") BPE vocabulary with token types,
    merges, bos/eos/unk/pad ids, add-bos/eos flags and the chat template; the
    pre-tokenizer name is recognised from tokenizer.json (`pre_tokenizer_name`);
    an NFC normalizer (Qwen2's) is dropped, as llama.cpp's converter does.

Axes (structs.py): V vocab, D model, N q-heads, G kv-heads, H head dim, F mlp.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys

import gguf
import numpy as np

from purld_jax.models import hf
from purld_jax.models import layers
from purld_jax.models import llama
from purld_jax.models import tokenizer as tokenizer_lib
from purld_jax.tools import import_gguf

# model_type -> GGUF architecture.
ARCHITECTURES = {model_type: arch for arch, (model_type, _)
                 in import_gguf.ARCHITECTURES.items()}
# HF tensor name part -> GGUF name part (import_gguf's tables, inverted).
_LAYER_NAMES = {v: k for k, v in import_gguf.LAYER_NAMES.items()}
_TOP_NAMES = {v: k for k, v in import_gguf.TOP_NAMES.items()}


class ExportError(ValueError):
  """A model or tokenizer GGUF cannot represent; the message says why."""


def architecture(cfg: llama.LlamaConfig, source: str = "config.json") -> str:
  """The GGUF architecture of `cfg`, or ExportError naming what is missing."""
  if cfg.model_type not in ARCHITECTURES:
    raise ExportError(
        f"{source}: model_type={cfg.model_type!r} cannot be exported to GGUF "
        f"(supported: {', '.join(sorted(ARCHITECTURES))})")
  if cfg.mlp_bias:
    raise ExportError(f"{source}: mlp_bias=true cannot be exported to GGUF")
  if cfg.qk_norm:
    raise ExportError(f"{source}: q/k norms cannot be exported to GGUF")
  return ARCHITECTURES[cfg.model_type]


def gguf_name(hf_name: str) -> str:
  """'model.layers.3.self_attn.q_proj.bias' -> 'blk.3.attn_q.bias'."""
  stem, kind = hf_name.rsplit(".", 1)
  if stem in _TOP_NAMES:
    return f"{_TOP_NAMES[stem]}.{kind}"
  parts = stem.split(".", 3)
  if parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
    return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}.{kind}"
  raise ExportError(f"no GGUF name for tensor {hf_name!r}")


def gguf_tensors(tensors: dict[str, np.ndarray], cfg: llama.LlamaConfig
                 ) -> dict[str, np.ndarray]:
  """HF-named weights ([out, in]) -> GGUF-named arrays as llama.cpp stores them.

  Matrices become float16 and 1-D tensors (norms, biases) float32; q/k rows
  are permuted for the llama architecture.

  Args:
    tensors: `hf.to_hf_tensors(params, cfg)`.
    cfg: the model's config.
  """
  permute = architecture(cfg) in import_gguf.PERMUTED_QK
  out = {}
  for name, w in tensors.items():
    w = np.asarray(w, np.float32)
    if permute and ".q_proj." in name:
      w = import_gguf.permute_qk(w, cfg.num_heads)
    elif permute and ".k_proj." in name:
      w = import_gguf.permute_qk(w, cfg.num_kv_heads)
    out[gguf_name(name)] = w.astype(np.float16 if w.ndim == 2 else np.float32)
  if cfg.rope_scaling is not None and cfg.rope_scaling[0] == "llama3":
    out["rope_freqs.weight"] = rope_factors(cfg)
  return out


def rope_factors(cfg: llama.LlamaConfig) -> np.ndarray:
  """f32[H/2] Llama 3 RoPE factors: llama.cpp divides each frequency by its
  factor, so factor = unscaled inv_freq / scaled inv_freq."""
  unscaled = dataclasses.replace(cfg, rope_scaling=None)
  return np.asarray(layers.rope_inv_freq(unscaled) / layers.rope_inv_freq(cfg),
                    np.float32)


# ----------------------------------------------------------------------------
# The tokenizer


def pre_tokenizer_name(pre: dict | None) -> str:
  """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre_tokenizer.

  Recognised: ByteLevel with the GPT-2 regex ('gpt-2'); single digits, then
  that ('smollm'); the Qwen2 and Llama 3 split regexes, then ByteLevel
  without a regex ('qwen2', 'llama-bpe').
  """
  def byte_level(p, regex):
    return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space")
            and bool(p.get("use_regex", True)) == regex)
  steps = [] if pre is None else (
      pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre])
  if len(steps) == 1 and byte_level(steps[0], True):
    return "gpt-2"
  if (len(steps) == 2 and steps[0].get("type") == "Digits"
      and steps[0].get("individual_digits") and byte_level(steps[1], True)):
    return "smollm"
  if (len(steps) == 2 and steps[0].get("type") == "Split"
      and byte_level(steps[1], False)):
    regex = steps[0].get("pattern", {}).get("Regex")
    for name, known in import_gguf.SPLIT_REGEX.items():
      if regex == known:
        return name
  raise ExportError(
      f"pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp knows "
      "here (gpt-2, smollm, qwen2, llama-bpe)")


def _merge_strings(merges) -> list[str]:
  """tokenizer.json merges ("a b" strings or [a, b] pairs) as "a b"."""
  return [m if isinstance(m, str) else " ".join(m) for m in merges]


def tokenizer_metadata(hf_dir: str | os.PathLike, vocab_size: int) -> dict:
  """The tokenizer.* GGUF fields of an HF directory's tokenizer.

  Token types follow llama.cpp's converter: an added special token is
  CONTROL, another added token USER_DEFINED, the rest NORMAL, and ids the
  tokenizer does not have (the embedding is padded) are "[PAD<i>]" UNUSED.

  Returns:
    dict with tokens, token_types, merges, pre, bos/eos/unk/pad ids (None
    when absent), add_bos, add_eos, chat_template (None when absent).
  """
  tok = tokenizer_lib.load(hf_dir).hf
  source = pathlib.Path(hf_dir) / "tokenizer.json"
  if not source.is_file():
    raise ExportError(f"{source}: not found (GGUF export reads the fast "
                      "tokenizer's tokenizer.json)")
  spec = json.loads(source.read_text(encoding="utf-8"))
  model = spec["model"]
  if model.get("type") != "BPE" or model.get("byte_fallback"):
    raise ExportError(f"{source}: only byte-level BPE tokenizers export to "
                      f"GGUF ('gpt2'), got model type {model.get('type')!r}")
  normalizer = (spec.get("normalizer") or {}).get("type")
  if normalizer not in (None, "NFC"):  # Qwen2's NFC: llama.cpp skips it too
    raise ExportError(f"{source}: normalizer {normalizer!r} is not supported "
                      "by llama.cpp's gpt2 tokenizer")
  pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
  vocab = tok.get_vocab()
  if max(vocab.values()) >= vocab_size:
    raise ExportError(f"{source}: {len(vocab)} tokens do not fit the "
                      f"model's vocab_size {vocab_size}")
  by_id = {i: t for t, i in vocab.items()}
  added = tok.added_tokens_decoder
  tokens, types = [], []
  for i in range(vocab_size):
    if i not in by_id:
      tokens.append(f"[PAD{i}]")
      types.append(gguf.TokenType.UNUSED)
    elif i in added:
      tokens.append(by_id[i])
      types.append(gguf.TokenType.CONTROL if added[i].special
                   else gguf.TokenType.USER_DEFINED)
    else:
      tokens.append(by_id[i])
      types.append(gguf.TokenType.NORMAL)
  with_special = tok.encode("a", add_special_tokens=True)
  plain = tok.encode("a", add_special_tokens=False)
  return dict(
      tokens=tokens, token_types=[int(t) for t in types],
      merges=_merge_strings(model.get("merges", [])), pre=pre,
      bos=tok.bos_token_id, eos=tok.eos_token_id, unk=tok.unk_token_id,
      pad=tok.pad_token_id,
      add_bos=(tok.bos_token_id is not None and len(with_special) > len(plain)
               and with_special[0] == tok.bos_token_id),
      add_eos=(tok.eos_token_id is not None and len(with_special) > len(plain)
               and with_special[-1] == tok.eos_token_id),
      chat_template=getattr(tok, "chat_template", None) or None)


# ----------------------------------------------------------------------------
# Writing


def _add_metadata(w: gguf.GGUFWriter, cfg: llama.LlamaConfig, tok: dict,
                  name: str) -> None:
  w.add_name(name)
  w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
  w.add_vocab_size(cfg.vocab_size)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  if cfg.rope_scaling is not None and cfg.rope_scaling[0] == "linear":
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(cfg.rope_scaling[1])
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(tok["pre"])
  w.add_token_list(tok["tokens"])
  w.add_token_types(tok["token_types"])
  w.add_token_merges(tok["merges"])
  for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                   ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
    if tok[key] is not None:
      add(int(tok[key]))
  w.add_add_bos_token(bool(tok["add_bos"]))
  w.add_add_eos_token(bool(tok["add_eos"]))
  if tok["chat_template"]:
    w.add_chat_template(tok["chat_template"])


def write(hf_dir: str | os.PathLike, out_path: str | os.PathLike, *,
          name: str | None = None) -> pathlib.Path:
  """Writes the GGUF of the HF directory `hf_dir` to `out_path`.

  Args:
    hf_dir: a Hugging Face model directory (config.json, safetensors,
      tokenizer files).
    out_path: the .gguf file to write (its directory is created).
    name: `general.name` (default: the directory's name).

  Returns:
    out_path. Raises ExportError for what GGUF/llama.cpp cannot represent.
  """
  hf_dir, out_path = pathlib.Path(hf_dir), pathlib.Path(out_path)
  cfg = hf.read_config(hf_dir)
  arch = architecture(cfg, str(hf_dir / "config.json"))
  tok = tokenizer_metadata(hf_dir, cfg.vocab_size)
  tensors = gguf_tensors(hf.to_hf_tensors(hf.load_params(hf_dir, cfg), cfg),
                         cfg)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
  w = gguf.GGUFWriter(str(tmp), arch)
  try:
    _add_metadata(w, cfg, tok, name or hf_dir.resolve().name)
    for tensor_name, array in tensors.items():
      w.add_tensor(tensor_name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
  finally:
    w.close()
  os.replace(tmp, out_path)
  return out_path


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m purld_jax.tools.export_gguf",
      description="Write a float16 GGUF (llama.cpp) of a Hugging Face "
                  "llama/SmolLM2 or qwen2 directory.")
  parser.add_argument("--hf", required=True, help="Hugging Face model directory")
  parser.add_argument("--out", required=True, help=".gguf file to write")
  args = parser.parse_args(argv)
  try:
    out = write(args.hf, args.out)
  except (hf.CheckpointError, ValueError) as e:
    parser.exit(1, f"export_gguf: error: {e}\n")
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
