"""The embedded SmolLM2-135M-Instruct: conversion, tokenizer and logits vs llama.cpp.

Every test that needs the real conversion is marked `slow`: reading the GGUF's
98k-string vocabulary and writing 540 MB of float32 take 10-20 s on 2 cores.
Expected sizes are those of the published SmolLM2-135M config (30 layers,
hidden 576, 9 heads / 3 kv heads of 64, MLP 1536, vocab 49152, theta 1e5).
"""

import json

import numpy as np
import pytest
import safetensors

from purld_jax.models import embedded
from purld_jax.tools import import_gguf
from tests.tools import test_import_gguf

SUBDIR = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory):
  return embedded.ensure_converted(tmp_path_factory.mktemp("purld_jax_cache"))


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_dir):
  import transformers  # slow to import: only the slow tests need it
  return transformers.AutoTokenizer.from_pretrained(smollm_dir)


@pytest.mark.slow
def test_config(smollm_dir):
  config = json.loads((smollm_dir / "config.json").read_text())
  expected = dict(
      model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152,
      hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, head_dim=64,
      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
  assert {k: config[k] for k in expected} == expected
  assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}


@pytest.mark.slow
def test_tensor_shapes(smollm_dir):
  with safetensors.safe_open(smollm_dir / "model.safetensors", "numpy") as f:
    shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
  assert dtypes == {"F32"}
  assert len(shapes) == 30 * 9 + 2  # 9 per layer, embedding, final norm; tied
  assert "lm_head.weight" not in shapes
  assert shapes["model.embed_tokens.weight"] == [49152, 576]
  assert shapes["model.norm.weight"] == [576]
  p = "model.layers.29."
  assert shapes[p + "self_attn.q_proj.weight"] == [9 * 64, 576]
  assert shapes[p + "self_attn.k_proj.weight"] == [3 * 64, 576]
  assert shapes[p + "self_attn.v_proj.weight"] == [3 * 64, 576]
  assert shapes[p + "self_attn.o_proj.weight"] == [576, 9 * 64]
  assert shapes[p + "mlp.gate_proj.weight"] == [1536, 576]
  assert shapes[p + "mlp.up_proj.weight"] == [1536, 576]
  assert shapes[p + "mlp.down_proj.weight"] == [576, 1536]
  assert shapes[p + "input_layernorm.weight"] == [576]


@pytest.mark.slow
def test_second_call_reuses_the_conversion(smollm_dir, capsys):
  marker = smollm_dir / embedded.MARKER
  before = marker.stat().st_mtime_ns
  assert embedded.ensure_converted(smollm_dir.parent) == smollm_dir
  assert marker.stat().st_mtime_ns == before
  assert marker.read_text().strip() == embedded.SMOLLM2_GGUF_SHA256
  assert capsys.readouterr().err == ""
  assert sorted(p.name for p in smollm_dir.parent.iterdir()) == [SUBDIR]  # no temp dirs


@pytest.mark.slow
def test_tokenizer_special_tokens_and_chat_template(hf_tokenizer):
  tok = hf_tokenizer
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
  ids = tok.encode("<|im_start|>user<|im_end|>", add_special_tokens=True)
  assert (ids[0], ids[-1]) == (1, 2)  # control tokens kept whole, no BOS added
  # Digits are split one by one, whatever merges exist.
  assert tok.tokenize("2024") == ["2", "0", "2", "4"]
  text = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                 tokenize=False, add_generation_prompt=True)
  assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                  "trained by Hugging Face<|im_end|>\n"
                  "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_sha_mismatch_is_refused(tmp_path, monkeypatch):
  monkeypatch.setattr(embedded, "SMOLLM2_GGUF_SHA256", "0" * 64)
  with pytest.raises(ValueError, match="sha256"):
    embedded.ensure_converted(tmp_path)
  assert not (tmp_path / SUBDIR).exists()


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
  def fail(src, out):
    (out / "config.json").write_text("{}")
    raise RuntimeError("disk full")
  monkeypatch.setattr(import_gguf, "convert", fail)
  with pytest.raises(RuntimeError, match="disk full"):
    embedded.ensure_converted(tmp_path)
  assert list(tmp_path.iterdir()) == []


def test_missing_wheel_says_run_setup(monkeypatch):
  monkeypatch.setattr(embedded, "_PACKAGE", "purld_jax_no_such_wheel")
  with pytest.raises(FileNotFoundError, match="scripts/setup.sh"):
    embedded.gguf_path()


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("PURLD_JAX_CACHE", str(tmp_path))
  assert embedded.default_cache_dir() == tmp_path
  monkeypatch.delenv("PURLD_JAX_CACHE")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert embedded.default_cache_dir() == tmp_path / ".cache" / "purld_jax"


# Varied strings: digits, runs of spaces, tabs/newlines, accents, CJK, emoji,
# contractions, code, and chat / repo control tokens.
TOKENIZER_CASES = [
    "Hello world",
    "  two leading spaces,   three inside, trailing  ",
    "1234567890 and 3.14159, on 2024-11-22 at 07:45",
    "tabs\tand\nnewlines\n\n\nend",
    "Ünïcödé café naïve — “quotes” … 日本語のテキスト 🚀🎉",
    "I'm sure you're right, they'll see; we've IT'S",
    "def f(x):\n    return x**2  # square\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>foo/bar<file_sep>main.py",
    "ABC123def456ghi",
]


@pytest.fixture(scope="module")
def llama_vocab():
  llama_cpp = pytest.importorskip("llama_cpp")
  return llama_cpp.Llama(model_path=str(embedded.gguf_path()), vocab_only=True,
                         verbose=False)


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("text", TOKENIZER_CASES)
def test_tokenizer_matches_llamacpp(hf_tokenizer, llama_vocab, text):
  want = llama_vocab.tokenize(text.encode(), add_bos=False, special=True)
  got = hf_tokenizer.encode(text, add_special_tokens=False)
  assert got == want
  assert hf_tokenizer.decode(got) == text


# Logits of the converted model (transformers + torch, float32) vs llama.cpp.
PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
]
# On the Q4_1 file llama.cpp rounds the activations to 8 bits (q8_1) before
# each quantised matmul; the converted model multiplies the same dequantised
# weights in float32. Over 30 layers that gives logit differences of order 1
# on logits of order 20, so only a loose bound and the greedy token can be
# asserted there. A q/k row-order mistake costs tens.
Q4_TOL = 3.0
# On a float32 GGUF holding the same dequantised weights llama.cpp computes in
# float32 too, so only summation order differs.
F32_TOL = 1e-3


def _llamacpp(path):
  llama_cpp = pytest.importorskip("llama_cpp")
  return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256,
                         n_threads=2, type_k=0, type_v=0, flash_attn=False,
                         verbose=False)  # type 0 = GGML_TYPE_F32 KV cache


def _llamacpp_logits(llm, ids):
  """f32[T, V] logits of llama.cpp at every position of `ids`."""
  llm.reset()
  llm.eval(ids)
  return np.array(llm.scores[:len(ids)], np.float32)


def _torch_logits(model, ids, weights=None):
  """f32[T, V] logits of the transformers model, optionally with other weights."""
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    x = torch.tensor([ids])
    if weights is None:
      return model(x).logits[0].numpy()
    return torch.func.functional_call(model, weights, (x,)).logits[0].numpy()


@pytest.fixture(scope="module")
def torch_model(smollm_dir):
  torch = pytest.importorskip("torch")
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(smollm_dir,
                                                            dtype=torch.float32)
  return model.eval()


def _write_f32_gguf(src, dst):
  """Copies GGUF `src` to `dst` with every tensor dequantised to float32.

  Tensors keep llama.cpp's names and q/k row order: nothing here uses the
  converter, so it is an independent reference for it.
  """
  import gguf
  reader = gguf.GGUFReader(src)
  writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
  for key, field in reader.fields.items():
    if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
      continue
    sub_type = field.types[1] if len(field.types) > 1 else None
    writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
  for t in reader.tensors:
    shape = tuple(int(d) for d in reversed(t.shape))
    writer.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type)
                      .reshape(shape).astype(np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.llamacpp
@pytest.mark.slow
def test_q4_logits_and_greedy_tokens_match_llamacpp(torch_model):
  llm = _llamacpp(embedded.gguf_path())
  for prompt in PROMPTS:
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    want, got = _llamacpp_logits(llm, ids), _torch_logits(torch_model, ids)
    assert got[-1].argmax() == want[-1].argmax(), prompt  # greedy next token
    # Same top-1 wherever the top-2 margin is beyond the rounding noise.
    top2 = np.sort(got, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * Q4_TOL
    np.testing.assert_array_equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    np.testing.assert_allclose(got, want, atol=Q4_TOL, rtol=0, err_msg=prompt)
  llm.close()


@pytest.mark.llamacpp
@pytest.mark.slow
def test_f32_logits_match_llamacpp_and_need_the_unpermutation(torch_model, tmp_path):
  _write_f32_gguf(embedded.gguf_path(), tmp_path / "f32.gguf")
  llm = _llamacpp(tmp_path / "f32.gguf")
  for prompt in PROMPTS:
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    want, got = _llamacpp_logits(llm, ids), _torch_logits(torch_model, ids)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, atol=F32_TOL, rtol=0, err_msg=prompt)

  # The trap: with q/k rows left in llama.cpp's order (as the GGUF has them)
  # HF's rotate-half RoPE pairs the wrong dims and the logits are far off.
  config = torch_model.config
  head_dim = config.hidden_size // config.num_attention_heads
  order = {"q_proj": test_import_gguf.llamacpp_row_order(config.num_attention_heads, head_dim),
           "k_proj": test_import_gguf.llamacpp_row_order(config.num_key_value_heads, head_dim)}
  as_in_gguf = {name: w[order[name.split(".")[-2]]]
                for name, w in torch_model.named_parameters()
                if name.split(".")[-2] in order}
  ids = llm.tokenize(PROMPTS[0].encode(), add_bos=False, special=True)
  wrong = _torch_logits(torch_model, ids, as_in_gguf)
  assert np.abs(wrong - _llamacpp_logits(llm, ids)).max() > 10.0
  llm.close()
