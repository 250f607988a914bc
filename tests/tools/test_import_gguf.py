"""GGUF -> HF converter on hand-sized inputs: a tiny synthetic GGUF, bad files.

The real SmolLM2 file is tested in test_smollm2_embedded.py.
"""

import json

import gguf
import numpy as np
from numpy import testing as npt
import pytest
from safetensors import numpy as st_numpy
import tokenizers

from purld_jax.tools import import_gguf


def llamacpp_row_order(n_heads, head_dim):
  """Row order llama.cpp's converter writes, as indices of HF rows.

  Written out with loops (not the reshape trick) so it is an independent
  statement of the forward permutation: per head, the first half x and the
  second half y of the rows are interleaved as x0, y0, x1, y1, ...
  """
  half = head_dim // 2
  order = []
  for h in range(n_heads):
    for i in range(half):
      order += [h * head_dim + i, h * head_dim + half + i]
  return np.array(order)


def test_llamacpp_row_order_by_hand():
  # 1 head, H=4: x = rows (0, 1), y = rows (2, 3) -> x0 y0 x1 y1 = 0 2 1 3.
  npt.assert_array_equal(llamacpp_row_order(1, 4), [0, 2, 1, 3])
  # 1 head, H=8: x = 0..3, y = 4..7 -> 0 4 1 5 2 6 3 7.
  npt.assert_array_equal(llamacpp_row_order(1, 8), [0, 4, 1, 5, 2, 6, 3, 7])
  # 2 heads, H=4: each head on its own, the second one offset by 4.
  npt.assert_array_equal(llamacpp_row_order(2, 4), [0, 2, 1, 3, 4, 6, 5, 7])


@pytest.mark.parametrize("n_heads, head_dim, gguf_rows", [
    (1, 4, [0, 2, 1, 3]),
    (1, 8, [0, 4, 1, 5, 2, 6, 3, 7]),
    (2, 4, [0, 2, 1, 3, 4, 6, 5, 7]),
])
def test_unpermute_qk_restores_hf_rows(n_heads, head_dim, gguf_rows):
  # Each row holds its HF index in all 3 columns, so the result must be the
  # rows 0, 1, 2, ... in order.
  rows = n_heads * head_dim
  w = np.asarray(gguf_rows, np.float32)[:, None] * np.ones((1, 3), np.float32)
  got = import_gguf.unpermute_qk(w, n_heads)
  npt.assert_array_equal(got[:, 0], np.arange(rows))
  npt.assert_array_equal(got, got[:, :1] * np.ones((1, 3), np.float32))


def test_unpermute_qk_is_not_its_own_inverse():
  # For H=8 the inverse differs from the forward permutation: applied to rows
  # 0..7 it gives x = even slots (0 2 4 6), then y = odd slots (1 3 5 7).
  got = import_gguf.unpermute_qk(np.arange(8.0)[:, None], 1)
  npt.assert_array_equal(got[:, 0], [0, 2, 4, 6, 1, 3, 5, 7])


def test_unpermute_qk_inverts_llamacpp_order():
  w = np.random.default_rng(0).normal(size=(3 * 8, 5)).astype(np.float32)
  permuted = w[llamacpp_row_order(3, 8)]
  npt.assert_array_equal(import_gguf.unpermute_qk(permuted, 3), w)


@pytest.mark.parametrize("n_heads, head_dim", [(1, 4), (1, 8), (2, 4), (3, 8)])
def test_permute_qk_is_llamacpp_order(n_heads, head_dim):
  rows = np.arange(n_heads * head_dim, dtype=np.float32)
  npt.assert_array_equal(import_gguf.permute_qk(rows, n_heads),
                         llamacpp_row_order(n_heads, head_dim))
  w = np.random.default_rng(0).normal(size=(rows.size, 5)).astype(np.float32)
  npt.assert_array_equal(
      import_gguf.unpermute_qk(import_gguf.permute_qk(w, n_heads), n_heads), w)


# A tiny byte-level vocabulary: 3 control tokens, single bytes, 3 merges.
# "Ġ" is the byte-level symbol for a space, "Ċ" for a newline.
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
          "a", "b", "Ġ", "1", "2", "Ċ", "ab", "Ġa", "12"]
TYPES = [3, 3, 3] + [1] * 9  # gguf.TokenType: 3 control, 1 normal
MERGES = ["a b", "Ġ a", "1 2"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"

# Sizes: V=12, D=8, N=2 heads, G=1 kv head, H=4, F=12, 2 layers.
V, D, N, G, H, F, LAYERS = 12, 8, 2, 1, 4, 12, 2


def tiny_hf_weights(*, tied, seed=0):
  """HF-named float32 weights of a 2-layer llama with the sizes above."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  w = {"model.embed_tokens.weight": normal(V, D), "model.norm.weight": normal(D)}
  if not tied:
    w["lm_head.weight"] = normal(V, D)
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    w |= {p + "input_layernorm.weight": normal(D),
          p + "post_attention_layernorm.weight": normal(D),
          p + "self_attn.q_proj.weight": normal(N * H, D),
          p + "self_attn.k_proj.weight": normal(G * H, D),
          p + "self_attn.v_proj.weight": normal(G * H, D),
          p + "self_attn.o_proj.weight": normal(D, N * H),
          p + "mlp.gate_proj.weight": normal(F, D),
          p + "mlp.up_proj.weight": normal(F, D),
          p + "mlp.down_proj.weight": normal(D, F)}
  return w


def gguf_name(hf_name):
  """Inverse of the converter's name table, written out for the test."""
  top = {"model.embed_tokens.weight": "token_embd.weight",
         "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
  if hf_name in top:
    return top[hf_name]
  layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
  _, _, i, rest = hf_name.split(".", 3)
  return f"blk.{i}.{layer[rest.removesuffix('.weight')]}.weight"


def write_tiny_gguf(path, weights):
  """Writes `weights` as llama.cpp would: GGUF names, permuted q/k rows, f32."""
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(LAYERS)
  w.add_context_length(64)
  w.add_embedding_length(D)
  w.add_feed_forward_length(F)
  w.add_head_count(N)
  w.add_head_count_kv(G)
  w.add_rope_dimension_count(H)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(V)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(TOKENS)
  w.add_token_types(TYPES)
  w.add_token_merges(MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)
  w.add_unk_token_id(0)
  w.add_add_bos_token(False)
  w.add_chat_template(TEMPLATE)
  for name, array in weights.items():
    if "q_proj" in name:
      array = array[llamacpp_row_order(N, H)]
    elif "k_proj" in name:
      array = array[llamacpp_row_order(G, H)]
    w.add_tensor(gguf_name(name), array)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_round_trip(tmp_path, tied):
  weights = tiny_hf_weights(tied=tied)
  write_tiny_gguf(tmp_path / "tiny.gguf", weights)
  out = import_gguf.convert(tmp_path / "tiny.gguf", tmp_path / "hf")

  got = st_numpy.load_file(out / "model.safetensors")
  assert sorted(got) == sorted(weights)
  for name, array in weights.items():
    assert got[name].dtype == np.float32, name
    npt.assert_array_equal(got[name], array, err_msg=name)

  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == ["LlamaForCausalLM"]
  expected = dict(
      model_type="llama", vocab_size=12, hidden_size=8, intermediate_size=12,
      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
      head_dim=4, max_position_embeddings=64, rms_norm_eps=1e-5,
      rope_theta=10000.0, tie_word_embeddings=tied, bos_token_id=1,
      eos_token_id=2, pad_token_id=2, torch_dtype="float32", dtype="float32")
  assert {k: config[k] for k in expected} == expected
  assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


def test_tiny_gguf_tokenizer_files(tmp_path):
  write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_weights(tied=True))
  out = import_gguf.convert(tmp_path / "tiny.gguf", tmp_path / "hf")
  tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
  # "<|im_start|>" control -> 1; "ab" merges -> 9; " a" is "Ġa" -> 10;
  # "12" is split into digits before BPE, so the "1 2" merge never fires
  # -> 6, 7; "<|im_end|>" -> 2; "\n" is "Ċ" -> 8. No BOS is added.
  ids = tok.encode("<|im_start|>ab a12<|im_end|>\n").ids
  assert ids == [1, 9, 10, 6, 7, 2, 8]
  assert tok.decode([9, 10, 6, 7]) == "ab a12"
  assert tok.decode([1, 9]) == "ab"  # special tokens are skipped

  tok_config = json.loads((out / "tokenizer_config.json").read_text())
  assert tok_config["chat_template"] == TEMPLATE
  assert tok_config["add_bos_token"] is False
  assert [tok_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")] == [
      "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>"]
  special_map = json.loads((out / "special_tokens_map.json").read_text())
  assert special_map["additional_special_tokens"] == []  # all 3 are named above
  generation = json.loads((out / "generation_config.json").read_text())
  assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_add_bos_token_adds_a_post_processor():
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
          "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.token_type": TYPES,
          "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.add_bos_token": True}
  tok = import_gguf.build_tokenizer(meta)
  assert tok.encode("ab").ids == [1, 9]  # BOS "<|im_start|>", then "ab"


def test_unsupported_pre_tokenizer_is_named():
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm",
          "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.merges": MERGES}
  with pytest.raises(import_gguf.UnsupportedGGUF, match="deepseek-llm"):
    import_gguf.build_tokenizer(meta)


@pytest.mark.parametrize("pre, ids", [
    # Qwen2's regex takes digits one by one (\p{N}): "12" -> 1, 2 = 6, 7.
    ("qwen2", [10, 6, 7]),
    # Llama 3's takes up to 3 (\p{N}{1,3}), so the "1 2" merge fires -> 11.
    ("llama-bpe", [10, 11]),
])
def test_split_regex_pre_tokenizers(pre, ids):
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
          "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.merges": MERGES}
  assert import_gguf.build_tokenizer(meta).encode(" a12").ids == ids


def test_missing_file_is_named(tmp_path):
  missing = tmp_path / "nope.gguf"
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    import_gguf.convert(missing, tmp_path / "out")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"not a model at all", b"GGUF\x03\x00"])
def test_not_a_gguf_is_named(tmp_path, content):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(content)
  with pytest.raises(ValueError, match="bad.gguf"):
    import_gguf.convert(bad, tmp_path / "out")


def test_cli_reports_bad_file(tmp_path, capsys):
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"hello")
  with pytest.raises(SystemExit) as exit_info:
    import_gguf.main(["--gguf", str(bad), "--out", str(tmp_path / "out")])
  assert exit_info.value.code == 1
  assert "bad.gguf is not a GGUF file" in capsys.readouterr().err
