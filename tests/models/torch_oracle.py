"""Tiny random Hugging Face checkpoints built with transformers + torch.

Test-only: torch is the independent reference, never imported at run time.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-6)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
               "rope_theta": 500000.0}

VARIANTS = {
    "llama_untied": ("LlamaForCausalLM", "LlamaConfig",
                     dict(tie_word_embeddings=False)),
    "llama_tied": ("LlamaForCausalLM", "LlamaConfig",
                   dict(tie_word_embeddings=True, head_dim=16)),
    "llama3_rope": ("LlamaForCausalLM", "LlamaConfig",
                    dict(tie_word_embeddings=False,
                         rope_parameters=LLAMA3_ROPE)),
    "llama_bias": ("LlamaForCausalLM", "LlamaConfig",
                   dict(attention_bias=True, mlp_bias=True)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config",
              dict(tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default",
                                    "rope_theta": 1e6})),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config",
              dict(tie_word_embeddings=False, head_dim=12)),
}


def make_checkpoint(variant: str, out_dir, seed: int = 0):
  """Writes a random checkpoint of `variant` to out_dir; returns the model.

  Norm scales and biases are randomised too, so a wrong mapping of any
  tensor shows up in the logits.
  """
  model_cls, cfg_cls, extra = VARIANTS[variant]
  cfg = getattr(transformers, cfg_cls)(**BASE, **extra)
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(cfg)
  return randomized_save(model, out_dir)


def randomized_save(model, out_dir):
  """Every weight of `model` drawn anew (norm scales near 1, biases and the
  rest around 0), in f32, saved to out_dir as safetensors; returns it.

  Norm scales and biases are randomised too, so a wrong mapping of any
  tensor shows up in the logits.
  """
  model = model.to(torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith(".weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  model.save_pretrained(str(out_dir), safe_serialization=True)
  return model


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None
                 ) -> np.ndarray:
  """f32[B, T, V] logits of the transformers model."""
  ids = torch.from_numpy(np.asarray(tokens, np.int64))
  kw = {}
  if mask is not None:
    kw["attention_mask"] = torch.from_numpy(np.asarray(mask, np.int64))
  with torch.no_grad():
    return model(input_ids=ids, **kw).logits.float().numpy()
