"""`LlamaConfig`: the switches of the one decoder (models/llama.py).

Axis letters (see structs.py): L layers, V vocab, D width, N query heads,
G kv heads, H head dim, F mlp, R = N // G query heads per kv head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from purld_jax.models import lora as lora_lib


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a decoder. `from_hf` builds it from a config.json."""

  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # G
  head_dim: int  # H
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_pos)
  # or ("linear", factor) or None.
  rope_scaling: tuple | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2/2.5
  o_bias: bool = False  # Llama `attention_bias` also biases o_proj
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3
  # Qwen2.5-VL's M-RoPE: how many of the H/2 frequencies take the temporal,
  # height and width position (positions i32[3, B, T]; layers.rope_angles).
  mrope_section: tuple[int, ...] | None = None
  model_type: str = "llama"
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32  # compute dtype
  # What a layer keeps for the backward pass (layer_stack.REMAT_POLICIES):
  # "none" keeps every activation, "full" only the layer's input (the layer
  # is run again in the backward pass), "dots" the weight matmuls' outputs
  # (attention and elementwise ops are recomputed). The values computed are
  # the same.
  remat: str = "none"
  # Run the layers as one `lax.scan` over their parameters stacked on a
  # leading axis (`layer_stack.over_layers`): one layer is traced and
  # compiled instead of L, so compilation is several times faster; each call
  # stacks a copy of the layer weights. False: a Python loop, unrolled by XLA.
  scan_layers: bool = False
  # LoRA adapters on the projections (models/lora.py), None = none.
  lora: lora_lib.LoraSpec | None = None

  @property
  def q_per_kv(self) -> int:
    """R, query heads that share one kv head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count (what the checkpoint holds)."""
    d, f, n, g, h = (self.hidden_size, self.intermediate_size,
                     self.num_heads, self.num_kv_heads, self.head_dim)
    attn = d * n * h * 2 + d * g * h * 2
    if self.qkv_bias:
      attn += n * h + 2 * g * h
    if self.o_bias:
      attn += d
    if self.qk_norm:
      attn += 2 * h
    mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
    layer = attn + mlp + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * layer + emb + d

  @classmethod
  def from_hf(cls, hf: dict, *, source: str = "config.json",
              param_dtype=jnp.float32, dtype=jnp.float32) -> "LlamaConfig":
    """Builds a config from a Hugging Face config dict.

    Args:
      hf: the parsed config.json.
      source: where `hf` came from, used in error messages.
      param_dtype: dtype parameters are stored in.
      dtype: compute dtype.

    Raises:
      ValueError naming the file and the field for anything unsupported.
    """
    from purld_jax.models import hf_config  # local: keeps this file model-only
    return cls(**hf_config.parse(hf, source=source),
               param_dtype=param_dtype, dtype=dtype)


def tiny_config(**overrides) -> LlamaConfig:
  """A random-init config small enough for unit tests on CPU."""
  base = dict(vocab_size=128, hidden_size=32, intermediate_size=64,
              num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              rms_norm_eps=1e-6, rope_theta=10000.0,
              max_position_embeddings=256)
  base.update(overrides)
  return LlamaConfig(**base)
