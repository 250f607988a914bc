"""The training loop on a mesh: a run on (2, 2, 2) equals one device.

conftest.py gives 8 fake CPU devices. The trainers build the mesh from
`config.mesh`, put the state on its shardings (restored straight into them)
and jit the steps with `sharded.py`; here the same tiny run on mesh
(1, 1, 1) and on (2, 2, 2) writes the same losses to metrics.jsonl (<= 1e-5)
and the same final params, also when the (2, 2, 2) run is interrupted and
resumed from its checkpoint. Batches are 4 prompts: a multiple of data x
fsdp = 4. Process-0-only duties (metrics, teacher) are checked with a faked
process index.
"""

import os
import shutil

import jax
import numpy as np
import pytest
from numpy.testing import assert_allclose

from purld_jax import metrics as metrics_lib
from purld_jax import sharding
from purld_jax import shared_anchors
from purld_jax.models import hf
from purld_jax.train import loop as loop_lib
from purld_jax.train import pu_rl
from purld_jax.train import sft
from purld_jax.train import student as student_lib
from tests import train_fixtures
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs 8 (fake) devices")
ATOL = 1e-5
N = 2  # checkpoint every N steps; runs of 2N


def _config(mesh, **kw):
  data, fsdp, tensor = mesh
  return train_fixtures.tiny_config(**{
      "sft.steps": 2 * N, "ckpt.every_steps": N, "sft.batch_size": 4,
      "rl.batch_size": 4, "log.tensorboard": False, "ckpt.async_save": False,
      "ckpt.keep_finished": "all",
      "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, **kw})


def _losses(workdir, stage):
  return [r["loss"] for r in metrics_lib.read(workdir) if r["stage"] == stage]


def _params(model_dir, workdir):
  s = student_lib.from_config(_config((1, 1, 1)).model, str(workdir))
  return hf.load_params(model_dir, s.cfg)


def _assert_same_run(got_dir, want_dir, stage, model_dir):
  got, want = _losses(got_dir, stage), _losses(want_dir, stage)
  assert len(got) == len(want) > 0
  assert_allclose(got, want, atol=ATOL, rtol=0)
  jax.tree.map(lambda g, w: assert_allclose(np.asarray(g), np.asarray(w),
                                            atol=ATOL, rtol=0),
               _params(os.path.join(got_dir, model_dir), got_dir),
               _params(os.path.join(want_dir, model_dir), want_dir))


def test_sft_on_a_2x2x2_mesh_equals_one_device_and_resumes(
    tmp_path, jit_cache):  # noqa: F811
  one, mesh = str(tmp_path / "one"), str(tmp_path / "mesh")
  sft.run(_config((1, 1, 1)), one)
  sft.run(_config((2, 2, 2)), mesh)
  _assert_same_run(mesh, one, "sft", sft.REFERENCE)
  # Interrupted after step N: the last checkpoint and the reference gone.
  shutil.rmtree(os.path.join(mesh, "ckpt", "sft", str(2 * N)))
  shutil.rmtree(os.path.join(mesh, sft.REFERENCE))
  sft.run(_config((2, 2, 2)), mesh)  # restored into the mesh's shardings
  assert [r["step"] for r in metrics_lib.read(mesh)] == list(
      range(1, 2 * N + 1))
  _assert_same_run(mesh, one, "sft", sft.REFERENCE)


@pytest.mark.slow
def test_dpo_on_a_2x2x2_mesh_equals_one_device(tmp_path, jit_cache):  # noqa: F811
  kw = {"recipe": "dpo", "sft.steps": 1, "rl.steps": 2,
        "ranking.scheme": "anchor_recon"}
  one, mesh = str(tmp_path / "one"), str(tmp_path / "mesh")
  pu_rl.run(_config((1, 1, 1), **kw), one)
  pu_rl.run(_config((2, 2, 2), **kw), mesh)
  _assert_same_run(mesh, one, "dpo", pu_rl.FINAL)


def test_stage_state_is_on_the_mesh_shardings(tmp_path):
  """Initialised on the rules' shardings; only process 0 writes metrics."""
  c = _config((2, 2, 2))
  s = student_lib.from_config(c.model, str(tmp_path))
  graphdef, shapes = s.abstract()
  mesh, param_sh = loop_lib.mesh_setup(c, s.cfg, batch_sizes={})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with loop_lib.Stage(c, str(tmp_path), "sft", total_steps=2,
                      learning_rate=1e-3, warmup_frac=0.0, graphdef=graphdef,
                      param_shapes=shapes, param_sh=param_sh,
                      init_params=s.init_params, data_iter=None) as st:
    got = jax.tree.map(lambda x: x.sharding, st.state.params)
    jax.tree.map(lambda g, w: g.is_equivalent_to(w, len(w.spec) or 1),
                 got, param_sh)
    embed = st.state.params["embed"]
    assert embed.sharding.spec == param_sh["embed"].spec
    assert embed.sharding.spec == sharding.spec(
        ("vocab", "embed"), sharding.DEFAULT_RULES, mesh, embed.shape)
    assert st.writer is not None


def test_only_process_0_writes_metrics(tmp_path, monkeypatch):
  """No writer, no progress bar on process 1 (faked: no checkpoint is saved
  here, orbax would wait for a real process 0)."""
  c = _config((1, 1, 1))
  s = student_lib.from_config(c.model, str(tmp_path))
  graphdef, shapes = s.abstract()
  mesh, param_sh = loop_lib.mesh_setup(c, s.cfg, batch_sizes={})
  del mesh
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with loop_lib.Stage(c, str(tmp_path), "sft", total_steps=1,
                      learning_rate=1e-3, warmup_frac=0.0, graphdef=graphdef,
                      param_shapes=shapes, param_sh=param_sh,
                      init_params=s.init_params, data_iter=None,
                      teacher_label="t") as st:
    assert st.writer is None and st.loop._bar.disable
    st.loop.record(1, {"loss": np.float32(1.0)})
    assert st.loop.record(2, {"loss": np.float32(2.0)})["loss"] == 1.0
  assert not os.path.exists(tmp_path / metrics_lib.FILENAME)


class _Teacher:
  label = "never"

  def request(self, prompt):
    raise AssertionError("process 1 must not reach the teacher")


def test_anchors_reach_other_processes_by_broadcast(tmp_path, monkeypatch):
  """Process 1 (faked) opens no ledger, asks no teacher, and decodes what
  process 0 broadcast: lengths, then the UTF-8 bytes."""
  from jax.experimental import multihost_utils
  texts = ["4", "", "naïve 12", "x" * 40]
  blob = b"".join(t.encode() for t in texts)
  sent = [np.asarray([len(t.encode()) for t in texts], np.int32),
          np.frombuffer(blob, np.uint8)]
  calls = []

  def broadcast(x):  # what process 0 sends, in order
    calls.append(np.shape(x))
    return sent[len(calls) - 1]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
  shared = shared_anchors.SharedAnchors(tmp_path, _Teacher())
  assert shared.store is None and shared.teacher_calls() == 0.0
  assert shared.texts([object()] * 4) == texts
  assert calls == [(4,), (len(blob),)]  # process 1 sent zeros of those shapes
  assert not os.path.exists(tmp_path / "anchors.sqlite")
  shared.close()


def test_broadcast_on_one_process_is_the_identity():
  assert shared_anchors.broadcast_texts(["a", "b"], 2) == ["a", "b"]
