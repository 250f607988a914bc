"""tools/memory.py and tools/aot.py with `model.lora`: the adapters are what
is trained (params, gradients, Adam), the base is held once, the reference
of DPO / LDL is zero adapters over that base. Expected bytes by hand from
the tiny config's shapes; the compiled LoRA step's arguments against them.

  .venv/bin/python -m pytest -q tests/tools/test_memory_lora.py
"""

import jax
import pytest
from jax.sharding import AbstractMesh

from purld_jax import sharding
from purld_jax.models import llama
from purld_jax.models import lora
from purld_jax.tools import aot
from purld_jax.tools import memory
from tests import train_fixtures

# tiny_config: V 128, D 32, F 64, L 2, N 4, G 2, H 8, untied, f32; 26784
# base floats (tests/tools/test_memory.py). Rank 4 on all seven targets,
# A [in, 4] + B [4, out] each, per layer:
#   q_proj 32*4 + 4*32 = 256     k_proj, v_proj 32*4 + 4*16 = 192 each
#   o_proj 32*4 + 4*32 = 256     gate, up 32*4 + 4*64 = 384 each
#   down_proj 64*4 + 4*32 = 384
# = 2048 per layer, 4096 floats over 2 layers.
CFG = llama.tiny_config(lora=lora.LoraSpec(rank=4, alpha=8.0))
ADAPTERS, BASE = 4096, 26784


def _mesh(*sizes):
  return AbstractMesh(sizes, sharding.MESH_AXES)


def test_lora_estimate_by_hand():
  s = aot.Shapes("dpo", b=2, k=2, p=3, t=5, u=2)
  assert memory.part_bytes(CFG, _mesh(1, 1, 1)) == (ADAPTERS * 4, BASE * 4)
  est = memory.estimate(CFG, _mesh(1, 1, 1), s)
  assert est["params"] == ADAPTERS * 4       # trained: the adapters
  assert est["frozen"] == BASE * 4           # the base, once
  assert est["optimizer"] == 2 * ADAPTERS * 4  # Adam's mu, nu of adapters
  assert est["gradients"] == ADAPTERS * 4
  assert est["reference"] == ADAPTERS * 4    # zero adapters, not a base
  full = memory.estimate(CFG.replace(lora=None), _mesh(1, 1, 1), s)
  assert (full["params"], full["frozen"], full["reference"]) == (
      BASE * 4, 0, BASE * 4)
  assert est["activations"] == full["activations"]  # counted the same
  # grad_accum adds an adapter-sized accumulator; GRPO takes no reference.
  assert memory.estimate(CFG, _mesh(1, 1, 1), s, grad_accum=2)[
      "optimizer"] == 3 * ADAPTERS * 4
  grpo = aot.Shapes("grpo", b=2, k=2, p=3, t=5, u=2)
  assert memory.estimate(CFG, _mesh(1, 1, 1), grpo)["reference"] == 0
  # (2, 2, 2): A [in, r] splits in on fsdp (embed) or tensor (mlp, heads),
  # B [r, out] splits out likewise: every adapter leaf in 2. The base:
  # 6736 floats (matrices in 4, norms in 2).
  assert memory.part_bytes(CFG, _mesh(2, 2, 2)) == (ADAPTERS // 2 * 4,
                                                    6736 * 4)
  # scan_layers stacks all the layers' weights (base 18560 floats in the
  # layers, + the 4096 adapter floats) and the adapters' gradient (4096).
  scan = memory.estimate(CFG.replace(scan_layers=True), _mesh(1, 1, 1), s)
  assert scan["stacked_layers"] == (18560 + 2 * ADAPTERS) * 4
  # The table: the frozen base is an argument, not an output.
  text = memory.table(est)
  rows = {line[2:42].strip(): line[42:].split()[0]
          for line in text.splitlines()[2:] if line.startswith("  ")}
  mib = lambda n: f"{n / 2**20:.1f}"
  assert rows["frozen base (held once, not donated)"] == mib(BASE * 4)
  assert rows["= arguments (without the batch)"] == mib(
      (BASE + 4 * ADAPTERS) * 4)
  assert rows["outputs (new state; donated)"] == mib(3 * ADAPTERS * 4)
  assert "params trained (LoRA adapters)" in rows


def test_config_architecture_keeps_lora():
  from purld_jax.train import student as student_lib  # pylint: disable=g-import-not-at-top
  c = train_fixtures.tiny_config(**{"model.lora.rank": 4,
                                    "model.lora.alpha": 8.0})
  cfg = student_lib.config_architecture(c.model)
  assert cfg.lora == lora.LoraSpec(rank=4, alpha=8.0)
  assert student_lib.config_architecture(
      train_fixtures.tiny_config().model).lora is None
  assert "LoRA r 4 on 7 targets: 0.004 M trained" in memory.lora_title(cfg)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_lora_dpo_step_compiles_with_the_estimated_arguments():
  """aot compiles the stages' LoRA step (FrozenStep); XLA's argument bytes
  per device are the estimate's (adapters, their Adam moments, the frozen
  base, zero-adapter reference) plus one prompt's batch, and the frozen
  base is not aliased to an output."""
  c = train_fixtures.tiny_config(**{
      "recipe": "dpo", "model.lora.rank": 4, "model.lora.alpha": 8.0,
      "rl.batch_size": 4, "data.max_prompt_len": 16, "mesh.data": 2,
      "mesh.fsdp": 2, "mesh.tensor": 2})
  mesh = sharding.make_mesh((2, 2, 2))
  lowered, s, arch = aot.lower_train_step(c, mesh)
  assert arch.lora is not None and (s.u, s.t) == (2, 8)
  compiled = lowered.compile()
  stats = compiled.memory_analysis()
  est = memory.estimate(arch, mesh, s)
  args = est["params"] + est["frozen"] + est["optimizer"] + est["reference"]
  assert args == (ADAPTERS // 2 + 6736 + 2 * ADAPTERS // 2
                  + ADAPTERS // 2) * 4
  # Per device, one prompt: prompt 16 (i32 + bool), members 2 x 8 (i32 +
  # bool), one pair (2 x i32 + bool); then scalars (step, rng, counters).
  batch = 16 * 5 + 2 * 8 * 5 + 9
  assert args + batch <= stats.argument_size_in_bytes <= args + batch + 64
  # Donated and aliased: the adapters and their moments, not the base.
  assert (3 * ADAPTERS // 2 * 4 <= stats.alias_size_in_bytes
          <= 3 * ADAPTERS // 2 * 4 + 64)
