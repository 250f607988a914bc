"""Hand-computed and property tests of purld_jax/preferences.py."""

import functools
import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from purld_jax import preferences as prefs

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)
B, K = 2, 5
F, T = False, True

# Integer-valued scores: strictly monotone transforms keep them distinct in
# float32, so order properties hold exactly.
int_scores = hnp.arrays(np.float32, (B, K), elements=st.integers(-6, 6))
distinct_scores = hnp.arrays(np.float32, (B, K), unique=True,
                             elements=st.integers(-20, 20))


# ----------------------------------------------------------------------------
# Ranks and PU calibration


@pytest.mark.parametrize("mask, expected", [
    # 3 > 2 > 1; the second 3 (index 2) ranks after index 0 (lowest wins)
    (None, [0, 3, 1, 2]),
    # index 0 masked: rank K = 4; then 3 (idx 2), 2 (idx 3), 1 (idx 1)
    ([False, True, True, True], [4, 2, 0, 1]),
])
def test_ranks_hand(mask, expected):
  s = jnp.array([[3.0, 1.0, 3.0, 2.0]])
  m = None if mask is None else jnp.array([mask])
  assert_array_equal(jax.jit(prefs.ranks)(s, candidate_mask=m), [expected])


@pytest.mark.parametrize("rule, prior, positive", [
    ("prior", 0.5, [F, T, F, T]),  # ceil(0.5 * 4) = 2: 4, 3
    ("prior", 0.3, [F, T, F, T]),  # ceil(1.2) = 2
    ("prior", 0.25, [F, T, F, F]),  # ceil(1.0) = 1: only the 4
    ("prior", None, [F, F, F, F]),  # no prior: no positives
    ("anchor", None, [F, T, F, T]),  # s >= s_a = 2.5: 4 and 3
])
def test_calibrate_hand(rule, prior, positive):
  s = jnp.array([[1.0, 4.0, 2.0, 3.0]])
  s_a = jnp.array([2.5])
  fn = jax.jit(functools.partial(prefs.calibrate, rule=rule, prior=prior))
  cal, pos = fn(s, s_a)
  assert_allclose(cal, [[-1.5, 1.5, -0.5, 0.5]])  # s - 2.5
  assert_array_equal(pos, [positive])


def test_calibrate_uncentred_masked_and_float_safe_prior():
  s = jnp.arange(10, dtype=jnp.float32)[None]
  mask = jnp.arange(10)[None] != 9
  cal, pos = prefs.calibrate(s, jnp.array([0.0]), center=False, prior=0.3,
                             candidate_mask=jnp.ones((1, 10), bool))
  # 0.3 * 10 = 3.0000000000000004 in floats; still 3 positives: 9, 8, 7
  assert_array_equal(np.nonzero(np.asarray(pos[0]))[0], [7, 8, 9])
  assert_allclose(cal, s)
  cal, pos = prefs.calibrate(s, jnp.array([0.0]), prior=0.3,
                             candidate_mask=mask)
  # 9 valid: ceil(2.7) = 3 -> 8, 7, 6; the masked 9 scores 0 and is no positive
  assert_array_equal(np.nonzero(np.asarray(pos[0]))[0], [6, 7, 8])
  assert cal[0, 9] == 0.0


# ----------------------------------------------------------------------------
# Pairs


@pytest.mark.parametrize("scores, mask, min_gap, chosen, rejected, ok", [
    ([1.0, 4.0, 2.0, 3.0], None, 0.0, 1, 0, True),
    ([2.0, 2.0, 1.0, 1.0], None, 0.0, 0, 2, True),  # ties: lowest index
    ([1.0, 1.0, 1.0, 1.0], None, 0.0, 0, 0, False),  # no preference
    ([1.0, 4.0, 2.0, 3.0], None, 3.0, 1, 0, False),  # gap 3 is not > 3
    ([1.0, 4.0, 2.0, 3.0], [False, False, True, True], 0.0, 3, 2, True),
])
def test_best_vs_worst_hand(scores, mask, min_gap, chosen, rejected, ok):
  m = None if mask is None else jnp.array([mask])
  fn = jax.jit(functools.partial(prefs.best_vs_worst, min_gap=min_gap))
  p = fn(jnp.array([scores]), candidate_mask=m)
  assert_array_equal(p.chosen, [[chosen]])
  assert_array_equal(p.rejected, [[rejected]])
  assert_array_equal(p.mask, [[ok]])


@pytest.mark.parametrize("margin, ok", [
    # slots (0,1), (0,2), (1,2); gaps s_i - s_j = -2, -1, 1
    (0.0, [True, True, True]),
    (1.5, [True, False, False]),
    (2.0, [False, False, False]),  # |gap| must exceed the margin
])
def test_margin_pairs_hand(margin, ok):
  p = jax.jit(functools.partial(prefs.margin_pairs, margin=margin))(
      jnp.array([[1.0, 3.0, 2.0]]))
  assert_array_equal(p.chosen, [[1, 2, 1]])  # the higher score of each pair
  assert_array_equal(p.rejected, [[0, 0, 2]])
  assert_array_equal(p.mask, [ok])


def test_margin_pairs_masked_candidate_and_ties():
  s = jnp.array([[1.0, 3.0, 3.0]])
  p = prefs.margin_pairs(s, candidate_mask=jnp.array([[True, False, True]]))
  # (0,1) has a masked member; (1,2) is a tie; only (0,2): 2 over 0
  assert_array_equal(p.mask, [[False, True, False]])
  assert (int(p.chosen[0, 1]), int(p.rejected[0, 1])) == (2, 0)


def test_pu_pairs_hand():
  pos = jnp.array([[False, True, False, True]])
  p = jax.jit(prefs.pu_pairs)(pos)
  # slots (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): one positive in 1, 3, 4, 6
  assert_array_equal(p.mask, [[True, False, True, True, False, True]])
  got = {(int(c), int(r)) for c, r, ok in
         zip(p.chosen[0], p.rejected[0], p.mask[0]) if ok}
  assert got == {(1, 0), (3, 0), (1, 2), (3, 2)}


def test_anchor_as_chosen_and_gather():
  s = jnp.array([[1.0, 4.0, 2.0, 3.0], [5.0, 5.0, 6.0, 7.0]])
  p = jax.jit(prefs.anchor_as_chosen)(s)
  assert_array_equal(p.chosen, [[4], [4]])  # K = 4 names the anchor
  assert_array_equal(p.rejected, [[0], [0]])  # row 2: tie 5, 5 -> index 0
  assert_array_equal(p.mask, [[True], [True]])
  values = jnp.array([[10.0, 11, 12, 13, 14], [20.0, 21, 22, 23, 24]])
  c, r = prefs.gather_pairs(values, p)
  assert_allclose(c, [[14.0], [24.0]])
  assert_allclose(r, [[10.0], [20.0]])


# ----------------------------------------------------------------------------
# Label distribution and advantages


@pytest.mark.parametrize("tau, expected", [
    (1.0, [0.25, 0.75]),  # softmax(0, log 3) = (1, 3) / 4
    (0.5, [0.1, 0.9]),  # softmax(0, 2 log 3) = (1, 9) / 10
    (1e9, [0.5, 0.5]),  # tau -> inf: uniform
])
def test_label_distribution_hand(tau, expected):
  d = jax.jit(functools.partial(prefs.label_distribution, tau=tau))(
      jnp.array([[0.0, math.log(3.0)]]))
  assert_allclose(d, [expected], rtol=1e-6)


def test_label_distribution_with_anchor_and_mask():
  s = jnp.array([[0.0, math.log(2.0), 9.0]])
  mask = jnp.array([[True, True, False]])
  d = prefs.label_distribution(s, tau=1.0, anchor_score=jnp.array(
      [math.log(2.0)]), include_anchor=True, candidate_mask=mask)
  # members e^0, e^log2, (masked), anchor e^log2: (1, 2, 0, 2) / 5
  assert_allclose(d, [[0.2, 0.4, 0.0, 0.4]], rtol=1e-6)
  d = prefs.label_distribution(s, tau=1.0, candidate_mask=jnp.zeros(
      (1, 3), bool))
  assert_allclose(d, [[0.0, 0.0, 0.0]])  # no member: no mass, no NaN


@pytest.mark.parametrize("normalize, expected", [
    # mean 0.25; centred (-0.15, -0.05, 0.05, 0.15);
    # std = sqrt((0.0225 + 0.0025) * 2 / 4) = sqrt(0.0125) = 0.111803
    ("std", np.array([-0.15, -0.05, 0.05, 0.15]) / math.sqrt(0.0125)),
    ("center", [-0.15, -0.05, 0.05, 0.15]),
])
def test_group_advantages_hand(normalize, expected):
  d = jnp.array([[0.1, 0.2, 0.3, 0.4]])
  a = jax.jit(functools.partial(prefs.group_advantages, normalize=normalize,
                                eps=0.0))(d)
  assert_allclose(a, [expected], rtol=1e-5, atol=1e-6)


def test_group_advantages_mask():
  v = jnp.array([[1.0, 3.0, 100.0]])
  a = prefs.group_advantages(v, eps=0.0, candidate_mask=jnp.array(
      [[True, True, False]]))
  assert_allclose(a, [[-1.0, 1.0, 0.0]], rtol=1e-6)  # mean 2, std 1


# ----------------------------------------------------------------------------
# Properties


@jax.jit
def _induced(s):
  """Everything order-based that the scores induce."""
  bw = prefs.best_vs_worst(s)
  mp = prefs.margin_pairs(s, margin=0.0)
  d = prefs.label_distribution(s, tau=0.5)
  _, pos = prefs.calibrate(s, jnp.zeros(s.shape[:1]), prior=0.4)
  return (bw, mp, jnp.argmax(d, axis=-1), prefs.ranks(s), pos)


@SETTINGS
@hypothesis.given(int_scores, st.sampled_from([
    lambda s: 3.0 * s - 2.0,
    lambda s: jnp.exp(s / 4.0),
    lambda s: s ** 3 + s,
]))
def test_order_consistency_under_monotone_transform(s, f):
  s = jnp.asarray(s)
  a = _induced(s)
  b = _induced(f(s))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert_array_equal(x, y)


@jax.jit
def _d_over_taus(s, taus):
  return jax.vmap(lambda t: prefs.label_distribution(s, tau=t))(taus)


@SETTINGS
@hypothesis.given(distinct_scores)
def test_concentration_as_tau_falls(s):
  taus = jnp.array([4.0, 1.0, 0.3, 0.05, 1e-3])
  d = _d_over_taus(s, taus)
  best = np.argmax(s, axis=-1)
  # one-hot on the best at tau = 1e-3 (gaps are >= 1: e^-1000 = 0)
  assert_allclose(d[-1], np.eye(K)[best], atol=1e-6)
  for delta in (0.5, 2.0, 5.0):
    near = s >= s.max(axis=-1, keepdims=True) - delta
    mass = np.sum(np.where(near[None], d, 0.0), axis=-1)  # [taus, B]
    assert np.all(np.diff(mass, axis=0) >= -1e-6)


@jax.jit
def _d_and_adv(s):
  d = prefs.label_distribution(s, tau=0.5)
  return d, prefs.group_advantages(d)


@SETTINGS
@hypothesis.given(distinct_scores, st.permutations(range(K)))
def test_permutation_equivariance_over_k(s, perm):
  perm = np.asarray(perm)
  s = jnp.asarray(s)
  a, b = _induced(s), _induced(s[:, perm])
  (_, mp_a, _, r_a, pos_a), (_, mp_b, _, r_b, pos_b) = a, b
  assert_array_equal(r_b, r_a[:, perm])
  assert_array_equal(pos_b, pos_a[:, perm])
  d_a, adv_a = _d_and_adv(s)
  d_b, adv_b = _d_and_adv(s[:, perm])
  assert_allclose(d_b, d_a[:, perm], rtol=1e-6)
  assert_allclose(adv_b, adv_a[:, perm], rtol=1e-5, atol=1e-5)
  # the same preference relation, renamed: P[c, r] = 1 per present pair
  def relation(p):
    rel = np.zeros((B, K, K), bool)
    for b in range(B):
      for c, r, ok in zip(p.chosen[b], p.rejected[b], p.mask[b]):
        rel[b, c, r] |= bool(ok)
    return rel
  assert_array_equal(relation(mp_b), relation(mp_a)[:, perm][:, :, perm])
