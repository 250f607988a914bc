"""GGUF (llama or qwen2 architecture) -> Hugging Face directory, in float32.

  python -m purld_jax.tools.import_gguf --gguf FILE --out DIR

Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
special_tokens_map.json and generation_config.json: a directory that
`transformers.AutoModelForCausalLM` / `AutoTokenizer` and `models/hf.py` read.

Two things are not a plain copy:
  * quantised tensors (Q4_1, Q8_0, ...) are dequantised to float32, so the
    result equals the GGUF's weights, not the original bf16 release;
  * for the llama architecture, llama.cpp's HF->GGUF converter permutes the
    rows of q_proj / k_proj (weights and biases) so that each head's rotary
    pairs are interleaved (GPT-J style RoPE). HF Llama rotates halves, so
    `unpermute_qk` undoes it (`permute_qk` is the converter's direction,
    used by export_gguf.py). qwen2 GGUFs keep HF's order (NeoX RoPE).

Axes (structs.py): V vocab, D model, N q-heads, G kv-heads, H head dim, F mlp.
"""

import argparse
import json
import pathlib
import sys

import gguf
import numpy as np
from safetensors import numpy as st_numpy
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors


class UnsupportedGGUF(ValueError):
  """A GGUF using a feature this converter does not handle; names it."""

GGUF_MAGIC = b"GGUF"

# general.architecture -> HF (model_type, architectures[0]).
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"),
                 "qwen2": ("qwen2", "Qwen2ForCausalLM")}
# Architectures whose q/k rows llama.cpp stores interleaved.
PERMUTED_QK = ("llama",)

# GGUF tensor name -> HF name; "{i}" is the layer index.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Layer tensors that may have a bias; their HF projection letter.
_BIASED = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o"}

# llama.cpp pre-tokenizer names whose regexes are "\p{N}" (each digit alone)
# followed by the GPT-2 regex, and those with the GPT-2 regex only.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_GPT2_ONLY = ("gpt-2", "default")
# Pre-tokenizers that split with one regex (the tokenizer.json's, which
# llama.cpp reimplements), then map bytes without the GPT-2 regex.
SPLIT_REGEX = {
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                  r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                  r"|\s+(?!\S)|\s+"),
}

# tokenizer.ggml.token_type values (gguf.TokenType).
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)


def permute_qk(w, n_heads):
  """llama.cpp's row permutation of a q or k projection (inverse of
  `unpermute_qk`): per head, rows [x_0..x_{H/2-1}, y_0..y_{H/2-1}] become
  [x_0, y_0, x_1, y_1, ...].

  Args:
    w: f32[N*H, D] (or f32[N*H], a bias) in HF row order.
    n_heads: N, the number of heads this projection has (G for k_proj).

  Returns:
    the same shape, in llama.cpp's row order.
  """
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
  half = rows // n_heads // 2
  return (w.reshape(n_heads, 2, half, *w.shape[1:])
          .swapaxes(1, 2)
          .reshape(w.shape))


def unpermute_qk(w, n_heads):
  """Undoes llama.cpp's row permutation of a q or k projection.

  Within each head, HF keeps the two rotary halves as rows [x_0..x_{H/2-1},
  y_0..y_{H/2-1}]; llama.cpp stores them interleaved [x_0, y_0, x_1, y_1, ...].
  This maps the interleaved order back to halves.

  Args:
    w: f32[N*H, D] as stored in the GGUF (after reshaping to [out, in]).
    n_heads: N, the number of heads this projection has (G for k_proj).

  Returns:
    f32[N*H, D] in HF row order.
  """
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
  half = rows // n_heads // 2
  return (w.reshape(n_heads, half, 2, *w.shape[1:])
          .swapaxes(1, 2)
          .reshape(w.shape))


def open_gguf(path):
  """Returns a `gguf.GGUFReader`, or raises an error naming `path`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != GGUF_MAGIC:
    raise ValueError(f"{path} is not a GGUF file (starts with {magic!r}, "
                     f"expected {GGUF_MAGIC!r})")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader's errors do not name the file
    raise ValueError(f"cannot read GGUF file {path}: {e}") from e


def metadata(reader):
  """All key/value fields of the GGUF as plain Python values."""
  return {k: f.contents() for k, f in reader.fields.items()
          if not k.startswith("GGUF.")}


def _float32_decimal(x):
  """The shortest decimal that rounds to the same float32 (1e-05, not 9.99e-06).

  GGUF stores eps and rope theta as float32; this recovers the value the
  original config.json had.
  """
  return float(str(np.float32(x)))


def _required(meta, key):
  if key not in meta:
    raise ValueError(f"GGUF metadata has no {key!r}")
  return meta[key]


def hf_config(meta, *, tied, biases=()):
  """config.json (LlamaForCausalLM or Qwen2ForCausalLM) from GGUF metadata.

  Args:
    meta: `metadata(reader)`.
    tied: no output.weight tensor (the embedding is the output layer).
    biases: the projections that have a bias tensor ("q", "k", "v", "o").
  """
  arch = _required(meta, "general.architecture")
  if arch not in ARCHITECTURES:
    raise UnsupportedGGUF(f"only {'/'.join(ARCHITECTURES)}-architecture "
                              f"GGUFs, got {arch!r}")
  model_type, hf_arch = ARCHITECTURES[arch]
  get = lambda key: _required(meta, f"{arch}.{key}")
  n_heads = int(get("attention.head_count"))
  hidden = int(get("embedding_length"))
  head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_heads))
  rot_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
  if rot_dim != head_dim:
    raise UnsupportedGGUF(f"partial RoPE ({rot_dim} of {head_dim} dims)")
  theta = _float32_decimal(meta.get(f"{arch}.rope.freq_base", 10000.0))
  rope = {"rope_type": "default", "rope_theta": theta}
  scaling = meta.get(f"{arch}.rope.scaling.type", "none")
  if scaling == "linear":
    rope.update(rope_type="linear", factor=_float32_decimal(
        get("rope.scaling.factor")))
  elif scaling != "none":
    raise UnsupportedGGUF(f"RoPE scaling {scaling!r}")
  want = {"qwen2": {"q", "k", "v"}, "llama": {"q", "k", "v", "o"}}[arch]
  if set(biases) not in (set(), want):
    raise UnsupportedGGUF(
        f"{arch} GGUF with biases on {sorted(biases)} (the HF {model_type} "
        f"model has them on {sorted(want)} or none)")
  vocab = meta.get(f"{arch}.vocab_size", len(_required(meta, "tokenizer.ggml.tokens")))
  config = {
      "architectures": [hf_arch],
      "model_type": model_type,
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(get("feed_forward_length")),
      "num_hidden_layers": int(get("block_count")),
      "num_attention_heads": n_heads,
      "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
      "head_dim": head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": int(get("context_length")),
      "rms_norm_eps": _float32_decimal(get("attention.layer_norm_rms_epsilon")),
      "rope_parameters": rope,
      "rope_theta": theta,
      "attention_bias": bool(biases),
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "tie_word_embeddings": tied,
      "use_cache": True,
      "torch_dtype": "float32",
      "dtype": "float32",
  }
  for name in ("bos", "eos", "pad"):
    key = f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id"
    if key in meta:
      config[f"{name}_token_id"] = int(meta[key])
  return config


def _hf_name(gguf_name):
  parts = gguf_name.split(".")
  if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES and (
      parts[-1] == "weight" or parts[2] in _BIASED):
    return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.{parts[-1]}"
  if len(parts) == 2 and parts[0] in TOP_NAMES and parts[-1] == "weight":
    return f"{TOP_NAMES[parts[0]]}.weight"
  raise UnsupportedGGUF(f"unsupported GGUF tensor {gguf_name!r}")


def hf_tensors(reader, config):
  """Dequantised float32 weights under HF names, in HF [out, in] layout.

  GGUF lists dims fastest-first (ggml `ne`), so a [out, in] matrix has
  shape (in, out) in the reader; numpy wants them reversed.
  """
  permuted = config["model_type"] in PERMUTED_QK
  tensors = {}
  for t in reader.tensors:
    name = _hf_name(t.name)
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    w = np.asarray(w, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    if permuted and ".q_proj." in name:
      w = unpermute_qk(w, config["num_attention_heads"])
    elif permuted and ".k_proj." in name:
      w = unpermute_qk(w, config["num_key_value_heads"])
    tensors[name] = np.ascontiguousarray(w)
  return tensors


def _special_id(meta, what):
  key = f"tokenizer.ggml.{what}_token_id"
  return int(meta[key]) if key in meta else None


def build_tokenizer(meta):
  """A byte-level BPE `tokenizers.Tokenizer` equal to llama.cpp's for this GGUF."""
  kind = meta.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise UnsupportedGGUF(f"only byte-level BPE ('gpt2') tokenizers, got {kind!r}")
  tokens = _required(meta, "tokenizer.ggml.tokens")
  types = meta.get("tokenizer.ggml.token_type", [int(gguf.TokenType.NORMAL)] * len(tokens))
  merges = [tuple(m.split(" ", 1)) for m in _required(meta, "tokenizer.ggml.merges")]
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                   fuse_unk=False, byte_fallback=False)
  tok = tokenizers.Tokenizer(bpe)
  pre = meta.get("tokenizer.ggml.pre", "default")
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGITS_THEN_GPT2:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in _GPT2_ONLY:
    tok.pre_tokenizer = byte_level
  elif pre in SPLIT_REGEX:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(SPLIT_REGEX[pre]),
                             behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    raise UnsupportedGGUF(
        f"pre-tokenizer {pre!r} (known: "
        f"{_DIGITS_THEN_GPT2 + _GPT2_ONLY + tuple(SPLIT_REGEX)})")
  tok.decoder = decoders.ByteLevel()
  tok.add_tokens([tokenizers.AddedToken(tokens[i], special=(ty == _CONTROL),
                                        normalized=False)
                  for i, ty in enumerate(types) if ty in (_CONTROL, _USER_DEFINED)])
  bos, eos = _special_id(meta, "bos"), _special_id(meta, "eos")
  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
  if add_bos or add_eos:
    pre_ids = [(tokens[bos], bos)] if add_bos else []
    post_ids = [(tokens[eos], eos)] if add_eos else []
    names = lambda ids: [t for t, _ in ids]
    tok.post_processor = processors.TemplateProcessing(
        single=names(pre_ids) + ["$A"] + names(post_ids),
        pair=(names(pre_ids) + ["$A"] + names(post_ids)
              + names(pre_ids) + ["$B:1"] + names(post_ids)),
        special_tokens=pre_ids + post_ids)
  return tok


def tokenizer_files(meta):
  """(tokenizer_config.json, special_tokens_map.json) dicts."""
  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type", [])
  named = {}
  for name, what in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"),
                     ("unk", "unknown")):
    i = _special_id(meta, what)
    if i is not None:
      named[f"{name}_token"] = tokens[i]
  extra = [tokens[i] for i, ty in enumerate(types)
           if ty == _CONTROL and tokens[i] not in named.values()]
  special_map = dict(named, additional_special_tokens=extra)
  config = dict(
      special_map,
      tokenizer_class="PreTrainedTokenizerFast",
      add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
      add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
      clean_up_tokenization_spaces=False,
      model_max_length=int(meta.get(
          f"{meta.get('general.architecture')}.context_length", 2048)),
  )
  if "tokenizer.chat_template" in meta:
    config["chat_template"] = meta["tokenizer.chat_template"]
  return config, special_map


def _write_json(path, obj):
  path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def convert(gguf_path, out_dir):
  """Writes the HF directory for `gguf_path` into `out_dir`; returns out_dir."""
  reader = open_gguf(gguf_path)
  meta = metadata(reader)
  tied = all(t.name != "output.weight" for t in reader.tensors)
  biases = {_BIASED[t.name.split(".")[2]] for t in reader.tensors
            if t.name.endswith(".bias") and t.name.split(".")[2] in _BIASED}
  config = hf_config(meta, tied=tied, biases=biases)
  tensors = hf_tensors(reader, config)
  tokenizer = build_tokenizer(meta)
  tok_config, special_map = tokenizer_files(meta)
  gen_config = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if k in config}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  _write_json(out / "config.json", config)
  st_numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  tokenizer.save(str(out / "tokenizer.json"))
  _write_json(out / "tokenizer_config.json", tok_config)
  _write_json(out / "special_tokens_map.json", special_map)
  _write_json(out / "generation_config.json", gen_config)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m purld_jax.tools.import_gguf",
      description="Convert a llama- or qwen2-architecture GGUF (any "
                  "quantisation gguf can dequantise) to a float32 Hugging "
                  "Face directory.")
  parser.add_argument("--gguf", required=True, help="path of the .gguf file to read")
  parser.add_argument("--out", required=True,
                      help="directory to write (created; existing files are overwritten)")
  args = parser.parse_args(argv)
  try:
    out = convert(args.gguf, args.out)
  except (FileNotFoundError, ValueError) as e:
    parser.exit(1, f"import_gguf: error: {e}\n")
  print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
  main()
