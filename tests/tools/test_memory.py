"""tools/memory.py: the estimate's arithmetic, by hand, on tiny shapes."""

import pytest
from jax.sharding import AbstractMesh

from purld_jax import sharding
from purld_jax.models import llama
from purld_jax.tools import aot
from purld_jax.tools import memory

# tiny_config: V 128, D 32, F 64, L 2, N 4, G 2, H 8, untied, f32.
CFG = llama.tiny_config()


def _mesh(*sizes):
  return AbstractMesh(sizes, sharding.MESH_AXES)


def test_param_bytes_by_hand():
  # unsplit: embed + lm_head 2 * 128 * 32 = 8192; per layer q, o 32 * 32,
  # k, v 32 * 16, mlp 3 * 32 * 64 = 9216 -> 2 * 9216 = 18432; norms (2 per
  # layer + final) 5 * 32 = 160. 26784 floats.
  assert CFG.num_params() == 26784
  assert memory.param_bytes(CFG, _mesh(8, 1, 1)) == 26784 * 4
  # (2, 2, 2): every matrix split over fsdp and tensor (1/4), norms over
  # fsdp only (1/2): (8192 + 18432) / 4 + 160 / 2 = 6736 floats.
  assert memory.param_bytes(CFG, _mesh(2, 2, 2)) == 6736 * 4


def test_activation_bytes_by_hand():
  # none, f32 (c = 4), one device: per token and layer 4 * (4 * 32 + 2 * 32
  # + 2 * 16 + 3 * 64) = 1664; attention 8 * 4 heads * 10 attended = 320.
  # 4 tokens: 1664 * 4 + 320 = 6976 per layer, 2 layers: 13952.
  got = memory.activation_bytes(CFG, _mesh(1, 1, 1), tokens=4, attended=10,
                                remat="none")
  assert got == 13952
  # full: the layer input, 4 * 32 * 4 tokens = 512 per layer, 2 layers,
  # + one layer redone at a time (6976): 2 * 512 + 6976 = 8000.
  got = memory.activation_bytes(CFG, _mesh(1, 1, 1), tokens=4, attended=10,
                                remat="full")
  assert got == 8000
  # rows over data x fsdp = 4 devices (4 tokens divide): a quarter; heads
  # and mlp over tensor 1.
  got = memory.activation_bytes(CFG, _mesh(2, 2, 1), tokens=4, attended=10,
                                remat="full")
  assert got == 8000 // 4


def test_kv_cache_by_hand():
  # per slot 2 (k, v) * 2 layers * 2 kv heads * 8 * 4 bytes = 256.
  # B 2, P 3, K 2, T 5: ours 2 * 3 + 2 * 2 * 32 (own slots in chunks of 32)
  # = 134 slots; naive 2 * 2 * (3 + 5) = 32 slots.
  s = aot.Shapes("grpo", b=2, k=2, p=3, t=5, u=2)
  est = memory.estimate(CFG, _mesh(1, 1, 1), s)
  assert est["kv_cache"] == 134 * 256
  assert est["kv_cache_naive"] == 32 * 256
  assert est["optimizer"] == 2 * est["params"]
  assert est["reference"] == 0  # GRPO takes reference log-probs, not params


def test_table_without_compile_says_so():
  s = aot.Shapes("dpo", b=2, k=2, p=3, t=5, u=2)
  text = memory.table(memory.estimate(CFG, _mesh(1, 1, 1), s))
  assert "= train step peak" in text
  assert "not compiled here" in text
  with pytest.raises(ValueError, match="remat 'some' is not one of"):
    memory.estimate(CFG.replace(remat="some"), _mesh(1, 1, 1), s)


def test_scan_layers_adds_the_stacked_copies_by_hand():
  # scan_layers stacks the layers' weights (18432 matrix + 2 * 2 * 32 norm
  # floats = 18560) per call, and their gradient: 2 * 18560 * 4 bytes.
  s = aot.Shapes("dpo", b=2, k=2, p=3, t=5, u=2)
  assert memory.estimate(CFG, _mesh(1, 1, 1), s)["stacked_layers"] == 0
  est = memory.estimate(CFG.replace(scan_layers=True), _mesh(1, 1, 1), s)
  assert est["stacked_layers"] == 2 * 18560 * 4
  assert "stacked layer weights" in memory.table(est)


def test_micro_batches_shrink_activations_by_hand():
  # n = 2 slices of B 4 prompts: activations and logits of 2 prompts at a
  # time, one more gradient-sized buffer (the accumulator); the sampler's
  # cache is the whole batch's.
  s = aot.Shapes("dpo", b=4, k=2, p=3, t=5, u=2)
  half = aot.Shapes("dpo", b=2, k=2, p=3, t=5, u=2)
  one = memory.estimate(CFG, _mesh(1, 1, 1), s)
  two = memory.estimate(CFG, _mesh(1, 1, 1), s, micro_batches=2)
  want = memory.estimate(CFG, _mesh(1, 1, 1), half)
  assert two["activations"] == want["activations"] < one["activations"]
  assert two["logits"] == want["logits"]
  assert two["gradients"] == 2 * one["gradients"] == 2 * one["params"]
  assert two["kv_cache"] == one["kv_cache"]


def test_half_state_counts_two_bytes_a_parameter_by_hand():
  # opt.mu_dtype / rl.reference_dtype bfloat16: mu and the DPO reference at
  # 2 bytes a parameter instead of 4 (f32 params); nu and the params stay.
  s = aot.Shapes("dpo", b=2, k=2, p=3, t=5, u=2)
  f32 = memory.estimate(CFG, _mesh(1, 1, 1), s)
  half = memory.estimate(CFG, _mesh(1, 1, 1), s, mu_dtype="bfloat16",
                         reference_dtype="bfloat16")
  p = f32["params"]
  assert f32["optimizer"] == 2 * p and f32["reference"] == p
  assert half["optimizer"] == p + p // 2 and half["reference"] == p // 2
  assert half["params"] == p and half["gradients"] == f32["gradients"]


def test_vision_language_params_count_the_tower_by_hand(monkeypatch):
  """configs/arch/smolvlm-500m: the SigLIP tower and the connector are
  trained with the decoder, so params count them; the activations are the
  decoder's alone."""
  import os  # pylint: disable=g-import-not-at-top
  from purld_jax.models import idefics3_hf  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  cfg = idefics3_hf.read_config("configs/arch/smolvlm-500m")
  e, f, layers, patch, side = 768, 3072, 12, 16, 512
  tower = (e * 3 * patch * patch + e                 # patch embedding
           + (side // patch) ** 2 * e                # learned positions
           + layers * (4 * (e * e + e)               # q, k, v, o with bias
                       + e * f + f + f * e + e       # MLP with bias
                       + 4 * e)                      # two LayerNorms
           + 2 * e)                                  # post LayerNorm
  connector = e * 4 ** 2 * 960                       # pixel shuffle x4, no bias
  total = cfg.text.num_params() + tower + connector
  assert memory.num_params(cfg) == total
  assert memory.param_bytes(cfg, _mesh(1, 1, 1)) == total * 4
  s = aot.Shapes("grpo", b=2, k=2, p=8, t=4, u=2)
  est = memory.estimate(cfg, _mesh(1, 1, 1), s)
  text = memory.estimate(cfg.text, _mesh(1, 1, 1), s)
  assert est["params"] == total * 4 and est["optimizer"] == 2 * total * 4
  assert est["activations"] == text["activations"]
  assert est["kv_cache"] == text["kv_cache"]
