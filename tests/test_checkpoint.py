"""Orbax checkpoints of train state + data iterator + config."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from purld_jax import checkpoint
from purld_jax import metrics as metrics_lib


def _arrays(scale=1.0):
  params = {"layers": {0: {"w": jnp.full((2, 3), scale)}},
            "norm": jnp.arange(3.0) * scale}
  tx = optax.MultiSteps(optax.adamw(1e-3), every_k_schedule=2)
  return dict(params=params, opt_state=tx.init(params),
              step=jnp.int32(int(scale)), rng=jax.random.PRNGKey(7))


def _iterator():
  ds = grain.MapDataset.source(list(range(10))).shuffle(seed=0).repeat(None)
  return iter(ds.to_iter_dataset())


def _equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(x.dtype == y.dtype and np.array_equal(x, y)
                  for x, y in zip(la, lb)))


def test_round_trip_state_iterator_config(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=2)
  it = _iterator()
  [next(it) for _ in range(3)]
  arrays = _arrays(3.0)
  assert ckpt.save(3, arrays, data_iter=it, config={"a": {"b": [1, 2]}})
  expected_next = [next(it) for _ in range(4)]
  ckpt.close()

  again = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=2)
  fresh = _iterator()
  abstract = checkpoint.abstract_like(_arrays(0.0))
  restored = again.restore(3, abstract, data_iter=fresh)
  assert _equal(restored.arrays, arrays)
  assert restored.config == {"a": {"b": [1, 2]}}
  assert [next(fresh) for _ in range(4)] == expected_next
  leaf = jax.tree.leaves(restored.arrays)[0]
  assert leaf.sharding == abstract["params"]["layers"][0]["w"].sharding
  again.close()


def test_keep_n_and_cadence(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=2, keep=2,
                                 async_save=False)
  for step in range(1, 8):
    ckpt.save(step, _arrays(float(step)))
  ckpt.save(7, _arrays(7.0), force=True)  # the end of a stage
  ckpt.wait()
  assert ckpt.all_steps() == [6, 7]  # 2, 4 deleted; 1, 3, 5 never due
  assert not ckpt.save(7, _arrays(7.0), force=True)  # already there
  assert ckpt.keep_only(7) == [6]  # a finished stage keeps its last step
  assert ckpt.all_steps() == [7]
  assert sorted(os.listdir(tmp_path)) == ["7"]
  ckpt.close()


def test_restore_or_init(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1)
  calls = []
  abstract = checkpoint.abstract_like(_arrays(0.0))
  arrays, step = checkpoint.restore_or_init(
      ckpt, abstract, lambda: calls.append(1) or _arrays(1.0))
  assert (step, calls) == (0, [1]) and _equal(arrays, _arrays(1.0))
  ckpt.save(5, _arrays(5.0))
  ckpt.wait()
  arrays, step = checkpoint.restore_or_init(
      ckpt, abstract, lambda: pytest.fail("init after a checkpoint"))
  assert step == 5 and _equal(arrays, _arrays(5.0))
  ckpt.close()


def test_a_torn_save_is_not_a_checkpoint(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3)
  ckpt.save(2, _arrays(2.0))
  ckpt.close()
  # What a kill -9 during a save leaves: orbax's temporary directory.
  torn = tmp_path / "4.orbax-checkpoint-tmp-1234"
  (torn / "state").mkdir(parents=True)
  again = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3)
  assert again.latest_step() == 2
  again.close()


def test_config_diff_by_hand():
  saved = {"sft": {"steps": 4, "lr": 1e-3}, "data": {"buckets": [64]}}
  now = {"sft": {"steps": 8, "lr": 1e-3}, "data": {"buckets": (64,)},
         "new": 1}
  assert checkpoint.config_diff(saved, now) == [
      "new: '<absent>' -> 1", "sft.steps: 4 -> 8"]


def test_metrics_truncate_on_resume(tmp_path):
  w = metrics_lib.Writer(tmp_path, stage="sft", tensorboard=False)
  for step in (1, 2, 3, 4):
    w.write(step, {"loss": float(step)})
  w.close()
  w = metrics_lib.Writer(tmp_path, stage="rl", tensorboard=False)
  w.write(1, {"loss": float("nan")})
  w.close()
  # Resume of stage sft from step 2: its steps 3, 4 go, rl's records stay.
  w = metrics_lib.Writer(tmp_path, stage="sft", resume_step=2,
                         tensorboard=False)
  w.write(3, {"loss": 30.0})
  w.close()
  records = metrics_lib.read(tmp_path)
  assert [(r["stage"], r["step"], r["loss"]) for r in records] == [
      ("sft", 1, 1.0), ("sft", 2, 2.0), ("rl", 1, "nan"), ("sft", 3, 30.0)]
  assert os.path.exists(tmp_path / metrics_lib.FILENAME)


def test_every_minutes_by_a_fake_clock(tmp_path):
  now = [0.0]
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=100, keep=5,
                                 async_save=False, every_minutes=1.0,
                                 clock=lambda: now[0])
  assert not ckpt.due(1)
  now[0] = 59.9
  assert not ckpt.due(2)
  now[0] = 60.0  # a minute since the start
  assert ckpt.due(3)
  assert ckpt.save(3, _arrays(3.0), force=True)
  now[0] = 119.0  # 59 s since that save
  assert not ckpt.due(4)
  assert ckpt.due(100)  # the step cadence still holds
  now[0] = 120.0
  assert ckpt.due(5)
  assert not ckpt.save(3, _arrays(3.0), force=True)  # saved already
  ckpt.close()
  assert checkpoint.complete_steps(tmp_path) == [3]

  off = checkpoint.Checkpointer(tmp_path / "off", every_steps=100, keep=5,
                                clock=lambda: 1e9)
  assert not off.due(1)  # every_minutes=0: steps only
  off.close()
  with pytest.raises(ValueError, match="every_minutes -1"):
    checkpoint.Checkpointer(tmp_path / "bad", every_steps=1, keep=1,
                            every_minutes=-1)
