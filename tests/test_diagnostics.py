"""Self-ranking vs oracle agreement, by hand."""

import numpy as np
import pytest

from purld_jax import diagnostics


def test_ranking_vs_oracle_by_hand():
  scores = np.array([[3.0, 1.0, 2.0, 0.0],    # right: 0, 3 -> top right
                     [0.0, 5.0, 1.0, 1.0],    # right: 2 -> top (1) wrong
                     [1.0, 1.0, 1.0, 1.0],    # all wrong: not mixed
                     [9.0, 9.0, 9.0, 9.0]])   # filler (invalid)
  correct = np.array([[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
  valid = np.array([True, True, True, False])
  d = diagnostics.ranking_vs_oracle(scores, correct, valid)
  assert d["sample_accuracy"] == 3 / 12
  assert d["mixed_groups"] == 2 / 3
  assert d["top_right"] == 0.5
  # Prompt 0 pairs (right, wrong): (0,1) 3>1, (0,2) 3>2, (3,1) 0<1, (3,2) 0<2
  # -> 2 of 4. Prompt 1: (2,0) 1>0, (2,1) 1<5, (2,3) tie -> 1.5 of 3.
  assert np.isclose(d["pair_accuracy"], (2 + 1.5) / 7)


def test_no_mixed_group_gives_nan_not_zero():
  d = diagnostics.ranking_vs_oracle(np.zeros((2, 3)), np.zeros((2, 3)))
  assert d["sample_accuracy"] == 0.0 and d["mixed_groups"] == 0.0
  assert np.isnan(d["top_right"]) and np.isnan(d["pair_accuracy"])


def test_a_perfect_and_a_reversed_ranking():
  rng = np.random.default_rng(0)
  correct = rng.random((50, 6)) < 0.4
  noise = rng.random((50, 6))
  perfect = diagnostics.ranking_vs_oracle(correct + 0.1 * noise, correct)
  reverse = diagnostics.ranking_vs_oracle(-(correct + 0.1 * noise), correct)
  assert perfect["pair_accuracy"] == 1.0 and perfect["top_right"] == 1.0
  assert reverse["pair_accuracy"] == 0.0 and reverse["top_right"] == 0.0


def test_shorter_preferred_by_hand():
  scores = np.array([[3.0, 2.0, 1.0],    # shortest scored highest: 3 of 3
                     [1.0, 2.0, 3.0],    # longest scored highest: 0 of 3
                     [1.0, 1.0, 0.0],    # lengths 1, 1, 2: pairs (0,2) 1>0,
                     #                     (1,2) 1>0; (0,1) equal length
                     [2.0, 2.0, 5.0],    # lengths 1, 3, 3: (0,1) tie, (0,2)
                     #                     2<5 -> 0.5 of 2
                     [4.0, 5.0, 6.0],    # one length: no pair -> NaN
                     [3.0, 2.0, 1.0]])   # invalid -> NaN
  lengths = np.array([[1, 2, 3], [1, 2, 3], [1, 1, 2], [1, 3, 3], [2, 2, 2],
                      [1, 2, 3]])
  valid = np.array([True] * 5 + [False])
  got = diagnostics.shorter_preferred(scores, lengths, valid)
  np.testing.assert_array_equal(got[:4], [1.0, 0.0, 1.0, 0.25])
  assert np.isnan(got[4]) and np.isnan(got[5])


def test_shorter_preferred_skipping_ties_reads_correctness():
  # Right is 1. Row 0: the right one (length 1) is shorter than both wrong
  # ones -> 1; the wrong pair (lengths 2, 2) is no pair. Row 1: the right
  # one is the longest; the (wrong, wrong) pair (0,1) is a tie, skipped ->
  # 0 of 2. Row 2: all wrong: every pair a tie -> NaN (with ties="half": 0.5).
  correct = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0]])
  lengths = np.array([[1, 2, 2], [1, 2, 3], [1, 2, 3]])
  got = diagnostics.shorter_preferred(correct, lengths, ties="skip")
  np.testing.assert_array_equal(got[:2], [1.0, 0.0])
  assert np.isnan(got[2])
  half = diagnostics.shorter_preferred(correct, lengths)
  np.testing.assert_array_equal(half, [1.0, 0.5 * 1 / 3, 0.5])
  with pytest.raises(ValueError, match="ties"):
    diagnostics.shorter_preferred(correct, lengths, ties="drop")


def test_pairs_vs_oracle_by_hand():
  # K = 3 candidates, the anchor is member 3. Prompt 0: candidate 0 (right)
  # over 2 (wrong) -> right over wrong; a second slot absent. Prompt 1: the
  # anchor (wrong) over 1 (right) -> wrong over right; 0 over 2 (both
  # wrong) -> neither. Three present pairs.
  right = np.array([[1, 0, 0, 1], [0, 1, 0, 0]], bool)
  chosen = np.array([[0, 1], [3, 0]])
  rejected = np.array([[2, 0], [1, 2]])
  mask = np.array([[True, False], [True, True]])
  d = diagnostics.pairs_vs_oracle(chosen, rejected, mask, right)
  assert d == pytest.approx(dict(pair_right_over_wrong=1 / 3,
                                 pair_wrong_over_right=1 / 3,
                                 pair_anchor_chosen=1 / 3))
  none = diagnostics.pairs_vs_oracle(chosen, rejected, mask & False, right)
  assert all(np.isnan(v) for v in none.values())
