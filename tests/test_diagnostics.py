"""Self-ranking vs oracle agreement, by hand."""

import numpy as np

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
