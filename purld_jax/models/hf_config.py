"""Hugging Face `config.json` <-> `LlamaConfig` fields.

Reads both the transformers-4 layout (`rope_theta`, `rope_scaling`) and the
transformers-5 layout (`rope_parameters`). Anything the decoder does not
implement fails with the file and the field named, never silently.
"""

from __future__ import annotations

from typing import Any

SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class ConfigError(ValueError):
  """An unsupported or malformed config.json field."""


def _need(hf: dict, key: str, source: str):
  if key not in hf or hf[key] is None:
    raise ConfigError(f"{source}: required field {key!r} is missing")
  return hf[key]


def _rope(hf: dict, source: str) -> tuple[float, tuple | None]:
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and params:
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = dict(params)
    field = "rope_parameters"
  else:
    theta = hf.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or {}
    field = "rope_scaling"
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind in (None, "default"):
    return float(theta), None
  if kind == "linear":
    return float(theta), ("linear", float(scaling["factor"]))
  if kind == "llama3":
    try:
      return float(theta), (
          "llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
          float(scaling["high_freq_factor"]),
          float(scaling["original_max_position_embeddings"]))
    except KeyError as e:
      raise ConfigError(f"{source}: {field}.{e.args[0]} is missing for "
                        "rope type 'llama3'") from None
  raise ConfigError(f"{source}: {field}.rope_type={kind!r} is not supported "
                    "(supported: default, linear, llama3)")


def parse(hf: dict, *, source: str = "config.json") -> dict[str, Any]:
  """LlamaConfig keyword arguments from a config.json dict.

  Raises:
    ConfigError naming `source` and the offending field.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    raise ConfigError(
        f"{source}: model_type={model_type!r} is not supported "
        f"(supported: {', '.join(sorted(SUPPORTED))})")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ConfigError(f"{source}: hidden_act={act!r} is not supported (silu)")
  if hf.get("use_sliding_window"):
    raise ConfigError(f"{source}: use_sliding_window=true is not supported")
  layer_types = hf.get("layer_types")
  if layer_types and any(t != "full_attention" for t in layer_types):
    raise ConfigError(f"{source}: layer_types other than 'full_attention' are "
                      "not supported")
  if hf.get("pretraining_tp", 1) not in (None, 1):
    raise ConfigError(f"{source}: pretraining_tp != 1 is not supported")
  d = int(_need(hf, "hidden_size", source))
  n = int(_need(hf, "num_attention_heads", source))
  g = int(hf.get("num_key_value_heads") or n)
  if n % g:
    raise ConfigError(f"{source}: num_attention_heads={n} is not a multiple "
                      f"of num_key_value_heads={g}")
  head_dim = hf.get("head_dim") or d // n
  theta, scaling = _rope(hf, source)
  attention_bias = bool(hf.get("attention_bias", False))
  if model_type == "qwen2":
    qkv_bias, o_bias = True, False
  else:
    qkv_bias, o_bias = attention_bias, attention_bias
  return dict(
      vocab_size=int(_need(hf, "vocab_size", source)),
      hidden_size=d,
      intermediate_size=int(_need(hf, "intermediate_size", source)),
      num_layers=int(_need(hf, "num_hidden_layers", source)),
      num_heads=n,
      num_kv_heads=g,
      head_dim=int(head_dim),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      rope_scaling=scaling,
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      qk_norm=model_type == "qwen3",
      model_type=model_type,
  )


def to_hf(cfg, *, torch_dtype: str = "float32", extra: dict | None = None
          ) -> dict[str, Any]:
  """A config.json dict that transformers reads back as the same model."""
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None and cfg.rope_scaling[0] == "linear":
    rope.update(rope_type="linear", factor=cfg.rope_scaling[1])
  elif cfg.rope_scaling is not None:
    _, factor, low, high, orig = cfg.rope_scaling
    rope.update(rope_type="llama3", factor=factor, low_freq_factor=low,
                high_freq_factor=high, original_max_position_embeddings=orig)
  out: dict[str, Any] = dict(extra or {})
  out.update(
      architectures=[SUPPORTED[cfg.model_type]],
      model_type=cfg.model_type,
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim,
      hidden_act="silu",
      rms_norm_eps=cfg.rms_norm_eps,
      rope_theta=cfg.rope_theta,
      rope_parameters=rope,
      max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_word_embeddings,
      torch_dtype=torch_dtype,
      dtype=torch_dtype,
  )
  out.pop("rope_scaling", None)
  if cfg.model_type == "llama":
    out.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
  elif cfg.model_type == "qwen3":
    out.update(attention_bias=cfg.qkv_bias)
  return out
