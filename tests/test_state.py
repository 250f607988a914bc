"""TrainState, the optimizer and the NaN policy, with expectations by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from purld_jax.train import state as state_lib


@pytest.mark.parametrize("t, expected", [
    # peak 1, warmup 4, total 12, end 0.1.
    (0, 0.25),           # warmup: (t + 1) / 4, the first update not at 0
    (1, 0.5),
    (3, 1.0),            # the last warmup update is at the peak
    (4, 1.0),            # the cosine starts at the peak
    # cosine over 8 updates: 0.1 + 0.9 (1 + cos(pi (t - 4) / 8)) / 2
    (6, 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2),    # 0.9182
    (8, 0.55),           # halfway: cos(pi / 2) = 0
    (12, 0.1),           # the end value
    (20, 0.1),           # constant after
])
def test_schedule_warmup_then_cosine(t, expected):
  schedule = state_lib.make_schedule(learning_rate=1.0, warmup_steps=4,
                                     total_steps=12, end_lr_ratio=0.1)
  assert_allclose(float(schedule(t)), expected, rtol=1e-6, atol=1e-7)


def test_schedule_without_warmup_starts_at_the_peak():
  schedule = state_lib.make_schedule(learning_rate=2.0, warmup_steps=0,
                                     total_steps=4, end_lr_ratio=0.0)
  # 2 (1 + cos(pi t / 4)) / 2 at t = 0, 2, 4: 2, 1, 0.
  assert_allclose([float(schedule(t)) for t in (0, 2, 4)], [2.0, 1.0, 0.0],
                  atol=1e-6)


def test_decay_mask_skips_norms_and_biases():
  params = {"w": jnp.ones((2, 3)), "norm": {"scale": jnp.ones(3)},
            "b": jnp.ones(3), "emb": jnp.ones((4, 2))}
  assert state_lib.decay_mask(params) == {
      "w": True, "norm": {"scale": False}, "b": False, "emb": True}


def _state(params, **opt):
  kw = dict(learning_rate=0.1, warmup_steps=0, total_steps=10,
            end_lr_ratio=1.0, clip_norm=0.0)
  kw.update(opt)
  tx, _ = state_lib.make_optimizer(**kw)
  return state_lib.TrainState.create(None, params, tx,
                                     rng=jax.random.PRNGKey(0))


def test_first_adamw_step_by_hand():
  # First Adam step: m_hat = g, v_hat = g^2, so the update is
  # -lr (g / (|g| + eps) + wd p) = -lr (sign(g) + wd p), decay on w only.
  params = {"w": jnp.array([[1.0, -2.0]]), "b": jnp.array([3.0])}
  grads = {"w": jnp.array([[0.5, -4.0]]), "b": jnp.array([-1.0])}
  state = _state(params, weight_decay=0.5)
  new, metrics = state.apply_grads(grads, loss=jnp.float32(1.0))
  # w: [1 - 0.1 (1 + 0.5), -2 - 0.1 (-1 - 1)] = [0.85, -1.8]; b: 3 + 0.1.
  assert_allclose(new.params["w"], [[0.85, -1.8]], rtol=1e-6)
  assert_allclose(new.params["b"], [3.1], rtol=1e-6)
  assert int(new.step) == 1
  # |g| = sqrt(0.25 + 16 + 1) = sqrt(17.25)
  assert_allclose(float(metrics["grad_norm"]), math.sqrt(17.25), rtol=1e-6)
  assert float(metrics["skipped"]) == 0.0


def test_clipping_scales_to_the_norm():
  # SGD-free check: with clip 1 and |g| = 5 the first Adam step is still
  # sign(g) (Adam is scale-invariant) but the reported norm is pre-clip.
  params = {"w": jnp.array([[0.0, 0.0]])}
  grads = {"w": jnp.array([[3.0, -4.0]])}
  new, metrics = _state(params, clip_norm=1.0).apply_grads(grads)
  assert_allclose(new.params["w"], [[-0.1, 0.1]], rtol=1e-6)
  assert_allclose(float(metrics["grad_norm"]), 5.0, rtol=1e-6)


@pytest.mark.parametrize("bad", ["grads", "loss"])
def test_nonfinite_update_is_skipped(bad):
  params = {"w": jnp.array([[1.0, 2.0]])}
  grads = {"w": jnp.array([[jnp.nan if bad == "grads" else 1.0, 1.0]])}
  loss = jnp.float32(jnp.nan if bad == "loss" else 1.0)
  state = _state(params)
  new, metrics = state.apply_grads(grads, loss=loss)
  assert int(new.step) == 1  # the batch is consumed
  np.testing.assert_array_equal(new.params["w"], params["w"])
  for a, b in zip(jax.tree.leaves(new.opt_state),
                  jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(a, b)
  assert float(metrics["skipped"]) == 1.0
  assert float(metrics[f"nonfinite_{bad}"]) == 1.0


def test_grad_accumulation_equals_the_mean_gradient():
  # Two micro-batches with grad_accum 2 == one step on (g1 + g2) / 2.
  params = {"w": jnp.array([[1.0, -1.0]])}
  g1, g2 = {"w": jnp.array([[1.0, 4.0]])}, {"w": jnp.array([[3.0, -2.0]])}
  acc = _state(params, grad_accum=2, weight_decay=0.1, clip_norm=1.0)
  acc, _ = acc.apply_grads(g1)
  np.testing.assert_array_equal(acc.params["w"], params["w"])  # no update yet
  acc, _ = acc.apply_grads(g2)
  one = _state(params, weight_decay=0.1, clip_norm=1.0)
  one, _ = one.apply_grads({"w": jnp.array([[2.0, 1.0]])})
  assert_allclose(acc.params["w"], one.params["w"], rtol=1e-6)
  assert int(acc.step) == 2


def test_check_finite_stop_names_step_and_quantity():
  metrics = dict(loss=float("nan"), grad_norm=float("nan"), skipped=1.0,
                 nonfinite_loss=1.0, nonfinite_grads=1.0)
  state_lib.check_finite(metrics, step=7, policy="skip")  # goes on
  with pytest.raises(state_lib.NonFiniteError, match=r"step 7: non-finite loss"):
    state_lib.check_finite(metrics, step=7, policy="stop")
  grads_only = dict(metrics, loss=1.0, nonfinite_loss=0.0)
  with pytest.raises(state_lib.NonFiniteError, match="gradient norm"):
    state_lib.check_finite(grads_only, step=3, policy="stop")
  state_lib.check_finite(dict(metrics, skipped=0.0), step=1, policy="stop")


def test_inject_nan_only_at_its_step():
  loss = jnp.float32(2.0)
  assert float(state_lib.inject_nan(loss, jnp.int32(1), jnp.int32(2))) != 2.0
  assert float(state_lib.inject_nan(loss, jnp.int32(0), jnp.int32(2))) == 2.0
  assert float(state_lib.inject_nan(loss, jnp.int32(5), jnp.int32(-1))) == 2.0


def test_step_key_is_fold_in_of_step():
  state = _state({"w": jnp.ones((1, 1))}).replace(step=jnp.int32(3))
  np.testing.assert_array_equal(
      state.step_key(), jax.random.fold_in(jax.random.PRNGKey(0), 3))
