"""Stage 2 (PU-RL): preference batches by hand, each recipe end to end."""

import json
import os

import numpy as np
import pytest

from purld_jax import rollout
from purld_jax.train import dpo
from purld_jax.train import grpo
from purld_jax.train import pu_rl
from tests import train_fixtures
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)


def test_pack_members_puts_the_anchor_last():
  cand = np.array([[[5, 6, 0], [7, 0, 0]]], np.int32)  # B=1, K=2, T=3
  mask = np.array([[[1, 1, 0], [1, 0, 0]]], bool)
  members, m = rollout.pack_members(cand, mask, [[8, 9, 10, 11]], pad_id=0)
  assert members.shape == (1, 3, 4)  # T grows to the anchor's 4 tokens
  np.testing.assert_array_equal(members[0, 2], [8, 9, 10, 11])
  np.testing.assert_array_equal(members[0, 0], [5, 6, 0, 0])
  np.testing.assert_array_equal(m[0].sum(-1), [2, 1, 4])


def test_dpo_pairs_by_hand():
  # scores (0.1, 0.9, 0.5), s_a = 0.7: best is 1, worst 0.
  s, s_a = np.array([[0.1, 0.9, 0.5]]), np.array([0.7])
  kw = dict(margin=0.0, mode="shift", prior=0.0)
  p = dpo.make_pairs(s, s_a, rule="best_vs_worst", **kw)
  assert (int(p.chosen[0, 0]), int(p.rejected[0, 0])) == (1, 0)
  p = dpo.make_pairs(s, s_a, rule="anchor_as_chosen", **kw)
  assert (int(p.chosen[0, 0]), int(p.rejected[0, 0])) == (3, 0)  # K = 3
  # gate, delta 0, prior 1: positives are s_k >= s_a -> only candidate 1;
  # PU pairs are (1 over 0) and (1 over 2); the fallback slot is absent.
  p = dpo.make_pairs(s, s_a, rule="pu", **dict(kw, mode="gate", prior=1.0))
  got = {(int(c), int(r)) for c, r, m in zip(p.chosen[0], p.rejected[0],
                                              p.mask[0]) if m}
  assert got == {(1, 0), (1, 2)}
  # a filler row has no pairs
  p = dpo.make_pairs(s, s_a, rule="best_vs_worst", valid=np.array([False]),
                     **kw)
  assert not bool(p.mask.any())


def test_grpo_advantages_by_hand():
  # shift mode without the anchor, tau = 1, scores (0, log 3): d = (1/4,
  # 3/4); mean 1/2, std 1/4 -> A = (-1, 1) under "std" (floor 0.1 < 1/4),
  # (-1/4, 1/4) under "center"; equal scores give exactly 0.
  s = np.array([[0.0, np.log(3.0)], [2.0, 2.0]])
  kw = dict(tau=1.0, mode="shift", include_anchor=False)
  adv = grpo.advantages(s, np.zeros(2), normalize="std", **kw)
  np.testing.assert_allclose(adv[0], [-1.0, 1.0], atol=1e-5)
  np.testing.assert_array_equal(adv[1], [0.0, 0.0])
  adv = grpo.advantages(s, np.zeros(2), normalize="center", **kw)
  np.testing.assert_allclose(adv[0], [-0.25, 0.25], atol=1e-6)
  # floor 0.5 > std 1/4: A = (d - mean) / 0.5 = (-1/2, 1/2)
  adv = grpo.advantages(s, np.zeros(2), normalize="std", std_floor=0.5, **kw)
  np.testing.assert_allclose(adv[0], [-0.5, 0.5], atol=1e-6)


def test_select_puts_the_groups_with_a_signal_first():
  sig = np.array([False, True, False, True, True, False])
  for seed in range(5):
    rows = rollout.select(sig, 2, seed)  # 3 with a signal: 2 of them
    assert sig[rows].all() and list(rows) == sorted(rows)
    rows = rollout.select(sig, 4, seed)  # all 3, then 1 without
    assert set(np.flatnonzero(sig)) < set(rows) and len(set(rows)) == 4
  np.testing.assert_array_equal(rollout.select(sig, 3, 7),
                                rollout.select(sig, 3, [7]))
  with pytest.raises(ValueError, match="7 rows asked of 6"):
    rollout.select(sig, 7, 0)


def test_signal_of_each_recipe():
  """rl.oversample's criterion: GRPO with oracle rewards (shift, no anchor)
  has no signal in a group of equal rewards; a filler row has none in any
  recipe; a row with distinct scores has one in every recipe."""
  from purld_jax.train import ldl
  c = train_fixtures.tiny_config(**{
      "pu.mode": "shift", "pu.include_anchor": False,
      "loss.grpo.advantage": "std"})
  g = rollout.Group(
      prompt_tokens=np.zeros((3, 2), np.int32),
      prompt_mask=np.ones((3, 2), bool),
      members=np.zeros((3, 3, 2), np.int32),
      member_mask=np.ones((3, 3, 2), bool),
      old_logps=np.zeros((3, 2, 2), np.float32),
      finished=np.ones((3, 2), bool),
      scores=np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]], np.float32),
      anchor_score=np.ones(3, np.float32),
      valid=np.array([True, True, False]), texts=[[""] * 2] * 3, timings={})
  assert grpo.signal(g, c).tolist() == [False, True, False]
  for recipe in (dpo, ldl):
    got = recipe.signal(g, c)
    assert got.dtype == bool and got[1] and not got[2], recipe.__name__


def test_take_keeps_rows_together():
  b, k, t = 3, 2, 4
  g = rollout.Group(
      prompt_tokens=np.arange(b * 5).reshape(b, 5),
      prompt_mask=np.ones((b, 5), bool),
      members=np.arange(b * (k + 1) * t).reshape(b, k + 1, t),
      member_mask=np.ones((b, k + 1, t), bool),
      old_logps=np.zeros((b, k, t), np.float32),
      finished=np.ones((b, k), bool), scores=np.arange(b * k).reshape(b, k),
      anchor_score=np.arange(b, dtype=np.float32),
      valid=np.array([True, False, True]), texts=[["a"], ["b"], ["c"]],
      timings={"sample_s": 1.0})
  s = rollout.take(g, np.array([0, 2]))
  assert s.k == k and s.texts == [["a"], ["c"]] and s.timings == g.timings
  np.testing.assert_array_equal(s.scores, [[0, 1], [4, 5]])
  np.testing.assert_array_equal(s.members[1], g.members[2])
  np.testing.assert_array_equal(s.anchor_score, [0.0, 2.0])
  assert s.valid.tolist() == [True, True]


# grpo also runs with ranking.length_debias on (its slope is logged), dpo
# with ranking.gate on (the share of candidates it failed is logged); each
# keeps its finished stages' checkpoints another way (ckpt.keep_finished).
# grpo draws twice its batch (rl.oversample) and trains on the groups with
# a signal first. dpo also runs with pu.mode nnpu (the PU risk, no pairs).
@pytest.mark.parametrize("recipe,debias,gate,keep,over,mode", [
    ("dpo", False, "number", "none", 1, "gate"),
    ("grpo", True, "none", "last", 2, "gate"),
    ("ldl", False, "none", "all", 1, "gate"),
    ("dpo", False, "none", "none", 1, "nnpu")])
def test_recipe_runs_end_to_end(recipe, debias, gate, keep, over, mode,
                                tmp_path, capsys, jit_cache):  # noqa: F811
  c = train_fixtures.tiny_config(**{"rl.oversample": over, "pu.mode": mode,
      "recipe": recipe, "rl.steps": 2, "sft.steps": 1,
      "log.tensorboard": False, "ranking.yes_word": "Y",
      "ranking.no_word": "N", "ckpt.async_save": False,
      "ckpt.every_steps": 1, "ckpt.keep": 3, "ckpt.keep_finished": keep,
      "ranking.length_debias": debias, "ranking.gate": gate})
  out = pu_rl.run(c, str(tmp_path))
  ckpt = tmp_path / "ckpt"
  steps = {s: sorted(os.listdir(ckpt / s)) if (ckpt / s).is_dir() else None
           for s in ("sft", recipe)}
  assert steps == {"none": {"sft": None, recipe: None},
                   "last": {"sft": ["1"], recipe: ["2"]},
                   "all": {"sft": ["1"], recipe: ["1", "2"]}}[keep]
  # Finished: a second run trains nothing, whatever checkpoints are left.
  capsys.readouterr()
  assert pu_rl.run(c, str(tmp_path)) == out
  err = capsys.readouterr().err
  assert f"[{recipe}] already done" in err
  assert os.path.isfile(os.path.join(out, "model.safetensors"))
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  rl = [r for r in rows if r["stage"] == recipe]
  assert [r["step"] for r in rl] == [1, 2]
  for r in rl:
    assert np.isfinite(r["loss"]) and r["teacher_calls"] == 0.0
    assert {"sample_s", "score_s", "update_s", "score_std"} <= set(r)
    assert ("risk_neg" in r) == (mode == "nnpu")
    # DPO steps log the verifier's verdict on their pairs (shares).
    assert ("oracle_pair_right_over_wrong" in r) == (recipe == "dpo")
    if recipe == "dpo" and np.isfinite(r["oracle_pair_anchor_chosen"]):
      assert 0.0 <= (r["oracle_pair_right_over_wrong"]
                     + r["oracle_pair_wrong_over_right"]) <= 1.0
      if mode == "nnpu":  # every pair is the anchor over a candidate
        assert r["oracle_pair_anchor_chosen"] == 1.0
    if mode == "nnpu":  # nothing ranked: no score, no ranking-vs-oracle
      assert r["score_std"] == 0.0 and "oracle_pair_accuracy" not in r
    assert ("length_slope" in r) == debias
    if debias:
      assert np.isfinite(r["length_slope"])
    assert ("gated" in r) == (gate != "none")
    if gate != "none":
      assert 0.0 <= r["gated"] <= 1.0
    # The demo prompts have answers: the ranking is checked against them.
    assert 0.0 <= r["oracle_sample_accuracy"] <= 1.0
    assert 0.0 <= r["oracle_mixed_groups"] <= 1.0
    assert ("signal_kept" in r) == (over > 1)
    if over > 1:  # the signal comes first: kept share >= drawn share
      assert 0.0 <= r["signal_drawn"] <= r["signal_kept"] <= 1.0


# ----------------------------------------------------------------------------
# Exact resume after kill -9 (stage 2)

N = 2  # kill after N steps, resume to 2N


def _rl_config(recipe, **kw):
  return train_fixtures.tiny_config(**{
      "recipe": recipe, "rl.steps": 2 * N, "sft.steps": 1,
      "ckpt.every_steps": N, "log.tensorboard": False,
      "ranking.yes_word": "Y", "ranking.no_word": "N", **kw})


@pytest.mark.parametrize("recipe", ["dpo", "grpo"])
def test_exact_resume_after_kill_9(recipe, tmp_path, jit_cache):  # noqa: F811
  """N steps, kill -9, resume to 2N: bit-identical to an uninterrupted 2N
  run, and no teacher request after the resume. GRPO draws twice its batch
  (rl.oversample): the selection replays too."""
  over = 2 if recipe == "grpo" else 1
  cfg = _rl_config(recipe, **{"rl.oversample": over})
  full = str(tmp_path / "full")
  pu_rl.run(cfg, full)
  killed = str(tmp_path / "killed")
  cmd = train_fixtures.rl_command(cfg, killed, 2 * N, N,
                                  f"--config.rl.oversample={over}")
  train_fixtures.resume_after_kill_matches(cfg, cmd, killed, full, N)
