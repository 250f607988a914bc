"""Stage 2 on a small CPU mesh: every RL recipe end to end, and an exact
resume for LDL and for GRPO with several inner updates per step.

conftest.py gives 8 fake CPU devices; every run here is on mesh data 2
(rl.batch_size 2 of the tiny config: one prompt per device), with stage 1
skipped (sft.steps 0: the reference is the initial model). An uninterrupted
run per recipe (module fixture) serves both the mesh test and the resume
test. The interrupted run stops as a SIGTERM stops it (`preemption.request`
after step K is recorded, so Loop.maybe_save saves step K although it is not
due and raises Preempted): the config is the same as the uninterrupted
run's, so the schedule and the checkpoints' config are too. The resume runs
in the same process (the kill -9 tests of test_train_pu_rl.py and
test_train_sft.py resume in another).

  .venv/bin/python -m pytest -q tests/test_recipe_resume.py
"""

import os

import jax
import numpy as np
import pytest

from purld_jax import checkpoint as checkpoint_lib
from purld_jax import ledger as ledger_lib
from purld_jax import metrics as metrics_lib
from purld_jax import preemption
from purld_jax.models import hf
from purld_jax.train import loop as loop_lib
from purld_jax.train import pu_rl
from purld_jax.train import sft
from purld_jax.train import state as state_lib
from purld_jax.train import student as student_lib
from tests import train_fixtures
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(jax.device_count() < 2,
                                reason="needs 2 (fake) devices")

N, K = 3, 1   # RL steps of a run; the interrupted run stops after step K
INNER = 3     # loss.grpo.inner_iterations of the GRPO runs
MESH = {"data": 2, "fsdp": 1, "tensor": 1}
# Per recipe: its overrides and optimizer updates per RL step.
RECIPES = {"dpo": ({"rl.steps": 2}, 1),
           "grpo": ({"loss.grpo.inner_iterations": INNER}, INNER),
           "ldl": ({}, 1)}
# Metrics that are the computation's own (not timings): equal to the bit
# between the resumed run and the uninterrupted one.
EXACT = ("loss", "lr", "grad_norm", "skipped")


def _config(recipe):
  return train_fixtures.tiny_config(**{
      "recipe": recipe, "rl.steps": N, "sft.steps": 0,
      "mesh.data": MESH["data"], "mesh.fsdp": MESH["fsdp"],
      "mesh.tensor": MESH["tensor"], "log.tensorboard": False,
      "ranking.yes_word": "Y", "ranking.no_word": "N",
      **RECIPES[recipe][0]})


@pytest.fixture(autouse=True)
def _no_stop_left():
  preemption.clear()
  yield
  preemption.clear()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, jit_cache):  # noqa: F811
  """recipe -> (config, workdir, mesh shape) of an uninterrupted run on the
  mesh, made on first use and shared by this module's tests."""
  del jit_cache
  runs = {}

  def get(recipe):
    if recipe not in runs:
      cfg = _config(recipe)
      workdir = str(tmp_path_factory.mktemp(f"full_{recipe}"))
      meshes = []
      setup = loop_lib.mesh_setup

      def spy(*args, **kwargs):  # the mesh the stage really ran on
        mesh, param_sh = setup(*args, **kwargs)
        meshes.append(dict(mesh.shape))
        return mesh, param_sh
      with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_lib, "mesh_setup", spy)
        pu_rl.run(cfg, workdir)
      runs[recipe] = (cfg, workdir, meshes)
    return runs[recipe]
  return get


def _rows(workdir, recipe):
  return [r for r in metrics_lib.read(workdir) if r["stage"] == recipe]


def _params(workdir, which):
  cfg = train_fixtures.tiny_config()
  s = student_lib.from_config(cfg.model, str(workdir))
  return hf.load_params(os.path.join(workdir, which), s.cfg)


def _ledger(workdir):
  ledger = ledger_lib.Ledger(workdir, create=False)
  try:
    return ledger.stats()
  finally:
    ledger.close()


# ----------------------------------------------------------------------------
# Every recipe on the mesh


@pytest.mark.parametrize("recipe", ["dpo", "grpo", "ldl"])
def test_recipe_runs_on_a_data_2_mesh(recipe, full_run):
  """Catches a recipe that fails (or silently runs on one device) on a
  multi-device mesh, or whose updates do not move the params."""
  cfg, workdir, meshes = full_run(recipe)
  assert meshes == [MESH]  # one stage (sft.steps 0 builds no mesh)
  rows = _rows(workdir, recipe)
  assert [r["step"] for r in rows] == list(range(1, cfg.rl.steps + 1))
  for r in rows:
    assert np.isfinite(r["loss"]) and r["skipped"] == 0.0, r
    assert np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0.0, r
  ref = _params(workdir, sft.REFERENCE)
  final = _params(workdir, pu_rl.FINAL)
  assert jax.tree.structure(ref) == jax.tree.structure(final)
  moved = [not np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(final))]
  assert any(moved)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(final))


# ----------------------------------------------------------------------------
# Exact resume: LDL, and GRPO with INNER updates per RL step


@pytest.mark.parametrize("recipe", ["ldl", "grpo"])
def test_resume_after_sigterm_equals_an_uninterrupted_run(
    recipe, tmp_path, full_run):
  """Stopped after step K of N, resumed to N: the state at N (params,
  optimizer state, step, rng) is bit-identical to the uninterrupted run's,
  metrics.jsonl holds each step once with the same loss and learning rate,
  no anchor is asked for twice, and the optimizer made exactly
  inner x N updates (a resume that loses or repeats GRPO inner updates, or
  restarts their count, fails the count, the lr sequence or the params)."""
  from tests.test_train_sft import _assert_bit_identical
  cfg, full, _ = full_run(recipe)
  inner = RECIPES[recipe][1]
  part = str(tmp_path / "part")
  record = loop_lib.Loop.record

  def record_then_sigterm(self, step, *args, **kwargs):
    out = record(self, step, *args, **kwargs)
    if self.stage == recipe and step == K:
      preemption.request()  # as if SIGTERM came during step K
    return out

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop_lib.Loop, "record", record_then_sigterm)
    with pytest.raises(preemption.Preempted) as e:
      pu_rl.run(cfg, part)
  preemption.clear()
  assert (e.value.stage, e.value.step) == (recipe, K)
  ckpt_dir = os.path.join(part, "ckpt", recipe)
  assert checkpoint_lib.complete_steps(ckpt_dir) == [K]  # K was not due
  assert [r["step"] for r in _rows(part, recipe)] == list(range(1, K + 1))
  interrupted = train_fixtures.restore_rl_arrays(cfg, part, K)
  assert int(interrupted["step"]) == inner * K

  pu_rl.run(cfg, part)  # the same config: resumes from step K

  got, want = train_fixtures.restore_rl_arrays(cfg, part, N), train_fixtures.restore_rl_arrays(cfg, full, N)
  _assert_bit_identical(got, want)
  assert int(got["step"]) == inner * N
  # Adam's and the schedule's update counts: one per inner update.
  counts = [int(x) for x in jax.tree.leaves(got["opt_state"])
            if np.ndim(x) == 0 and np.issubdtype(np.asarray(x).dtype,
                                                 np.integer)]
  assert counts and set(counts) == {inner * N}, counts
  # Anchors are fetched per batch (sft.steps 0: no prefetch): the resumed
  # run asks for the same prompts as the uninterrupted one, each once.
  stats, full_stats = _ledger(part), _ledger(full)
  assert stats.requests == full_stats.requests > 0
  assert stats.anchors == full_stats.anchors
  assert stats.asked_after_stored == 0
  # metrics.jsonl: each step once, the same numbers as without the stop.
  rows, full_rows = _rows(part, recipe), _rows(full, recipe)
  assert [r["step"] for r in rows] == list(range(1, N + 1))
  for key in EXACT:
    assert [r[key] for r in rows] == [r[key] for r in full_rows], key
  # The logged lr is the last inner update's: schedule(inner x step - 1),
  # over a schedule of inner x N updates (grad_accum 1).
  assert cfg.opt.grad_accum == 1
  _, schedule = state_lib.optimizer_from_config(
      cfg.opt, learning_rate=cfg.opt.learning_rate,
      warmup_frac=cfg.opt.warmup_frac, total_steps=N, updates_per_step=inner)
  want_lr = [float(schedule(inner * s - 1)) for s in range(1, N + 1)]
  np.testing.assert_allclose([r["lr"] for r in rows], want_lr, rtol=1e-6)
  assert len(set(want_lr)) == N  # the check can tell the steps apart
