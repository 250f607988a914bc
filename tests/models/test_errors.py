"""Bad checkpoints and configs fail with the file and the field named."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from purld_jax import models
from purld_jax.models import hf
from purld_jax.models import hf_config
from purld_jax.models import llama
from flax import nnx

TINY = dict(model_type="llama", vocab_size=16, hidden_size=8,
            intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=True)


def _write(d, cfg=TINY, drop=None, reshape=None):
  d.mkdir(parents=True, exist_ok=True)
  (d / "config.json").write_text(json.dumps(cfg))
  model = llama.Llama(llama.LlamaConfig(**hf_config.parse(cfg)),
                      rngs=nnx.Rngs(0))
  hf.save_params(model, d)
  if drop or reshape:
    from safetensors.numpy import load_file
    t = load_file(str(d / "model.safetensors"))
    if drop:
      del t[drop]
    if reshape:
      t[reshape] = t[reshape][:-1]
    save_file(t, str(d / "model.safetensors"))
  return d


def test_missing_config_names_the_file(tmp_path):
  with pytest.raises(hf.CheckpointError, match=r"config\.json: not found"):
    models.load_model(tmp_path)


def test_invalid_json_names_line(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "llama",\n oops}')
  with pytest.raises(hf.CheckpointError, match=r"config\.json: invalid JSON "
                     r"at line 2"):
    models.load_model(tmp_path)


@pytest.mark.parametrize("change, field", [
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
     "rope_scaling.rope_type='yarn'"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}),
     "rope_parameters.low_freq_factor"),
    (dict(num_attention_heads=3, num_key_value_heads=2), "num_key_value_heads"),
])
def test_unsupported_fields_are_named(tmp_path, change, field):
  (tmp_path / "config.json").write_text(json.dumps({**TINY, **change}))
  with pytest.raises(hf_config.ConfigError) as e:
    models.load_model(tmp_path)
  assert str(tmp_path / "config.json") in str(e.value)
  assert field in str(e.value)


def test_missing_required_field(tmp_path):
  cfg = dict(TINY)
  del cfg["vocab_size"]
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf_config.ConfigError, match="'vocab_size' is missing"):
    models.load_model(tmp_path)


def test_missing_tensor_names_file_and_tensor(tmp_path):
  d = _write(tmp_path, drop="model.layers.0.mlp.up_proj.weight")
  with pytest.raises(hf.CheckpointError) as e:
    models.load_model(d)
  assert "model.safetensors" in str(e.value)
  assert "model.layers.0.mlp.up_proj.weight" in str(e.value)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
  d = _write(tmp_path, reshape="model.layers.0.self_attn.k_proj.weight")
  with pytest.raises(hf.CheckpointError) as e:
    models.load_model(d)
  msg = str(e.value)
  assert "model.layers.0.self_attn.k_proj.weight" in msg
  assert "(3, 8)" in msg and "expected (4, 8)" in msg


def test_corrupt_safetensors_names_file(tmp_path):
  d = _write(tmp_path)
  raw = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(raw[: len(raw) // 3])
  with pytest.raises(hf.CheckpointError, match="unreadable safetensors"):
    models.load_model(d)


def test_no_weights_at_all(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(TINY))
  (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
  with pytest.raises(hf.CheckpointError, match="never loaded"):
    models.load_model(tmp_path)


def test_loads_what_it_wrote(tmp_path):
  d = _write(tmp_path)
  model = models.load_model(d)
  out = model(np.arange(5, dtype=np.int32)[None])
  assert out.shape == (1, 5, 16)
