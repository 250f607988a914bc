"""The PU-RL train steps on a tiny model: DPO member compaction is exact."""

import functools

import jax
import numpy as np
from flax import nnx
from numpy.testing import assert_allclose, assert_array_equal

from purld_jax.train import dpo
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
  tx, schedule = state_lib.make_optimizer(learning_rate=1e-2, warmup_steps=0,
                                          total_steps=10)
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
  for a, b in zip(jax.tree.leaves(s2.params), jax.tree.leaves(s1.params)):
    assert_allclose(a, b, rtol=1e-5, atol=1e-6)
