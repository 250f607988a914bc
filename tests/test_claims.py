"""experiments/claims.py: the two ranking claims, on hand-made groups."""

import math

import numpy as np
import pytest

from experiments import claims


def test_order_consistency_holds_for_increasing_maps_only():
  # Group 0: best 0, worst 1; group 1: a tie for best (lowest index, 0),
  # worst 2; group 2: filler. Increasing maps change nothing; a decreasing
  # one swaps both groups' best and worst.
  s = np.array([[0.5, -1.0, 0.2], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  valid = np.array([[1, 1, 1], [1, 1, 1], [0, 0, 0]], bool)
  assert claims.order_consistency(s, valid) == {k: 1.0 for k in
                                                claims.TRANSFORMS}
  assert claims.order_consistency(s, valid, {"-s": lambda x: -x}) == {
      "-s": 0.0}


def test_concentration_by_hand():
  # One real group, s = (ln 3, 0, 0): at tau 1, d = (3/5, 1/5, 1/5); the
  # near-best set (delta 0.1) is {0}, the right ones {1, 2}. Uniform d:
  # 1/3 and 2/3. As tau -> 0 all mass goes to the best. Group 1 is filler.
  s = np.array([[math.log(3), 0.0, 0.0], [5.0, 0.0, 0.0]])
  correct = np.array([[0, 1, 1], [1, 1, 1]])
  valid = np.array([[1, 1, 1], [0, 0, 0]], bool)
  rows = {r["tau"]: r for r in claims.concentration(
      s, correct, valid, delta=0.1, taus=(1.0, 0.01))}
  assert rows[1.0]["near_best_mass"] == pytest.approx(0.6, rel=1e-6)
  assert rows[1.0]["right_mass"] == pytest.approx(0.4, rel=1e-6)
  assert rows[np.inf]["near_best_mass"] == pytest.approx(1 / 3)
  assert rows[np.inf]["right_mass"] == pytest.approx(2 / 3)
  assert rows[0.01]["near_best_mass"] == pytest.approx(1.0, abs=1e-6)
  no_oracle = claims.concentration(s, None, valid, delta=0.1, taus=(1.0,))
  assert all(np.isnan(r["right_mass"]) for r in no_oracle)


def test_main_names_a_pool_without_the_scores(tmp_path, capsys):
  (tmp_path / "rollouts").mkdir()
  assert claims.main(["--workdir", str(tmp_path), "--scheme", "pmi",
                      "--out", str(tmp_path / "c")]) == 2
  assert "no step holds scores 'pmi'" in capsys.readouterr().err
