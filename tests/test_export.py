"""Export of a run's model: HF directory (transformers parity), GGUF, CLI errors.

Tiny models come from tests/models/torch_oracle.py (transformers, random
weights incl. norms and biases) with the tiny byte-level BPE vocabulary of
tests/tools/test_import_gguf.py (12 tokens; the model's 96 ids are padded).
"""

import json
import os
import pathlib
import subprocess
import sys

from flax import nnx
import gguf
import jax
import jax.numpy as jnp
import numpy as np
from numpy import testing as npt
import pytest
from safetensors import numpy as st_numpy

from purld_jax import checkpoint as checkpoint_lib
from purld_jax import export
from purld_jax import models
from purld_jax.models import hf
from purld_jax.tools import export_gguf
from purld_jax.tools import import_gguf
from tests.models import torch_oracle
from tests.tools import test_import_gguf as tiny_gguf
from tests.train_fixtures import char_tok  # noqa: F401 (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = torch_oracle.BASE["vocab_size"]  # 96 ids, 12 of them real tokens
# Llama with q/k/v/o biases and no MLP biases (llama.cpp has no MLP biases).
ATTN_BIAS = ("LlamaForCausalLM", "LlamaConfig", dict(attention_bias=True))


def write_bpe_tokenizer(out):
  """The 12-token byte-level BPE of test_import_gguf as HF tokenizer files
  (built by import_gguf from GGUF-style fields)."""
  meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
          "tokenizer.ggml.tokens": tiny_gguf.TOKENS,
          "tokenizer.ggml.token_type": tiny_gguf.TYPES,
          "tokenizer.ggml.merges": tiny_gguf.MERGES,
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.padding_token_id": 2,
          "tokenizer.ggml.unknown_token_id": 0,
          "tokenizer.chat_template": tiny_gguf.TEMPLATE}
  import_gguf.build_tokenizer(meta).save(str(out / "tokenizer.json"))
  tok_config, special_map = import_gguf.tokenizer_files(meta)
  (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
  (out / "special_tokens_map.json").write_text(json.dumps(special_map))


def tiny_model_dir(out, variant, monkeypatch=None):
  """A random transformers checkpoint of `variant` plus the BPE tokenizer;
  returns the torch model."""
  if variant == "llama_attn_bias":
    monkeypatch.setitem(torch_oracle.VARIANTS, variant, ATTN_BIAS)
  out.mkdir(parents=True, exist_ok=True)
  ref = torch_oracle.make_checkpoint(variant, out)
  write_bpe_tokenizer(out)
  return ref


def _tokens(seed, b=2, t=9):
  return np.random.default_rng(seed).integers(0, V, (b, t), dtype=np.int32)


def _transformers_logits(path, tokens):
  model = torch_oracle.transformers.AutoModelForCausalLM.from_pretrained(
      str(path), dtype=torch_oracle.torch.float32).eval()
  return torch_oracle.torch_logits(model, tokens)


# ----------------------------------------------------------------------------
# HF directories


@pytest.mark.parametrize("variant", ["llama_untied", "qwen2"])
def test_final_exports_with_the_same_logits(tmp_path, variant):
  tiny_model_dir(tmp_path / "run" / "final", variant)
  src, out, _ = export.export(tmp_path / "run", tmp_path / "out")
  assert (src.kind, src.path) == ("final", str(tmp_path / "run" / "final"))
  tokens = _tokens(0)
  want = np.asarray(models.load_model(tmp_path / "run" / "final")(
      jnp.asarray(tokens)))
  npt.assert_allclose(_transformers_logits(out, tokens), want, atol=1e-4,
                      rtol=0)
  tok = torch_oracle.transformers.AutoTokenizer.from_pretrained(out)
  assert tok.encode("<|im_start|>ab a12", add_special_tokens=False) == [
      1, 9, 10, 6, 7]  # as test_import_gguf works it out
  provenance = json.loads((tmp_path / "out" / export.PROVENANCE).read_text())
  assert provenance["source"] == "final" and provenance["step"] is None


def _save_checkpoint(workdir, stage, step, params, model_path):
  ckpt = checkpoint_lib.Checkpointer(workdir / "ckpt" / stage, every_steps=1,
                                     keep=2, async_save=False)
  arrays = dict(params=params, opt_state={"mu": params},
                step=jnp.int32(step), rng=jax.random.PRNGKey(0))
  config = {"model": dict(path=str(model_path), dtype="float32",
                          param_dtype="float32", init_seed=0, cache_dir="")}
  ckpt.save(step, arrays, config=config, force=True)
  ckpt.close()


def test_latest_checkpoint_params_are_exported(tmp_path):
  base = tmp_path / "base"
  tiny_model_dir(base, "llama_tied")
  cfg = hf.read_config(base)
  params = hf.load_params(base, cfg)
  rng = np.random.default_rng(1)
  trained = jax.tree.map(
      lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
      params)
  run = tmp_path / "run"
  _save_checkpoint(run, "sft", 2, params, base)
  os.utime(run / "ckpt" / "sft" / "2", (1, 1))  # older than the dpo step
  _save_checkpoint(run, "dpo", 3, trained, base)

  # No final: the newest checkpoint, dpo step 3, with the trained params.
  src, out, _ = export.export(run, tmp_path / "out")
  assert (src.kind, src.stage, src.step) == ("latest", "dpo", 3)
  got = hf.load_params(out, hf.read_config(out))
  jax.tree.map(npt.assert_array_equal, got, trained)
  tokens = _tokens(1)
  model = models.load_model(out)
  npt.assert_allclose(_transformers_logits(out, tokens),
                      np.asarray(model(jnp.asarray(tokens))), atol=1e-4, rtol=0)


def test_bfloat16_export(tmp_path):
  tiny_model_dir(tmp_path / "run" / "reference", "llama_untied")
  export.export(tmp_path / "run", tmp_path / "out", source="reference",
                dtype="bfloat16")
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["dtype"] == "bfloat16"
  got = hf.load_params(tmp_path / "out", hf.read_config(tmp_path / "out"))
  want = hf.load_params(tmp_path / "run" / "reference",
                        hf.read_config(tmp_path / "run" / "reference"))
  jax.tree.map(lambda g, w: npt.assert_array_equal(
      np.asarray(g, np.float32),
      np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32)), got, want)


# ----------------------------------------------------------------------------
# GGUF


def _gguf_fields(path):
  reader = gguf.GGUFReader(path)
  return reader, {k: f.contents() for k, f in reader.fields.items()}


@pytest.mark.parametrize("variant, arch", [
    ("llama_untied", "llama"), ("llama_tied", "llama"),
    ("llama_attn_bias", "llama"), ("qwen2", "qwen2")])
def test_gguf_reads_back_and_imports_as_f16_rounded_weights(
    tmp_path, monkeypatch, variant, arch):
  tiny_model_dir(tmp_path / "hf", variant, monkeypatch)
  path = export_gguf.write(tmp_path / "hf", tmp_path / "m.gguf")
  reader, meta = _gguf_fields(path)
  head_dim = 16 if variant == "llama_tied" else 32 // 4
  expected = {
      "general.architecture": arch, "general.file_type": 1,  # MOSTLY_F16
      f"{arch}.block_count": 2, f"{arch}.embedding_length": 32,
      f"{arch}.feed_forward_length": 48, f"{arch}.context_length": 64,
      f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2,
      f"{arch}.attention.key_length": head_dim,
      f"{arch}.rope.dimension_count": head_dim, f"{arch}.vocab_size": V,
      "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
      "tokenizer.ggml.merges": tiny_gguf.MERGES,
      "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
      "tokenizer.ggml.padding_token_id": 2,
      "tokenizer.ggml.unknown_token_id": 0,
      "tokenizer.ggml.add_bos_token": False,
      "tokenizer.chat_template": tiny_gguf.TEMPLATE}
  assert {k: meta[k] for k in expected} == expected
  npt.assert_allclose(meta[f"{arch}.attention.layer_norm_rms_epsilon"], 1e-6,
                      rtol=1e-7)
  theta = 1e6 if arch == "qwen2" else 10000.0
  assert meta[f"{arch}.rope.freq_base"] == theta
  # 12 real tokens, then llama.cpp's padding names for ids 12..95.
  assert meta["tokenizer.ggml.tokens"] == tiny_gguf.TOKENS + [
      f"[PAD{i}]" for i in range(12, V)]
  assert meta["tokenizer.ggml.token_type"] == tiny_gguf.TYPES + [5] * (V - 12)
  types = {t.name: t.tensor_type for t in reader.tensors}
  assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
  assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
  tied = variant in ("llama_tied", "qwen2")  # torch_oracle.VARIANTS
  assert ("output.weight" in types) == (not tied)

  # Back through our own importer: f16-rounded matrices, exact 1-D tensors.
  back = import_gguf.convert(path, tmp_path / "back")
  got = st_numpy.load_file(back / "model.safetensors")
  want = st_numpy.load_file(tmp_path / "hf" / "model.safetensors")
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    rounded = w.astype(np.float16).astype(np.float32) if w.ndim == 2 else w
    npt.assert_array_equal(got[name], rounded, err_msg=name)
  assert hf.read_config(back) == hf.read_config(tmp_path / "hf")


@pytest.mark.parametrize("variant, permuted", [("llama_untied", True),
                                               ("qwen2", False)])
def test_gguf_qk_rows_are_in_llamacpp_order(tmp_path, variant, permuted):
  tiny_model_dir(tmp_path / "hf", variant)
  reader, _ = _gguf_fields(export_gguf.write(tmp_path / "hf", tmp_path / "m.gguf"))
  stored = {t.name: np.asarray(t.data) for t in reader.tensors}
  want = st_numpy.load_file(tmp_path / "hf" / "model.safetensors")
  for proj, heads in (("q", 4), ("k", 2)):
    hf_w = want[f"model.layers.1.self_attn.{proj}_proj.weight"]
    order = (tiny_gguf.llamacpp_row_order(heads, 8) if permuted
             else np.arange(hf_w.shape[0]))
    npt.assert_array_equal(stored[f"blk.1.attn_{proj}.weight"],
                           hf_w[order].astype(np.float16))


def test_llama3_rope_factors_by_hand():
  # H=8, theta 5e5: inv_freq = 5e5^(-i/4) = 1, 0.0376, 0.00141, 5.3e-5, so
  # wavelengths 2pi/inv = 6.28, 167, 4443, 1.2e5. Window: high 16/4 = 4, low
  # 16/1 = 16. 6.28 lies between: smooth = (16/6.283 - 1)/(4 - 1) = 0.5155,
  # factor = 1/((1 - 0.5155)/8 + 0.5155) = 1.7360; the others exceed 16: 8.
  cfg = models.llama.LlamaConfig(
      vocab_size=8, hidden_size=32, intermediate_size=8, num_layers=1,
      num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=5e5,
      rope_scaling=("llama3", 8.0, 1.0, 4.0, 16.0))
  npt.assert_allclose(export_gguf.rope_factors(cfg), [1.7360, 8, 8, 8],
                      rtol=2e-4)


@pytest.mark.parametrize("variant, match", [
    ("qwen3", "model_type='qwen3' cannot be exported"),
    ("llama_bias", "mlp_bias=true")])
def test_gguf_refuses_what_llamacpp_cannot_run(tmp_path, variant, match):
  tiny_model_dir(tmp_path / "hf", variant)
  with pytest.raises(export_gguf.ExportError, match=match):
    export_gguf.write(tmp_path / "hf", tmp_path / "m.gguf")
  assert not (tmp_path / "m.gguf").exists()


def test_gguf_refuses_a_non_bpe_tokenizer(tmp_path, char_tok):  # noqa: F811
  torch_oracle.make_checkpoint("llama_untied", tmp_path)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    (tmp_path / name).write_bytes(
        (pathlib.Path(char_tok.hf.name_or_path) / name).read_bytes())
  with pytest.raises(export_gguf.ExportError, match="byte-level BPE"):
    export_gguf.write(tmp_path, tmp_path / "m.gguf")


@pytest.mark.parametrize("pre, name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
     "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]},
     "smollm"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": import_gguf.SPLIT_REGEX["qwen2"]},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
     "qwen2"),
])
def test_pre_tokenizer_names(pre, name):
  assert export_gguf.pre_tokenizer_name(pre) == name


def test_unknown_pre_tokenizer_is_refused():
  with pytest.raises(export_gguf.ExportError, match="Whitespace"):
    export_gguf.pre_tokenizer_name({"type": "Whitespace"})


# ----------------------------------------------------------------------------
# Errors


def test_missing_paths_are_named(tmp_path):
  with pytest.raises(export.ExportError, match=f"--workdir {tmp_path}/nope: "
                     "no such directory"):
    export.find_source(tmp_path / "nope")
  with pytest.raises(export.ExportError,
                     match=f"--source=final: {tmp_path}/final/config.json "
                     "not found"):
    export.find_source(tmp_path, "final")
  with pytest.raises(export.ExportError,
                     match=f"{tmp_path}/reference/config.json not found"):
    export.find_source(tmp_path, "reference")
  # Default: neither a final model nor a complete checkpoint (a temporary
  # orbax directory does not count).
  (tmp_path / "ckpt" / "sft" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
  with pytest.raises(export.ExportError, match=(
      f"{tmp_path}/final/config.json not found and no complete checkpoint "
      f"under {tmp_path}/ckpt/<stage>/<step>/$")):
    export.find_source(tmp_path)


def test_non_empty_out_needs_overwrite(tmp_path):
  tiny_model_dir(tmp_path / "run" / "final", "llama_untied")
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("x")
  with pytest.raises(export.ExportError, match="--overwrite"):
    export.export(tmp_path / "run", tmp_path / "out")
  export.export(tmp_path / "run", tmp_path / "out", overwrite=True)
  assert not (tmp_path / "out" / "keep.txt").exists()
  assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_names_the_missing_final_dir(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "purld_jax.export", f"--workdir={tmp_path}",
       f"--out={tmp_path}/out", "--source=final"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"export: error: --source=final: {tmp_path}/final/config.json not "
      "found (no final model in this workdir; the run has not finished "
      "stage 2)")
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# The embedded SmolLM2 in llama.cpp

CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "user", "content": "Write a haiku about the sea."}],
         [{"role": "user", "content": "What is 12 + 7? Answer briefly."}]]
GREEDY_TOKENS = 16
# The GGUF holds the f32 weights rounded to f16 (and llama.cpp keeps an f16
# KV cache), so a greedy choice between two near-tied tokens may flip. The
# texts must agree token for token up to the first position where our f32
# model's top-2 logit margin is below MARGIN; none diverged when written.
MARGIN = 0.5


def _llamacpp_greedy(llm, ids, n):
  out = []
  for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
    if t == llm.token_eos() or len(out) == n:
      break
    out.append(int(t))
  return out


@pytest.mark.llamacpp
@pytest.mark.slow
def test_smollm2_gguf_greedy_text_matches_jax(tmp_path):
  llama_cpp = pytest.importorskip("llama_cpp")
  from purld_jax import sampling
  from purld_jax.models import embedded
  from purld_jax.models import tokenizer as tok_lib
  src = embedded.ensure_converted()
  path = export_gguf.write(src, tmp_path / "smollm2-f16.gguf")

  # The vocabulary and its metadata equal llama.cpp's own conversion.
  _, ours = _gguf_fields(path)
  _, theirs = _gguf_fields(embedded.gguf_path())
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
              "tokenizer.ggml.merges", "tokenizer.ggml.pre",
              "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
              "llama.rope.freq_base", "llama.attention.head_count_kv"):
    assert ours[key] == theirs[key], key

  model, tok = models.load_pretrained(src)
  prompts = [tok.encode_chat(c) for c in CHATS]
  tokens, mask = sampling.pad_prompts(prompts, tok.pad_id)
  graphdef, params = nnx.split(model)
  cands = sampling.sample(
      graphdef, params, jnp.asarray(tokens), jnp.asarray(mask),
      jax.random.PRNGKey(0),
      prompt_index=jnp.arange(3, dtype=jnp.int32), num_candidates=1,
      sampling=sampling.SamplingParams(temperature=0.0,
                                       max_new_tokens=GREEDY_TOKENS,
                                       stop_ids=tok.stop_ids),
      pad_id=tok.pad_id)
  llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2,
                        verbose=False)
  for b, prompt in enumerate(prompts):
    text = tok.render_chat(CHATS[b])
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
    n = int(cands.lengths[b, 0])
    jax_ids = [int(t) for t in cands.tokens[b, 0, :n] if t not in tok.stop_ids]
    cpp_ids = _llamacpp_greedy(llm, prompt, GREEDY_TOKENS)
    if jax_ids == cpp_ids:
      continue
    # A flip: only where our top-2 margin is within the f16 rounding.
    first = next(i for i, (a, c) in enumerate(zip(jax_ids, cpp_ids)) if a != c)
    row, row_mask = tok_lib.pad_left([prompt + jax_ids], tok.pad_id)
    logits = np.asarray(model(jnp.asarray(row), attention_mask=jnp.asarray(
        row_mask)))[0, len(prompt) - 1 + first]
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] < MARGIN, (tok.decode(jax_ids), tok.decode(cpp_ids))
  llm.close()


def test_an_export_of_the_same_weights_is_not_written_again(tmp_path):
  tiny_model_dir(tmp_path / "run" / "final", "llama_untied")
  out = tmp_path / "out"
  _, _, written = export.export(tmp_path / "run", out, skip_if_current=True)
  assert written
  weights = out / "model.safetensors"
  first = weights.stat().st_mtime_ns
  _, _, written = export.export(tmp_path / "run", out, overwrite=True,
                                skip_if_current=True)
  assert not written and weights.stat().st_mtime_ns == first
  # Other options (bfloat16) are another export: written.
  _, _, written = export.export(tmp_path / "run", out, overwrite=True,
                                dtype="bfloat16", skip_if_current=True)
  assert written
  # Changed weights (one byte of the source's safetensors): written again.
  src = tmp_path / "run" / "final" / "model.safetensors"
  data = bytearray(src.read_bytes())
  data[-1] ^= 1
  src.write_bytes(bytes(data))
  assert not export.up_to_date(str(out), export.find_source(
      str(tmp_path / "run")), dtype="bfloat16")
  _, _, written = export.export(tmp_path / "run", out, overwrite=True,
                                dtype="bfloat16", skip_if_current=True)
  assert written
