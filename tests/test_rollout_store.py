"""The rollout store: round trip, overwrite, sub-sampling, re-ranking,
Kendall tau, and the PU-RL loop writing it (resume included)."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from purld_jax import diagnostics
from purld_jax import prompts as prompts_lib
from purld_jax import rollout
from purld_jax import rollout_store
from purld_jax import self_scoring
from purld_jax.train import dpo
from experiments import rerank as rerank_lib
from tests import train_fixtures
from tests.train_fixtures import char_tok  # noqa: F401  (fixture)
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)


def _group(b=2, k=3, t=4, p=5, seed=0) -> rollout.Group:
  """A hand-made Group: B prompts, K candidates, random but fixed arrays."""
  rng = np.random.default_rng(seed)
  members = rng.integers(1, 50, (b, k + 1, t)).astype(np.int32)
  lengths = rng.integers(1, t + 1, (b, k + 1))
  member_mask = np.arange(t) < lengths[..., None]
  members = np.where(member_mask, members, 0).astype(np.int32)
  return rollout.Group(
      prompt_tokens=rng.integers(0, 50, (b, p)).astype(np.int32),
      prompt_mask=np.arange(p)[None] >= np.array([[1], [0]])[:b],
      members=members, member_mask=member_mask,
      old_logps=-rng.random((b, k, t)).astype(np.float32),
      finished=rng.random((b, k)) < 0.5,
      scores=rng.standard_normal((b, k)).astype(np.float32),
      anchor_score=rng.standard_normal(b).astype(np.float32),
      valid=np.array([True, False])[:b],
      texts=[[f"cand {i}.{j} é" for j in range(k)] for i in range(b)],
      timings={})


def _prompts(b=2):
  return [prompts_lib.Prompt.from_text(f"what is {i} + 1?", id=f"p{i}",
                                       answer=str(i + 1)) for i in range(b)]


def _write(store, step, group, **kw):
  b = len(group.valid)
  args = dict(prompts=_prompts(b), anchors=[f"anchor {i}" for i in range(b)],
              anchor_keys=[f"{i:064x}" for i in range(b)], scheme="judge",
              recipe="dpo", prompt_index=np.arange(b) + 10)
  args.update(kw)
  store.write(step, group, **args)


def test_round_trip_gives_back_the_arrays_and_texts(tmp_path):
  g = _group()
  correct = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
  prefs = dict(chosen=np.array([[3], [1]], np.int32),
               rejected=np.array([[0], [2]], np.int32),
               pair_mask=np.array([[True], [False]]))
  store = rollout_store.RolloutStore(tmp_path / "r")
  _write(store, 7, g, preferences=prefs, correct=correct)
  r = rollout_store.RolloutStore.open(tmp_path / "r").read(7)
  assert store.steps() == [7]
  for name in ("prompt_tokens", "prompt_mask", "members", "member_mask",
               "old_logps", "finished", "valid"):
    want, got = getattr(g, name), getattr(r, name)
    assert got.dtype == want.dtype, name
    np.testing.assert_array_equal(got, want, err_msg=name)
  np.testing.assert_array_equal(r.prompt_index, [10, 11])
  assert list(r.scores) == ["judge"] and r.scheme == "judge"
  np.testing.assert_array_equal(r.scores["judge"], g.scores)
  np.testing.assert_array_equal(r.anchor_scores["judge"], g.anchor_score)
  np.testing.assert_array_equal(r.correct, correct)
  assert set(r.preferences) == set(prefs)
  for key, v in prefs.items():
    np.testing.assert_array_equal(r.preferences[key], v)
  assert r.texts == g.texts and r.prompt_ids == ["p0", "p1"]
  assert r.anchors == ["anchor 0", "anchor 1"]
  assert r.anchor_keys == [f"{i:064x}" for i in range(2)]
  assert r.answers == ["1", "2"] and r.recipe == "dpo" and r.k == 3
  assert r.messages[1] == [{"role": "user", "content": "what is 1 + 1?"}]
  # candidates(): the unpadded token lists, as score_group takes them
  assert r.candidates()[1][2] == g.members[1, 2][g.member_mask[1, 2]].tolist()
  np.testing.assert_array_equal(r.candidate_index, [[0, 1, 2], [0, 1, 2]])


def test_a_rewritten_step_replaces_the_old_one(tmp_path):
  store = rollout_store.RolloutStore(tmp_path)
  _write(store, 1, _group(seed=0))
  _write(store, 2, _group(seed=1))
  g = _group(seed=2, t=6, p=3)  # a re-run may have other shapes
  _write(store, 1, g, correct=None)
  assert store.steps() == [1, 2]
  r = store.read(1)
  np.testing.assert_array_equal(r.members, g.members)
  np.testing.assert_array_equal(r.prompt_tokens, g.prompt_tokens)
  assert r.correct is None
  assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000002"]


def test_unfinished_writes_are_not_steps(tmp_path):
  store = rollout_store.RolloutStore(tmp_path)
  _write(store, 1, _group())
  # A writer killed mid-step leaves a .tmp- folder; one without the marker
  # (meta.json) is not a step either.
  shutil.copytree(tmp_path / "step_00000001", tmp_path / ".tmp-00000002-x")
  os.makedirs(tmp_path / "step_00000003")
  assert store.steps() == [1]
  rollout_store.RolloutStore(tmp_path)  # the next writer cleans up
  assert not (tmp_path / ".tmp-00000002-x").exists()
  with pytest.raises(KeyError):
    store.read(3)


def test_add_scores(tmp_path):
  store = rollout_store.RolloutStore(tmp_path)
  g = _group()
  _write(store, 1, g)
  pmi = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
  assert store.add_scores(1, "pmi", pmi, np.array([7, 8]))
  assert store.schemes(1) == ["judge", "pmi"]
  r = store.read(1)
  np.testing.assert_array_equal(r.scores["pmi"], pmi)
  np.testing.assert_array_equal(r.anchor_scores["pmi"], [7, 8])
  np.testing.assert_array_equal(r.scores["judge"], g.scores)
  assert not store.add_scores(1, "pmi", pmi * 0)  # present: kept
  np.testing.assert_array_equal(store.read(1).scores["pmi"], pmi)
  assert store.add_scores(1, "pmi", pmi * 0, overwrite=True)
  np.testing.assert_array_equal(store.read(1).scores["pmi"], pmi * 0)
  with pytest.raises(ValueError, match="B, K"):
    store.add_scores(1, "x", np.zeros((2, 2)))
  with pytest.raises(ValueError, match="name"):
    store.add_scores(1, "../x", pmi)
  with pytest.raises(KeyError):
    store.add_scores(5, "x", pmi)


def test_subsample_is_deterministic_and_consistent(tmp_path):
  store = rollout_store.RolloutStore(tmp_path)
  g = _group(b=2, k=5)
  correct = (np.arange(10).reshape(2, 5) % 2).astype(np.float32)
  _write(store, 3, g, correct=correct)
  store.add_scores(3, "pmi", np.arange(10, dtype=np.float32).reshape(2, 5))
  r = store.read(3)
  a, b = rollout_store.subsample(r, 2, 0), rollout_store.subsample(r, 2, 0)
  np.testing.assert_array_equal(a.candidate_index, b.candidate_index)
  assert a.k == 2 and a.members.shape == (2, 3, 4)
  for i in range(2):
    idx = a.candidate_index[i]
    assert len(set(idx)) == 2 and list(idx) == sorted(idx)
    np.testing.assert_array_equal(a.members[i, :2], g.members[i, idx])
    np.testing.assert_array_equal(a.members[i, 2], g.members[i, 5])  # anchor
    np.testing.assert_array_equal(a.member_mask[i, :2], g.member_mask[i, idx])
    np.testing.assert_array_equal(a.old_logps[i], g.old_logps[i, idx])
    np.testing.assert_array_equal(a.finished[i], g.finished[i, idx])
    np.testing.assert_array_equal(a.correct[i], correct[i, idx])
    np.testing.assert_array_equal(a.scores["pmi"][i], 5 * i + idx)
    np.testing.assert_array_equal(a.scores["judge"][i], g.scores[i, idx])
    assert a.texts[i] == [g.texts[i][j] for j in idx]
  assert a.preferences == {}
  # Seeds give different subsets (10 choose-2 pairs over 2 prompts and 8
  # seeds: all equal has probability 1e-14), all of K gives the pool.
  assert len({rollout_store.subsample(r, 2, s).candidate_index.tobytes()
              for s in range(8)}) > 1
  full = rollout_store.subsample(r, 5, 1)
  np.testing.assert_array_equal(full.members, r.members)
  # Twice sub-sampled: indices still point into the stored pool.
  twice = rollout_store.subsample(rollout_store.subsample(r, 4, 1), 2, 0)
  for i in range(2):
    np.testing.assert_array_equal(twice.scores["pmi"][i],
                                  5 * i + twice.candidate_index[i])
  with pytest.raises(ValueError):
    rollout_store.subsample(r, 6, 0)


def test_compacted_dpo_pairs_are_stored_as_member_indices():
  # B=1, K=3 (+ anchor = member 3); the pair anchor over candidate 0 keeps
  # members 0 and 3 (slots 0, 1): chosen slot 1 -> member 3.
  g = _group(b=1, k=3)
  batch = dict(prompt_tokens=g.prompt_tokens, prompt_mask=g.prompt_mask,
               members=g.members, member_mask=g.member_mask,
               chosen=np.array([[3]], np.int32),
               rejected=np.array([[0]], np.int32),
               pair_mask=np.array([[True]]))
  small = dpo.compact(batch, len_multiple=1, min_members=2)
  assert small["members"].shape[1] == 2 and int(small["chosen"][0, 0]) == 1
  prefs = rollout_store.preferences_of(small, g)
  assert (int(prefs["chosen"][0, 0]), int(prefs["rejected"][0, 0])) == (3, 0)
  # grpo's advantages pass through as they are
  adv = np.ones((1, 3), np.float32)
  assert set(rollout_store.preferences_of(dict(advantages=adv), g)) == {
      "advantages"}


@pytest.mark.parametrize("x, y, want", [
    ((1, 2, 3), (1, 2, 3), 1.0),
    ((1, 2, 3), (3, 2, 1), -1.0),
    # 6 pairs, only (2, 3) discordant: (5 - 1) / 6
    ((1, 2, 3, 4), (1, 3, 2, 4), 2 / 3),
    # ties in x: pair (1, 2) tied; C = 2, D = 0, untied 2 in x, 3 in y:
    # 2 / sqrt(2 * 3)
    ((1, 2, 2), (1, 2, 3), 2 / np.sqrt(6)),
    # scores vs binary correctness (1, 0, 0): pairs (0, 1), (0, 2)
    # concordant, (1, 2) tied in y: 2 / sqrt(3 * 2)
    ((0.9, 0.1, 0.5), (1, 0, 0), 2 / np.sqrt(6)),
    # right (1, 0, 1, 0) with scores (4, 3, 2, 1): pairs right-over-wrong
    # (0,1) C, (0,3) C, (1,2) D, (2,3) C; (0,2), (1,3) tied in y:
    # (3 - 1) / sqrt(6 * 4)
    ((4, 3, 2, 1), (1, 0, 1, 0), 2 / np.sqrt(24)),
])
def test_kendall_tau_by_hand(x, y, want):
  np.testing.assert_allclose(diagnostics.kendall_tau(np.array(x, float),
                                                     np.array(y, float)),
                             want, rtol=1e-12)


def test_kendall_tau_rows_is_nan_without_an_order():
  x = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
  y = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
  tau = diagnostics.kendall_tau_rows(x, y)
  assert np.isnan(tau[0]) and np.isnan(tau[2])
  np.testing.assert_allclose(tau[1], 2 / np.sqrt(6))  # as the tie case above
  assert np.isnan(diagnostics.kendall_tau_rows(
      x[1:2], y[1:2], valid=np.array([False]))[0])


def test_agreement_table_over_the_stored_pool(tmp_path):
  store = rollout_store.RolloutStore(tmp_path)
  g = _group(b=2, k=4)
  correct = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], np.float32)
  _write(store, 1, g, correct=correct)
  store.add_scores(1, "pmi", np.array([[4, 3, 2, 1], [1, 2, 3, 4]],
                                      np.float32))
  rows = rerank_lib.agreement_table(store, ["pmi", "judge"], ks=[4, 2],
                                       seeds=[0, 1])
  assert [(r["scheme"], r["k"], r["seed"]) for r in rows] == [
      ("pmi", 4, 0), ("pmi", 4, 1), ("pmi", 2, 0), ("pmi", 2, 1),
      ("judge", 4, 0), ("judge", 4, 1), ("judge", 2, 0), ("judge", 2, 1)]
  # k = K: the whole pool; prompt 1 is filler (valid False): only prompt 0,
  # whose tau is the hand case above, 2 / sqrt(24); its top is right.
  full = rows[0]
  assert full["prompts"] == 1 and full["steps"] == 1
  np.testing.assert_allclose(full["kendall_tau"], 2 / np.sqrt(24))
  assert full["top_right"] == 1.0 and full["pair_accuracy"] == 0.75
  for r in rows:
    assert 0.0 <= r["sample_accuracy"] <= 1.0


def test_agreement_table_length_debias_rows(tmp_path):
  # Prompt 0's candidates have 1, 2, 3, 4 tokens (none finished, so no
  # stop token to leave out) and pmi scores 4, 3, 2, 1: the shorter always
  # scores higher, by exactly one point per token. Removing that line
  # leaves four equal scores: every pair a tie, half credit. Prompt 1 is
  # filler: it neither feeds the slope nor counts.
  store = rollout_store.RolloutStore(tmp_path)
  g = _group(b=2, k=4, t=5)
  n = np.array([[1, 2, 3, 4, 5], [5, 1, 5, 1, 5]])
  g = dataclasses.replace(g, member_mask=np.arange(5) < n[..., None],
                          finished=np.zeros((2, 4), bool))
  _write(store, 1, g, correct=np.array([[1, 0, 1, 0], [0, 1, 0, 0]],
                                       np.float32))
  store.add_scores(1, "pmi", np.array([[4, 3, 2, 1], [1, 2, 3, 4]],
                                      np.float32))
  rows = rerank_lib.agreement_table(store, ["pmi"], ks=[4], seeds=[0],
                                       length_debias=True)
  raw, flat = rows
  assert (raw["scheme"], flat["scheme"]) == ("pmi", "pmi+length_debias")
  assert raw["shorter_preferred"] == 1.0 and raw["pair_accuracy"] == 0.75
  assert flat["shorter_preferred"] == 0.5 and flat["pair_accuracy"] == 0.5
  assert np.isnan(flat["kendall_tau"])  # no order left to correlate


def test_agreement_table_gate_rows(tmp_path):
  # Prompt 0 (its anchor "anchor 0" holds a number) has candidates "No",
  # "4", "no idea", "7"; only "4" is right, and the judge scores "No"
  # highest. Gated, "No" and "no idea" go below the anchor's 0.5 and the
  # passing "7"'s -1: to floor -1 minus margin 1 = -2. Prompt 1 is filler.
  store = rollout_store.RolloutStore(tmp_path)
  g = dataclasses.replace(_group(b=2, k=4),
                          texts=[["No", "4", "no idea", "7"],
                                 ["No", "a", "b", "c"]])
  _write(store, 1, g, correct=np.array([[0, 1, 0, 0], [0, 1, 0, 0]],
                                       np.float32))
  store.add_scores(1, "judge", np.array([[5, 1, 3, -1], [1, 2, 3, 4]],
                                        np.float32),
                   np.array([0.5, 0.0], np.float32), overwrite=True)
  raw, gated = rerank_lib.agreement_table(store, ["judge"], ks=[4],
                                          seeds=[0], gate="number")
  assert (raw["scheme"], gated["scheme"]) == ("judge", "judge+gate_number")
  # Right "4" (1) against the wrong 5, 3, -1: above one of three. Gated
  # (-2, 1, -2, -1): above all three, and the top.
  assert raw["pair_accuracy"] == pytest.approx(1 / 3)
  assert raw["top_right"] == 0.0
  assert gated["pair_accuracy"] == 1.0 and gated["top_right"] == 1.0
  # A store without the anchor's score for the scheme: said, not guessed.
  store.add_scores(1, "pmi", np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="no stored anchor score for 'pmi'"):
    rerank_lib.agreement_table(store, ["pmi"], ks=[4], seeds=[0],
                               gate="number")


def test_rerank_fills_missing_schemes_and_resumes(tmp_path, char_tok):  # noqa: F811
  tok = char_tok
  store = rollout_store.RolloutStore(tmp_path)
  texts = [["1", "x2"], ["5", "4"]]
  b, k = 2, 2
  members = np.zeros((b, k + 1, 3), np.int32)
  mask = np.zeros((b, k + 1, 3), bool)
  anchors = ["2", "3"]
  for i in range(b):
    for j, s in enumerate(texts[i] + [anchors[i]]):
      ids = tok.encode(s)
      members[i, j, :len(ids)], mask[i, j, :len(ids)] = ids, True
  g = rollout.Group(
      prompt_tokens=np.zeros((b, 2), np.int32),
      prompt_mask=np.ones((b, 2), bool), members=members, member_mask=mask,
      old_logps=np.zeros((b, k, 3), np.float32),
      finished=np.ones((b, k), bool), scores=np.zeros((b, k), np.float32),
      anchor_score=np.zeros(b, np.float32), valid=np.ones(b, bool),
      texts=texts, timings={})
  _write(store, 1, g, anchors=anchors, correct=None)
  done = rerank_lib.rerank(store, None, tok, ["similarity", "oracle"],
                              prefix="re_")
  assert done == [(1, "re_similarity"), (1, "re_oracle")]
  r = store.read(1)
  # oracle: the answers are "1" and "2" (_prompts): only candidate 0 of
  # prompt 0 is right ("x2" would be right for prompt 1, not 0).
  np.testing.assert_array_equal(r.scores["re_oracle"], [[1, 0], [0, 0]])
  want, want_a = self_scoring.score_group(
      None, tok, r.messages, anchors, r.candidates(), scheme="similarity")
  np.testing.assert_array_equal(r.scores["re_similarity"], want)
  np.testing.assert_array_equal(r.anchor_scores["re_similarity"], want_a)
  assert rerank_lib.rerank(store, None, tok,
                              ["similarity", "oracle"], prefix="re_") == []


# ----------------------------------------------------------------------------
# The PU-RL loop writes the store; a resume rewrites the re-run steps only


def _stamps(workdir):
  out = {}
  for name in sorted(os.listdir(os.path.join(workdir, "rollouts"))):
    with open(os.path.join(workdir, "rollouts", name, "meta.json")) as f:
      out[name] = json.load(f)["written"]
  return out


def test_pu_rl_writes_the_store_and_a_resume_rewrites(tmp_path, jit_cache):  # noqa: F811
  from purld_jax.train import pu_rl
  cfg = train_fixtures.tiny_config(**{
      "recipe": "dpo", "rl.steps": 2, "sft.steps": 1,
      "ckpt.every_steps": 1, "ckpt.async_save": False,
      "ckpt.keep_finished": "all", "log.tensorboard": False})
  pu_rl.run(cfg, str(tmp_path))
  store = rollout_store.RolloutStore.open(tmp_path / "rollouts")
  assert store.steps() == [1, 2]
  r = store.read(1)
  k = cfg.sampling.num_candidates
  assert r.k == k and r.members.shape[:2] == (cfg.rl.batch_size, k + 1)
  assert r.recipe == "dpo" and list(r.scores) == [cfg.ranking.scheme]
  assert len(r.texts) == cfg.rl.batch_size and len(r.texts[0]) == k
  assert all(len(key) == 64 for key in r.anchor_keys)
  assert r.correct is not None and r.correct.shape == (cfg.rl.batch_size, k)
  # best-vs-worst: one pair per prompt, over candidates (member indices < K)
  assert r.preferences["chosen"].shape == (cfg.rl.batch_size, 1)
  assert int(r.preferences["chosen"].max()) < k + 1
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if '"dpo"' in line]
  assert all(row["store_s"] >= 0 for row in rows)
  before, old2 = _stamps(tmp_path), store.read(2)

  # Killed after step 2's rollout, before its checkpoint: resume from 1.
  shutil.rmtree(tmp_path / "ckpt" / "dpo" / "2")
  shutil.rmtree(tmp_path / pu_rl.FINAL)  # not written yet at that moment
  pu_rl.run(cfg, str(tmp_path))
  after = _stamps(tmp_path)
  assert list(after) == ["step_00000001", "step_00000002"]
  assert after["step_00000001"] == before["step_00000001"]
  assert after["step_00000002"] > before["step_00000002"]
  new2 = store.read(2)  # exact resume: the same candidates again
  np.testing.assert_array_equal(new2.members, old2.members)
  assert new2.texts == old2.texts


def test_gate_vs_oracle_counts_the_gated_pairs_by_hand():
  # K = 4, pu.prior 0.5: at most 2 likely positives a group.
  # g0: s_a 2.5, only candidate 0 within delta 0 -> pair 0 over the worst
  #     outside P (3): right over wrong.
  # g1: every candidate far below s_a 5 -> P empty -> anchor (4, right)
  #     over the worst (0, wrong): right over wrong, a fallback.
  # g2: s_a 0, P = top 2 of {0, 1, 2} -> 0 over 3: wrong over right.
  # g3: filler (valid False): counted nowhere.
  s = np.array([[3, 2, 1, 0], [0, 1, 2, 3], [5, 1, 0, -1], [9, 9, 9, 9]],
               np.float32)
  s_a = np.array([2.5, 5.0, 0.0, 0.0], np.float32)
  correct = np.array([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
  anchor_ok = np.array([1, 1, 0, 1])
  valid = np.array([True, True, True, False])
  r = rerank_lib.gate_vs_oracle(s, s_a, correct, anchor_ok, valid, delta=0.0,
                                prior=0.5)
  assert r["pairs"] == 1.0 and r["fallback"] == pytest.approx(1 / 3)
  assert r["right_over_wrong"] == pytest.approx(2 / 3)
  assert r["wrong_over_right"] == pytest.approx(1 / 3)
  assert r["net"] == pytest.approx(1 / 3)
  assert r["pair_accuracy"] == pytest.approx(2 / 3)
  assert r["p_nonempty"] == pytest.approx(2 / 3)
  assert r["p_precision"] == pytest.approx(1 / 3)  # g0's 0; g2's 0 and 1
  # delta 2.5 lets g1's candidate 3 (right) in: 3 over 0, no fallback left.
  r = rerank_lib.gate_vs_oracle(s, s_a, correct, anchor_ok, valid, delta=2.5,
                                prior=0.5)
  assert r["fallback"] == 0.0 and r["right_over_wrong"] == pytest.approx(2 / 3)
  # The anchor-as-chosen baseline: the anchor over the worst everywhere; g2's
  # anchor is wrong and its worst (3) right.
  r = rerank_lib.gate_vs_oracle(s, s_a, correct, anchor_ok, valid, delta=None,
                                prior=0.5)
  assert r["fallback"] == 1.0 and r["net"] == pytest.approx(1 / 3)
  assert r["p_nonempty"] == 0.0 and np.isnan(r["p_precision"])
  # shift: best over worst of the scores alone: g0 0 over 3 (right over
  # wrong), g1 3 over 0 (right over wrong), g2 0 over 3 (wrong over right).
  r = rerank_lib.gate_vs_oracle(s, s_a, correct, anchor_ok, valid,
                                delta="shift", prior=0.5)
  assert r["fallback"] == 0.0 and r["net"] == pytest.approx(1 / 3)
  assert r["right_over_wrong"] == pytest.approx(2 / 3)


def test_gate_table_sweeps_delta_and_marks_the_best(tmp_path):
  # One group: candidates 0 and 2 right. s_a 4 sits above every candidate,
  # so delta 0 leaves P empty (anchor over the worst, 1: right over wrong,
  # net 1); delta >= 1 lets candidate 0 (3) in: 0 over 3, also right over
  # wrong. Either way net 1; the first (smallest) delta is marked best.
  store = rollout_store.RolloutStore(tmp_path)
  g = _group(b=2, k=4)
  _write(store, 1, g, correct=np.array([[1, 0, 1, 0], [0, 1, 0, 0]],
                                       np.float32))
  store.add_scores(1, "pmi", np.array([[3, 0, 2, 1], [1, 2, 3, 4]],
                                      np.float32),
                   np.array([4.0, 0.0], np.float32), overwrite=True)
  always_right = lambda answers: lambda b, text: 1.0  # noqa: E731
  rows = rerank_lib.gate_table(store, ["pmi"], [0.0, 1.0, 0.5],
                               make_verifier=always_right)
  assert [r["delta"] for r in rows] == [0.0, 1.0, 0.5, "shift", "anchor"]
  assert [r["best"] for r in rows] == [1, 0, 0, 0, 0]
  assert rows[0]["fallback"] == 1.0 and rows[1]["fallback"] == 0.0
  assert all(r["net"] == 1.0 and r["groups"] == 1 for r in rows)
  # deltas None: 0 and the deciles of the gaps s_a - s_k (1, 2, 3, 4).
  auto = rerank_lib.gate_table(store, ["pmi"], None, quantiles=2,
                               make_verifier=always_right)
  assert [r["delta"] for r in auto] == [0.0, 1.0, 2.5, 4.0, "shift", "anchor"]
  # Per K: k = K keeps every candidate (the same rows, now with k and
  # seed); k = 1 keeps one candidate of four: the one group's gate pair is
  # the anchor (right) over it, so never wrong over right.
  assert [r["k"] for r in rows] == [4] * 5 and rows[0]["seed"] == -1
  full = rerank_lib.gate_table(store, ["pmi"], [0.0, 1.0, 0.5], ks=[4],
                               seeds=[3], make_verifier=always_right)
  assert [(r["delta"], r["net"], r["k"], r["seed"]) for r in full] == [
      (r["delta"], r["net"], 4, 3) for r in rows]
  one = rerank_lib.gate_table(store, ["pmi"], [0.0], ks=[1], seeds=[0, 1],
                              make_verifier=always_right)
  assert [(r["k"], r["seed"]) for r in one] == [(1, 0)] * 3 + [(1, 1)] * 3
  assert all(r["wrong_over_right"] == 0.0 for r in one)
  store.add_scores(1, "similarity", np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match="anchor score of 'similarity'"):
    rerank_lib.gate_table(store, ["similarity"], [0.0])
