"""tools/llamacpp.py: the server launcher's two safe settings."""

import pytest

from purld_jax.tools import llamacpp


def test_has_amx_reads_the_cpu_flags(tmp_path):
  f = tmp_path / "cpuinfo"
  f.write_text("flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
  assert llamacpp.has_amx(str(f))
  f.write_text("flags\t\t: fpu avx2 amx_bf16x\n")  # a word, not a prefix
  assert not llamacpp.has_amx(str(f))
  assert not llamacpp.has_amx(str(tmp_path / "missing"))


def test_without_extra_buffers_patches_the_model_params(monkeypatch):
  llama_py = pytest.importorskip("llama_cpp.llama")
  monkeypatch.setattr(llama_py.llama_cpp, "llama_model_default_params",
                      llama_py.llama_cpp.llama_model_default_params)
  assert llama_py.llama_cpp.llama_model_default_params().use_extra_bufts
  llamacpp.without_extra_buffers()
  llamacpp.without_extra_buffers()  # twice: patched once
  params = llama_py.llama_cpp.llama_model_default_params()
  assert not params.use_extra_bufts
  assert params.n_gpu_layers == llama_py.llama_cpp.llama_model_default_params(
      ).n_gpu_layers  # the rest is the library's default


def test_a_bad_mode_is_refused_in_one_line():
  with pytest.raises(SystemExit, match="--extra_bufts='x': one of auto"):
    llamacpp.main(["--extra_bufts=x", "--model", "m.gguf"])
