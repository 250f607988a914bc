"""The train steps on a tiny model: DPO member compaction and micro-batches
inside a step give the same update as one batch."""

import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from numpy.testing import assert_allclose, assert_array_equal

from purld_jax import losses
from purld_jax.train import dpo
from purld_jax.train import grpo
from purld_jax.train import ldl
from purld_jax.train import sft
from purld_jax.train import state as state_lib
from tests import core_fixtures


def _batch(b=3, m=5, p=6, t=20, seed=0):
  """B prompts (left-padded, various lengths), M members of various lengths
  (right-padded), and pairs: prompt 0 one pair (1 over 3), prompt 1 two
  pairs (4 over 0, 2 over 0), prompt 2 an absent pair (index 0 and 0)."""
  rng = np.random.default_rng(seed)
  pt = rng.integers(1, 128, (b, p)).astype(np.int32)
  pm = np.arange(p)[None, :] >= np.array([0, 2, 5])[:, None]
  members = rng.integers(1, 128, (b, m, t)).astype(np.int32)
  lens = np.array([[3, 7, 20, 5, 2], [9, 1, 4, 20, 6], [2, 3, 4, 5, 6]])
  mask = np.arange(t)[None, None, :] < lens[..., None]
  return dict(prompt_tokens=pt, prompt_mask=pm, members=members,
              member_mask=mask,
              chosen=np.array([[1, 0], [4, 2], [0, 0]], np.int32),
              rejected=np.array([[3, 0], [0, 0], [0, 0]], np.int32),
              pair_mask=np.array([[1, 0], [1, 1], [0, 0]], bool))


def test_compact_by_hand():
  full = _batch()
  c = dpo.compact(full, len_multiple=4)
  # used: prompt 0 {1, 3}, prompt 1 {0, 2, 4}, prompt 2 {} -> U = 4 (3
  # rounded up to a power of two); kept lengths 7, 5 / 9, 4, 6 -> T' = 12.
  assert c["members"].shape == (3, 4, 12)
  assert_array_equal(c["member_mask"].sum(-1), [[7, 5, 0, 0], [9, 4, 6, 0],
                                                [0, 0, 0, 0]])
  assert_array_equal(c["members"][0, 1], full["members"][0, 3, :12])
  assert_array_equal(c["members"][1, 2], full["members"][1, 4, :12])
  assert_array_equal(c["chosen"], [[0, 0], [2, 1], [0, 0]])
  assert_array_equal(c["rejected"], [[1, 0], [0, 0], [0, 0]])
  assert_array_equal(c["pair_mask"], full["pair_mask"])


def test_compact_best_vs_worst_keeps_two():
  full = _batch()
  full.update(chosen=np.array([[1], [4], [2]], np.int32),
              rejected=np.array([[3], [0], [0]], np.int32),
              pair_mask=np.ones((3, 1), bool))
  c = dpo.compact(full)  # lengths 7, 5 / 6, 9 / 4, 2 -> T' = 16
  assert c["members"].shape == (3, 2, 16)
  assert_array_equal(c["chosen"], [[0], [1], [1]])
  assert_array_equal(c["rejected"], [[1], [0], [0]])
  # No pair at all: still min_members slots (one shape, one compile).
  full["pair_mask"][:] = False
  assert dpo.compact(full, min_members=2)["members"].shape[1] == 2
  assert dpo.compact(full)["members"].shape[1] == 1
  assert dpo.compact(full, min_members=99)["members"].shape[1] == 5


def test_dpo_step_compacted_equals_full():
  """Loss, metrics and the updated params are those of scoring every
  member (reference != policy, so the pairs have nonzero margins)."""
  policy = core_fixtures.random_tiny_model(seed=7)
  ref = core_fixtures.random_tiny_model(seed=8)
  graphdef, params = nnx.split(policy)
  ref_params = nnx.split(ref)[1]
  tx, schedule = _SGD
  step = jax.jit(functools.partial(
      dpo.train_step, beta=0.5, loss_type="sigmoid", label_smoothing=0.0,
      reduce="pairs", schedule=schedule, vocab_chunk=8))
  full = _batch()
  outs = []
  for batch in (full, dpo.compact(full)):
    state = state_lib.TrainState.create(graphdef, params, tx,
                                        rng=jax.random.PRNGKey(0))
    outs.append(step(state, ref_params, batch))
  (s1, m1), (s2, m2) = outs
  assert float(m1["pairs"]) == 3.0 and np.isfinite(float(m1["loss"]))
  for key in ("loss", "margin", "accuracy", "reward_chosen", "grad_norm"):
    assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
  _assert_same_gradients(params, s1.params, s2.params)


# Plain SGD at lr 1: new params - old = -gradient, compared directly (Adam
# would blow summation-order noise on near-zero gradients up to ~lr: one
# weight of 2,048 differed by 3e-6 after an Adam step at lr 1e-2 on one
# 2-core EPYC and not on another).
_SGD = (optax.sgd(1.0), lambda count: 1.0)


def _assert_same_gradients(old_params, params1, params2):
  """The updates old - new of two SGD steps (module `_SGD`) agree."""
  for new2, new1, old in zip(jax.tree.leaves(params2),
                             jax.tree.leaves(params1),
                             jax.tree.leaves(old_params)):
    g1, g2 = np.asarray(old - new1), np.asarray(old - new2)
    # atol: the f32 rounding of old - new where weights are ~1 (norms).
    assert_allclose(g2, g1, rtol=1e-4, atol=4e-7)


# ----------------------------------------------------------------------------
# Micro-batches inside the step (state.grad_step): the same update


def test_split_micro_by_hand():
  batch = dict(a=np.arange(6), b=np.arange(12).reshape(6, 2))
  s = state_lib.split_micro(batch, 2)
  assert_array_equal(s["a"], [[0, 2, 4], [1, 3, 5]])  # strided slices
  assert_array_equal(s["b"][1], [[2, 3], [6, 7], [10, 11]])
  with np.testing.assert_raises_regex(ValueError, "does not divide"):
    state_lib.split_micro(batch, 4)
  assert_array_equal(state_lib.merge_micro(s["b"]), batch["b"])
  # map_micro: a row-wise function on slices == on the batch.
  out = state_lib.map_micro(lambda mb: mb["b"].sum(-1) * 10 + mb["a"], batch, 3)
  assert_array_equal(out, [1 * 10 + 0, 5 * 10 + 1, 9 * 10 + 2, 13 * 10 + 3,
                           17 * 10 + 4, 21 * 10 + 5])


def test_grpo_reference_logps_in_slices():
  model = core_fixtures.random_tiny_model(seed=7)
  batch = _grpo_batch()
  one = grpo.reference_logps(model, batch, vocab_chunk=8)
  four = grpo.reference_logps(model, batch, vocab_chunk=8, micro_batches=4)
  assert one.shape == (4, 3, 7)
  assert_allclose(four, one, rtol=1e-6, atol=1e-6)


def _grpo_batch(b=4, k=3, p=6, t=7, seed=1):
  rng = np.random.default_rng(seed)
  lens = rng.integers(0, t + 1, (b, k))
  lens[0] = 0  # a prompt with no completion token: weight 0 in its slice
  return dict(
      prompt_tokens=rng.integers(1, 128, (b, p)).astype(np.int32),
      prompt_mask=np.arange(p)[None, :] >= rng.integers(0, 3, (b, 1)),
      responses=rng.integers(1, 128, (b, k, t)).astype(np.int32),
      response_mask=np.arange(t)[None, None, :] < lens[..., None],
      old_logps=rng.normal(-5.0, 0.3, (b, k, t)).astype(np.float32),
      ref_logps=rng.normal(-5.0, 0.3, (b, k, t)).astype(np.float32),
      advantages=rng.normal(0.0, 1.0, (b, k)).astype(np.float32))


def _one_vs_micro(step, args, n, keys):
  """Runs `step` with micro_batches 1 and n from the same state; asserts
  equal metrics `keys` and params."""
  policy = core_fixtures.random_tiny_model(seed=7)
  graphdef, params = nnx.split(policy)
  tx, schedule = _SGD
  outs = []
  for micro in (1, n):
    state = state_lib.TrainState.create(graphdef, params, tx,
                                        rng=jax.random.PRNGKey(0))
    fn = jax.jit(functools.partial(step, schedule=schedule,
                                   micro_batches=micro, vocab_chunk=8))
    outs.append(fn(state, *args))
  (s1, m1), (s2, m2) = outs
  assert float(m1["grad_norm"]) > 0
  for key in keys + ("loss", "grad_norm"):
    assert_allclose(m2[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=key)
  _assert_same_gradients(params, s1.params, s2.params)


def test_loss_weights_by_hand():
  """The denominators the slices are weighted by (state.grad_step)."""
  mask = np.zeros((2, 2, 5), bool)
  mask[0, 0, :3] = mask[0, 1, :1] = mask[1, 1, :4] = True  # 8 tokens, 3 seqs
  assert float(losses.grpo_weight(mask, "token")) == 8.0
  assert float(losses.grpo_weight(mask, "sequence")) == 3.0
  assert float(losses.grpo_weight(mask, "dr_grpo")) == 3.0
  pairs = np.array([[1, 1, 0], [0, 0, 0], [0, 1, 0]], bool)
  assert float(losses.dpo_weight(pairs, "pairs")) == 3.0
  assert float(losses.dpo_weight(pairs, "prompts")) == 2.0


@pytest.mark.parametrize("reduce", [
    "pairs", pytest.param("prompts", marks=pytest.mark.slow)])
def test_dpo_micro_batches_equal_one_batch(reduce):
  ref_params = nnx.split(core_fixtures.random_tiny_model(seed=8))[1]
  batch = {k: np.concatenate([v, v[:1]])  # B = 4: prompt 0 again
           for k, v in _batch(seed=3).items()}
  batch["pair_mask"][3] = [1, 1]
  metrics = ("margin", "accuracy", "pairs") if reduce == "pairs" else (
      "pairs",)  # the margin averages per pair, the loss per prompt
  step = functools.partial(dpo.train_step, beta=0.5, loss_type="sigmoid",
                           label_smoothing=0.0, reduce=reduce)
  _one_vs_micro(step, (ref_params, batch), 2, metrics)


@pytest.mark.parametrize("aggregation", [
    "token", "sequence", pytest.param("dr_grpo", marks=pytest.mark.slow)])
def test_grpo_micro_batches_equal_one_batch(aggregation):
  step = functools.partial(grpo.train_step, eps_low=0.2, eps_high=0.28,
                           beta_kl=0.1, aggregation=aggregation)
  per_token = ("kl", "entropy") if aggregation == "token" else ()
  _one_vs_micro(step, (_grpo_batch(),), 4 if aggregation == "token" else 2,
                ("tokens", "ratio_min", "ratio_max") + per_token)


def test_ldl_and_sft_micro_batches_equal_one_batch():
  ref_params = nnx.split(core_fixtures.random_tiny_model(seed=8))[1]
  g = _grpo_batch(b=4, k=3)
  d = np.random.default_rng(0).dirichlet(np.ones(3), 4).astype(np.float32)
  member_mask = np.ones((4, 3), bool)
  member_mask[2] = False  # a prompt without members: weight 0
  batch = dict(prompt_tokens=g["prompt_tokens"], prompt_mask=g["prompt_mask"],
               members=g["responses"], token_mask=g["response_mask"],
               label_dist=d, member_mask=member_mask)
  _one_vs_micro(functools.partial(ldl.train_step, beta=1.0),
                (ref_params, batch), 2, ("kl",))
  rng = np.random.default_rng(2)
  mask = np.arange(12)[None, :] >= np.array([0, 3, 5, 1])[:, None]
  loss_mask = mask & (np.arange(12)[None, :] >= np.array([6, 8, 9, 12])[:, None])
  sft_batch = dict(tokens=rng.integers(1, 128, (4, 12)).astype(np.int32),
                   mask=mask, loss_mask=loss_mask)
  _one_vs_micro(sft.train_step, (sft_batch,), 4, ("tokens",))


def test_memory_now_counts_the_live_arrays_by_hand():
  """A new f32[256, 1024] array (1 MiB) adds 1 MiB to the live arrays;
  the peak RSS holds at least it."""
  from purld_jax.train import loop as loop_lib
  before = loop_lib.memory_now()
  x = jax.numpy.ones((256, 1024), "float32").block_until_ready()
  after = loop_lib.memory_now()
  assert after["live_arrays_mb"] - before["live_arrays_mb"] == 1.0
  assert after["peak_rss_mb"] >= after["live_arrays_mb"] > 0
  # a second Array on the same buffer (device_put onto its own sharding)
  # is not a second MiB
  y = jax.device_put(x, x.sharding)
  assert y is not x
  assert loop_lib.memory_now()["live_arrays_mb"] == after["live_arrays_mb"]
  del x, y
