"""The anchor as the labelled positive (purld_jax/pu.py, docs/METHOD.md step 4).

Expected values are worked out by hand in the comments. The recipe-level
tests call each recipe's `build_batch` on a hand-made group, so that
replacing the anchor's score by anything else in a batch builder (noise, a
constant) changes what they see.
"""

import types

import jax.numpy as jnp
import numpy as np
import pytest

from purld_jax import pu
from purld_jax.train import dpo
from purld_jax.train import grpo
from purld_jax.train import ldl
from tests import train_fixtures

LN3 = float(np.log(3.0))


def _set(p):
  """{(chosen, rejected)} of the present pairs of prompt 0."""
  return {(int(c), int(r)) for c, r, m in zip(p.chosen[0], p.rejected[0],
                                              p.mask[0]) if m}


def test_gate_positives_by_hand():
  s, s_a = jnp.array([[0.1, 0.9, 0.5, 0.7]]), jnp.array([0.6])
  got = lambda **kw: np.flatnonzero(np.asarray(
      pu.gate_positives(s, s_a, **kw)[0])).tolist()
  assert got(delta=0.0, prior=1.0) == [1, 3]        # 0.9, 0.7 >= 0.6
  assert got(delta=0.0, prior=0.25) == [1]          # cap ceil(0.25 * 4) = 1
  assert got(delta=0.15, prior=1.0) == [1, 2, 3]    # 0.5 >= 0.45
  assert got(delta=0.0, prior=0.0) == []            # cap 0
  masked = pu.gate_positives(s, s_a, delta=0.0, prior=1.0,
                             candidate_mask=jnp.array([[1, 0, 1, 1]], bool))
  assert np.flatnonzero(np.asarray(masked[0])).tolist() == [3]


def test_moving_the_anchor_score_changes_the_dpo_pair():
  # scores (0.1, 0.9, 0.5): s_a = 0.7 -> P = {1}: best 1 over worst 0.
  # s_a = 1.0 -> P empty: the anchor (index K = 3) over the worst, 0.
  s = np.array([[0.1, 0.9, 0.5]])
  kw = dict(rule="best_vs_worst", margin=0.0, mode="gate", prior=1.0)
  assert _set(dpo.make_pairs(s, np.array([0.7]), **kw)) == {(1, 0)}
  assert _set(dpo.make_pairs(s, np.array([1.0]), **kw)) == {(3, 0)}
  # without the fallback a group with P empty gives nothing
  assert _set(dpo.make_pairs(s, np.array([1.0]), anchor_fallback=False,
                             **kw)) == set()
  # shift (the ablation) cannot see s_a: the same pair either way
  kw["mode"] = "shift"
  assert _set(dpo.make_pairs(s, np.array([0.7]), **kw)) == {(1, 0)}
  assert _set(dpo.make_pairs(s, np.array([1.0]), **kw)) == {(1, 0)}


def test_nnpu_pairs_are_the_anchor_against_every_candidate():
  # nnpu reads no score: anchor (K = 3) against candidates 0, 1, 2 whatever
  # the scores, s_a or rule; a filler group (valid False) gives nothing.
  s = np.array([[0.1, 0.9, 0.5], [3.0, 2.0, 1.0]])
  for s_a in (0.0, 9.0):
    p = dpo.make_pairs(s, np.array([s_a, s_a]), rule="best_vs_worst",
                       margin=0.0, mode="nnpu", valid=np.array([True, False]))
    assert _set(p) == {(3, 0), (3, 1), (3, 2)}
    assert not np.asarray(p.mask[1]).any()


def test_nnpu_is_refused_for_the_listwise_recipes():
  from purld_jax import main  # pylint: disable=g-import-not-at-top
  cfg = lambda recipe: train_fixtures.tiny_config(  # noqa: E731
      recipe=recipe, **{"pu.mode": "nnpu"})
  for recipe in ("grpo", "ldl"):
    with pytest.raises(main.ConfigError, match="pu.mode='nnpu' with recipe"):
      main.validate(cfg(recipe))
  main.validate(cfg("dpo"))


@pytest.mark.parametrize("rule", ["best_vs_worst", "pu", "margin"])
def test_all_unlabeled_group_has_no_candidate_pair(rule):
  # s_a above every candidate: P is empty, so every present pair has the
  # anchor (index 4) as chosen; with no fallback there is no pair at all.
  s, s_a = np.array([[0.1, 0.4, 0.3, 0.2]]), np.array([0.5])
  p = dpo.make_pairs(s, s_a, rule=rule, margin=0.0, mode="gate", prior=0.5)
  assert _set(p) == {(4, 0)}
  p = dpo.make_pairs(s, s_a, rule=rule, margin=0.0, mode="gate", prior=0.5,
                     anchor_fallback=False)
  assert _set(p) == set()


def test_gated_pu_pairs_and_margin_by_hand():
  # s = (0.1, 0.9, 0.5, 0.8), s_a = 0.6, prior 0.5 (cap 2): P = {1, 3};
  # unlabeled {0, 2}: pairs 1>0, 1>2, 3>0, 3>2; margin 0.35 keeps the gaps
  # 0.8, 0.4, 0.7 and drops 3>2 (gap 0.3).
  s, s_a = np.array([[0.1, 0.9, 0.5, 0.8]]), np.array([0.6])
  kw = dict(mode="gate", prior=0.5)
  assert _set(dpo.make_pairs(s, s_a, rule="pu", margin=0.0, **kw)) == {
      (1, 0), (1, 2), (3, 0), (3, 2)}
  assert _set(dpo.make_pairs(s, s_a, rule="margin", margin=0.35, **kw)) == {
      (1, 0), (1, 2), (3, 0)}


def test_grpo_advantages_move_with_the_anchor_score():
  # tau 1, s = (0, ln 3), gate, delta 0, prior 1, anchor as member 3:
  # s_a = ln 3: P = {1}; d over {1, anchor} = (0, 1/2, 1/2); mean 1/3 ->
  #   A = (-1/3, 1/6) (centred).
  # s_a = 10: P empty -> fallback d = (0, 0, 1) -> A = (-1/3, -1/3);
  #   without the fallback the group is dropped: A = (0, 0).
  # s_a = -10: P = {0, 1}; d ~ (1/4, 3/4, 0) -> A ~ (-1/12, 5/12).
  s = np.array([[0.0, LN3]])
  kw = dict(tau=1.0, normalize="center", mode="gate", prior=1.0)
  np.testing.assert_allclose(grpo.advantages(s, np.array([LN3]), **kw)[0],
                             [-1 / 3, 1 / 6], atol=1e-6)
  np.testing.assert_allclose(grpo.advantages(s, np.array([10.0]), **kw)[0],
                             [-1 / 3, -1 / 3], atol=1e-6)
  np.testing.assert_array_equal(
      grpo.advantages(s, np.array([10.0]), anchor_fallback=False, **kw)[0],
      [0.0, 0.0])
  np.testing.assert_allclose(grpo.advantages(s, np.array([-10.0]), **kw)[0],
                             [-1 / 12, 5 / 12], atol=1e-4)


def test_std_floor_keeps_noise_small():
  # s = (0, 0.01), shift, no anchor: d = softmax = (0.4975.., 0.5025..);
  # centred +-0.0025, std 0.0025. Divided by the std that is +-1 (noise
  # blown up to unit size); with the floor 0.1 it is +-0.025.
  s = np.array([[0.0, 0.01]])
  half = float(np.tanh(0.005) / 2)  # (d_1 - d_0) / 2
  kw = dict(tau=1.0, mode="shift", include_anchor=False)
  adv = grpo.advantages(s, np.zeros(1), normalize="std", std_floor=0.1, **kw)
  np.testing.assert_allclose(adv[0], [-half / 0.1, half / 0.1], rtol=1e-3)
  assert np.abs(adv).max() < 0.03


def test_pu_advantages_center_over_members():
  d = jnp.array([[0.0, 0.5, 0.5]])
  np.testing.assert_allclose(pu.advantages(d)[0], [-1 / 3, 1 / 6, 1 / 6],
                             atol=1e-7)
  with pytest.raises(ValueError, match="normalize"):
    pu.advantages(d, normalize="zscore")


# ---------------------------------------------------------------------------
# The recipes' batch builders see the anchor's score.


def _group(scores, anchor_score):
  b, k = scores.shape
  t = 3
  members = np.arange(1, b * (k + 1) * t + 1, dtype=np.int32).reshape(
      b, k + 1, t)
  return types.SimpleNamespace(
      k=k, scores=np.asarray(scores, np.float32),
      anchor_score=np.asarray(anchor_score, np.float32),
      valid=np.ones(b, bool), prompt_tokens=np.ones((b, 2), np.int32),
      prompt_mask=np.ones((b, 2), bool), members=members,
      member_mask=np.ones((b, k + 1, t), bool),
      old_logps=np.zeros((b, k, t), np.float32),
      images=dict)  # text prompts: no pixel inputs (rollout.Group.images)


def _config(recipe):
  return train_fixtures.tiny_config(**{
      "recipe": recipe, "pu.mode": "gate", "pu.prior": 1.0,
      "preference.tau_label": 1.0, "loss.grpo.advantage": "center"})


def test_dpo_batch_changes_with_the_anchor_score():
  # s = (0.1, 0.9, 0.5): s_a 0.7 -> chosen candidate 1; s_a 1.0 -> the
  # anchor. The compacted members hold candidate 1's tokens or the anchor's.
  s = np.array([[0.1, 0.9, 0.5]])
  lo = dpo.build_batch(_group(s, [0.7]), _config("dpo"))
  hi = dpo.build_batch(_group(s, [1.0]), _config("dpo"))
  g = _group(s, [0.7])
  chosen = lambda b: b["members"][0, int(b["chosen"][0, 0])][:3]
  np.testing.assert_array_equal(chosen(lo), g.members[0, 1])
  np.testing.assert_array_equal(chosen(hi), g.members[0, 3])


def test_grpo_batch_changes_with_the_anchor_score():
  s = np.array([[0.0, LN3]])
  a = grpo.build_batch(_group(s, [LN3]), _config("grpo"))["advantages"]
  b = grpo.build_batch(_group(s, [10.0]), _config("grpo"))["advantages"]
  np.testing.assert_allclose(a[0], [-1 / 3, 1 / 6], atol=1e-6)
  np.testing.assert_allclose(b[0], [-1 / 3, -1 / 3], atol=1e-6)


def test_ldl_batch_puts_mass_on_positives_and_the_anchor():
  # s_a = ln 3: d = (0, 1/2, 1/2); s_a = 10: d = (0, 0, 1).
  s = np.array([[0.0, LN3]])
  a = ldl.build_batch(_group(s, [LN3]), _config("ldl"))
  b = ldl.build_batch(_group(s, [10.0]), _config("ldl"))
  np.testing.assert_allclose(a["label_dist"][0], [0, 0.5, 0.5], atol=1e-6)
  np.testing.assert_allclose(b["label_dist"][0], [0, 0, 1], atol=1e-6)
  assert a["member_mask"].shape == (1, 3) and a["member_mask"].all()
  c = _config("ldl")
  c.pu.anchor_fallback = False
  assert not ldl.build_batch(_group(s, [10.0]), c)["member_mask"].any()
