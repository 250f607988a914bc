"""purld_jax/ranking.py and self_scoring.py: hand-computed score functions,
template helpers, and every scheme end to end on a tiny random model through
`self_scoring.score_group` (and on SmolLM2, `slow`)."""

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

from purld_jax import preferences
from purld_jax import ranking
from purld_jax import scoring
from purld_jax import self_scoring
from purld_jax import templates
from tests.core_fixtures import tiny_model, tiny_tok  # noqa: F401

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)


# ----------------------------------------------------------------------------
# (b) pure score functions, by hand


@pytest.mark.parametrize("yes_ids, no_ids, expected", [
    ((0,), (1,), math.log(0.5 / 0.2)),  # log 2.5
    ((0, 3), (1,), math.log(0.6 / 0.2)),  # variants summed: 0.5 + 0.1
    ((2,), (1,), 0.0),  # p(Yes) = p(No)
])
def test_judge_hand(yes_ids, no_ids, expected):
  lp = jnp.log(jnp.array([[[0.5, 0.2, 0.2, 0.1]]]))  # [B=1, K=1, V=4]
  got = ranking.judge(lp, yes_ids=yes_ids, no_ids=no_ids)
  assert_allclose(got, [[expected]], rtol=1e-6, atol=1e-7)
  assert_allclose(ranking.self_reward(lp, yes_ids=yes_ids, no_ids=no_ids),
                  got)


def test_pmi_and_anchor_recon_hand():
  with_a = jnp.array([[[-9.0, -1.0, -1.0, -2.0], [-9.0, -9.0, -3.0, -1.0]]])
  plain = jnp.array([[[-5.0, -2.0, -2.0, -2.0], [-1.0, -1.0, -2.0, -2.0]]])
  target = jnp.array([[[0, 1, 1, 1], [0, 0, 0, 0]]], bool)
  # candidate 0: mean(-1 + 2, -1 + 2, -2 + 2) = 2 / 3; candidate 1 empty: 0
  assert_allclose(ranking.pmi(with_a, plain, target), [[2.0 / 3.0, 0.0]],
                  rtol=1e-6)
  # mean(-1, -1, -2) = -4 / 3
  assert_allclose(ranking.anchor_recon(with_a, target), [[-4.0 / 3.0, 0.0]],
                  rtol=1e-6)


def _pair_logits(z, bias):
  """l_ij = z_ij + bias: every row leans `bias` toward Response A."""
  z = jnp.asarray(z, jnp.float32)
  return (z + bias) * (1.0 - jnp.eye(z.shape[-1]))[None]


@pytest.mark.parametrize("bias", [0.0, 0.5, -2.0])
def test_pairwise_judge_two_members_hand(bias):
  # z_01 = 1 (0 beats 1 with p = sigmoid(1)); the bias cancels over orders
  l = _pair_logits([[[0.0, 1.0], [-1.0, 0.0]]], bias)
  wins = ranking.pairwise_judge(l, aggregation="win_count")
  s1 = 1.0 / (1.0 + math.exp(-1.0))  # 0.731059
  assert_allclose(wins, [[s1, 1.0 - s1]], rtol=1e-5)
  # Bradley-Terry MLE: pi_0 / pi_1 = p / (1 - p) = e -> log pi = +-1/2
  bt = ranking.pairwise_judge(l, bt_prior=0.0, iters=50)
  assert_allclose(bt, [[0.5, -0.5]], rtol=1e-4)


def test_pairwise_judge_recovers_consistent_strengths():
  # z_ij = u_i - u_j with u = (1, 0, -2): soft outcomes are the BT model's
  # own probabilities, so the MLE is u centred: (4/3, 1/3, -5/3)
  u = jnp.array([1.0, 0.0, -2.0])
  l = _pair_logits((u[:, None] - u[None, :])[None], 0.3)
  bt = ranking.pairwise_judge(l, bt_prior=0.0, iters=400)
  assert_allclose(bt, [[4 / 3, 1 / 3, -5 / 3]], atol=2e-3)
  # a masked third member: the two others as in the two-member case (z = 1)
  mask = jnp.array([[True, True, False]])
  bt = ranking.pairwise_judge(l, bt_prior=0.0, iters=50, candidate_mask=mask)
  assert_allclose(bt, [[0.5, -0.5, 0.0]], atol=1e-4)
  wins = ranking.pairwise_judge(l, aggregation="win_count",
                                candidate_mask=mask)
  s1 = 1.0 / (1.0 + math.exp(-1.0))
  assert_allclose(wins, [[s1, 1.0 - s1, 0.0]], rtol=1e-5)


def test_pair_design_by_hand():
  # K = 5, 2 opponents: i meets i - 1 and i + 1 (mod 5)
  i, j = templates.ordered_pairs(5, 2)
  assert list(zip(i.tolist(), j.tolist())) == [
      (0, 1), (0, 4), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2), (3, 4),
      (4, 0), (4, 3)]
  # K = 6, 4 opponents: offsets 1 and 2; the offset-3 pairs are left out
  d = templates.pair_design(6, 4)
  assert (d == d.T).all() and not d.diagonal().any()
  assert d.sum(1).tolist() == [4] * 6
  assert [int(x) for x in np.nonzero(~d[0])[0]] == [0, 3]
  # 0, or as many as K - 1 or more: every pair, in the old order
  full = (np.array([0, 0, 1, 1, 2, 2]), np.array([1, 2, 0, 2, 0, 1]))
  for opp in (0, 2, 4, 5):
    assert_array_equal(np.stack(templates.ordered_pairs(3, opp)),
                       np.stack(full))
  assert templates.pair_design(4, 3).sum() == 12  # odd but >= K - 1
  for bad in (-2, 3):
    with pytest.raises(ValueError, match="must be 0 .all pairs. or an even"):
      templates.pair_design(6, bad)


def test_pairwise_judge_sparse_design_by_hand():
  # K = 4 on a cycle (2 opponents): 0-1, 1-2, 2-3, 3-0 judged, 0-2 and 1-3
  # not (their logits are junk and must not count). Outcomes follow BT
  # with strengths u, so the MLE over the connected cycle is u centred.
  u = jnp.array([1.0, 0.0, -2.0, 0.5])
  design = templates.pair_design(4, 2)
  z = u[:, None] - u[None, :]
  junk = jnp.array([[0, 0, 9, 0], [0, 0, 0, -9], [-9, 0, 0, 0],
                    [0, 9, 0, 0]], jnp.float32)
  l = _pair_logits((z + junk)[None], 0.7)
  bt = ranking.pairwise_judge(l, bt_prior=0.0, iters=2000,
                              pair_mask=jnp.asarray(design))
  assert_allclose(bt, [u - u.mean()], atol=2e-3)
  # win counts over the two opponents each meets
  sg = lambda x: 1.0 / (1.0 + math.exp(-x))
  wins = ranking.pairwise_judge(l, aggregation="win_count",
                                pair_mask=jnp.asarray(design))
  assert_allclose(wins, [[sg(1.0) + sg(0.5), sg(-1.0) + sg(2.0),
                          sg(-2.0) + sg(-2.5), sg(2.5) + sg(-0.5)]],
                  rtol=1e-5)
  # pair_matrix puts a sparse design's rows where they belong, 0 elsewhere
  m = ranking.pair_matrix(jnp.arange(1.0, 9.0)[None], 4, 2)
  i, j = templates.ordered_pairs(4, 2)
  assert_array_equal(np.asarray(m)[0][i, j], np.arange(1.0, 9.0))
  assert not np.asarray(m)[0][~design].any()


@SETTINGS
@hypothesis.given(hnp.arrays(np.float32, (1, 4, 4), elements=st.floats(
    -4.0, 4.0, width=32)), st.permutations(range(4)))
def test_pairwise_judge_permutation_equivariant(l, perm):
  perm = np.asarray(perm)
  l = jnp.asarray(l)
  for agg in ranking.PAIRWISE_AGGREGATIONS:
    a = ranking.pairwise_judge(l, aggregation=agg)
    b = ranking.pairwise_judge(l[:, perm][:, :, perm], aggregation=agg)
    assert_allclose(b, a[:, perm], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("metric, expected", [
    # y = 1 2 2 3, a = 2 3 2: LCS 2 ("2 2" or "2 3"); 2 * 2 / (4 + 3)
    ("rouge_l", 4.0 / 7.0),
    # multiset overlap {2: min(2, 2), 3: min(1, 1)} = 3; 2 * 3 / (4 + 3)
    ("token_f1", 6.0 / 7.0),
])
def test_similarity_hand(metric, expected):
  # padding that equals anchor ids must not count
  y = jnp.array([[[1, 2, 2, 3, 2, 2], [2, 3, 2, 0, 0, 0],
                  [5, 5, 5, 5, 5, 5]]])
  ym = jnp.array([[[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0]]], bool)
  a = jnp.array([[2, 3, 2, 2]])
  am = jnp.array([[1, 1, 1, 0]], bool)
  got = ranking.similarity(y, ym, a, am, metric=metric)
  # the anchor itself scores 1; an empty candidate 0
  assert_allclose(got, [[expected, 1.0, 0.0]], rtol=1e-6)


def test_oracle_hand():
  gold = ["4", "Paris"]
  verifier = lambda b, text: float(text.strip() == gold[b])
  got = ranking.oracle([["4", " 4 ", "5"], ["Lyon", "Paris", ""]], verifier)
  assert_array_equal(got, [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
  assert got.dtype == np.float32


# ----------------------------------------------------------------------------
# (a) host-side helpers


def test_small_helpers():
  assert templates.cut_at_stop([5, 6, 3, 7], (3,)) == [5, 6]
  assert templates.cut_at_stop([5, 6], (3,)) == [5, 6]
  lists = templates.candidate_lists(np.array([[[5, 6, 0], [7, 0, 0]]]),
                                  np.array([[[1, 1, 0], [1, 0, 0]]], bool))
  assert lists == [[[5, 6], [7]]]
  i, j = templates.ordered_pairs(3)
  assert list(zip(i.tolist(), j.tolist())) == [
      (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
  m = ranking.pair_matrix(jnp.arange(1.0, 7.0)[None], 3)
  assert_allclose(m, [[[0, 1, 2], [3, 0, 4], [5, 6, 0]]])


PROMPTS = [[{"role": "user", "content": "what is two + two ?"}],
           [{"role": "system", "content": "be good"},
            {"role": "user", "content": "the cat sat on the mat ?"}]]
ANCHORS = ["four", "the cat sat on the mat"]
CAND_TEXTS = [["four", "five", "two + two"], ["the dog sat", "cat", "mat"]]


def _cands(tok):
  return [[tok.encode(t) for t in g] for g in CAND_TEXTS]


def test_answer_token_ids(tiny_tok):
  assert templates.answer_token_ids(tiny_tok, "Yes") == tuple(
      tiny_tok.encode("Yes"))
  with pytest.raises(ValueError):
    templates.answer_token_ids(tiny_tok, "two two")


def test_judge_batch_layout(tiny_tok):
  tok = tiny_tok
  batch = templates.judge_batch(tok, PROMPTS, ANCHORS, _cands(tok),
                              pad_multiple=16)
  r, t = batch.tokens.shape
  assert r == 2 * 3 and t % 16 == 0
  assert not batch.target_mask.any()
  # every row ends with the generation prompt, the answer slot follows it
  gen = tok.encode_chat([{"role": "user", "content": "x"}])[-2:]
  assert_array_equal(batch.tokens[:, -2:], np.tile(gen, (r, 1)))
  assert batch.attention_mask[:, -1].all()
  row = tok.decode(batch.tokens[4][batch.attention_mask[4]])
  assert "the cat sat on the mat" in row and "cat" in row  # anchor, candidate


def test_pmi_batches_targets_are_the_candidate(tiny_tok):
  tok = tiny_tok
  cands = _cands(tok)
  cands[0][1] = cands[0][1] + [tok.stop_ids[0], 9, 9]  # cut at the stop id
  with_a, plain = templates.pmi_batches(tok, PROMPTS, ANCHORS, cands)
  assert with_a.tokens.shape == plain.tokens.shape
  assert_array_equal(with_a.target_mask, plain.target_mask)
  for r, ids in enumerate(y for g in _cands(tok) for y in g):
    assert with_a.tokens[r][with_a.target_mask[r]].tolist() == ids
    assert plain.tokens[r][plain.target_mask[r]].tolist() == ids
  # only the with-anchor context holds the anchor ("four" in prompt 0)
  four = tok.encode("four")[0]
  assert (with_a.tokens[0] == four).sum() == 2  # anchor + candidate "four"
  assert (plain.tokens[0] == four).sum() == 1


def test_recon_and_pairwise_batches(tiny_tok):
  tok = tiny_tok
  batch = templates.recon_batch(tok, PROMPTS, ANCHORS, _cands(tok))
  for r in range(6):
    assert batch.tokens[r][batch.target_mask[r]].tolist() == tok.encode(
        ANCHORS[r // 3])
  pairs = templates.pairwise_batch(tok, PROMPTS, ANCHORS, _cands(tok))
  assert pairs.tokens.shape[0] == 2 * 3 * 2  # B K (K - 1)
  # K = 3 members with 2 opponents each is every pair again
  assert templates.pairwise_batch(tok, PROMPTS, ANCHORS, _cands(tok),
                                  opponents=2).tokens.shape[0] == 12


def test_pairwise_judge_sparse_design_equals_the_full_rows_masked(
    tiny_model, tiny_tok):
  """pair_opponents = 2 with the anchor (M = 4 members): 8 judge rows per
  prompt, not 12, and the scores are the full design's pair logits with
  the two left-out pairs masked, through the same Bradley-Terry fit."""
  tok, model = tiny_tok, tiny_model
  groups = [g + [tok.encode(a)] for g, a in zip(_cands(tok), ANCHORS)]
  full = templates.pairwise_batch(tok, PROMPTS, ANCHORS, groups)
  assert full.tokens.shape[0] == 2 * 4 * 3
  sparse = templates.pairwise_batch(tok, PROMPTS, ANCHORS, groups,
                                    opponents=2)
  assert sparse.tokens.shape[0] == 2 * 4 * 2
  lp = np.asarray(self_scoring.model_scorers(model).last_logps(
      jnp.asarray(full.tokens), jnp.asarray(full.attention_mask)))
  yes = templates.answer_token_ids(tok, "Yes")
  no = templates.answer_token_ids(tok, "No")
  l = ranking.pair_matrix(ranking.judge(jnp.asarray(lp).reshape(2, 12, -1),
                                        yes_ids=yes, no_ids=no), 4)
  design = jnp.asarray(templates.pair_design(4, 2))
  want = np.asarray(ranking.pairwise_judge(l, pair_mask=design))
  s, s_a = _score(model, tok, "pairwise_judge", pair_opponents=2)
  assert_allclose(s, want[:, :3], atol=1e-4)
  assert_allclose(s_a, want[:, 3], atol=1e-4)
  # and it differs from the full design (the left-out pairs mattered)
  s_full, _ = _score(model, tok, "pairwise_judge")
  assert np.abs(s - s_full).max() > 1e-4


# ----------------------------------------------------------------------------
# (c) end to end on a tiny random model


_CACHE = {}


def _score(model, tok, scheme, cands=None, **kw):
  """score_group on PROMPTS / ANCHORS; the default candidates' scores are
  computed once per (scheme, knobs) and shared by the tests below."""
  key = (id(model), scheme, tuple(sorted(kw.items())))
  if cands is None and key in _CACHE:
    return _CACHE[key]
  if scheme == "oracle":
    kw["verifier"] = lambda b, text: float(text == ANCHORS[b])
  out = self_scoring.score_group(model, tok, PROMPTS, ANCHORS,
                                 _cands(tok) if cands is None else cands,
                                 scheme=scheme, rows_per_call=8, **kw)
  if cands is None:
    _CACHE[key] = out
  return out


# teacher_judge asks the teacher, not the student (tests/test_teacher_judge.py).
@pytest.mark.parametrize(
    "scheme", [s for s in ranking.SCHEMES if s != "teacher_judge"])
def test_every_scheme_runs_end_to_end(tiny_model, tiny_tok, scheme):
  s, s_a = _score(tiny_model, tiny_tok, scheme)
  assert s.shape == (2, 3) and s.dtype == np.float32
  assert s_a.shape == (2,)
  assert np.isfinite(s).all() and np.isfinite(s_a).all()
  if scheme in ("similarity", "oracle"):
    assert_allclose(s_a, 1.0)  # the anchor matches itself
  if scheme == "similarity":
    # "four" is prompt 0's anchor; "the dog sat" vs "the cat sat on the mat":
    # LCS "the sat" = 2, rouge-L F = 2 * 2 / (3 + 6)
    assert_allclose(s[:, 0], [1.0, 4.0 / 9.0], rtol=1e-6)
  if scheme == "oracle":
    assert_allclose(s[:, 0], [1.0, 0.0])


@pytest.mark.parametrize("scheme", ["judge", "pmi", "anchor_recon"])
def test_scores_ignore_padding_and_other_candidates(tiny_model, tiny_tok,
                                                    scheme):
  tok = tiny_tok
  base, base_a = _score(tiny_model, tok, scheme)
  # more left padding and other row chunks: the same scores
  wide, wide_a = _score(tiny_model, tok, scheme, pad_multiple=64)
  assert_allclose(wide, base, atol=1e-5)
  assert_allclose(wide_a, base_a, atol=1e-5)
  # tokens after a stop id are outside the scored region
  cands = _cands(tok)
  cands[1][2] = cands[1][2] + [tok.stop_ids[0]] + tok.encode("dog dog")
  tail, _ = _score(tiny_model, tok, scheme, cands=cands)
  assert_allclose(tail, base, atol=1e-5)
  # changing candidate (1, 2) changes its score only
  cands[1][2] = tok.encode("two two two")
  other, _ = _score(tiny_model, tok, scheme, cands=cands)
  keep = np.ones((2, 3), bool)
  keep[1, 2] = False
  assert_allclose(other[keep], base[keep], atol=1e-5)
  assert abs(other[1, 2] - base[1, 2]) > 1e-6


def _unpadded(model, rows):
  """Token log-probs of each row as if alone: rows are right-padded (causal
  attention: what follows a token never changes it) into one call; a
  different layout from score_group's left padding."""
  t = max(len(r) for r in rows)
  x = jnp.asarray([r + [0] * (t - len(r)) for r in rows], jnp.int32)
  lp = np.asarray(scoring.jitted_token_logps(model, x, jnp.ones(x.shape,
                                                                bool)))
  return [lp[i, :len(r)] for i, r in enumerate(rows)]


def test_schemes_equal_a_direct_unpadded_computation(tiny_model, tiny_tok):
  tok, model = tiny_tok, tiny_model
  b, k = 1, 2  # candidate "mat" of prompt 1
  y, anchor, msgs = _cands(tok)[b][k], ANCHORS[b], PROMPTS[b]
  a = tok.encode(anchor)
  recon_ctx = tok.encode_chat([msgs[0], {"role": "user", "content":
                                         templates.RECON_TEMPLATE.format(
                                             prompt=msgs[1]["content"],
                                             draft="mat")}])
  pmi_ctx = tok.encode_chat([msgs[0], {"role": "user", "content":
                                       templates.PMI_TEMPLATE.format(
                                           prompt=msgs[1]["content"],
                                           reference=anchor)}])
  judge_ctx = tok.encode_chat([{"role": "user", "content":
                                templates.JUDGE_TEMPLATE.format(
                                    prompt=templates.prompt_text(msgs),
                                    reference=anchor, response="mat")}])
  yes, no = tok.encode("Yes")[0], tok.encode("No")[0]
  recon, with_a, plain, p_yes, p_no = _unpadded(model, [
      recon_ctx + a, pmi_ctx + y, tok.encode_chat(msgs) + y,
      judge_ctx + [yes], judge_ctx + [no]])
  # anchor_recon: mean log p of the anchor's tokens after the draft context
  assert_allclose(_score(model, tok, "anchor_recon")[0][b, k],
                  recon[-len(a):].mean(), atol=1e-5)
  # pmi: with-anchor minus plain log-probs of the candidate's tokens
  assert_allclose(_score(model, tok, "pmi")[0][b, k],
                  (with_a[-len(y):] - plain[-len(y):]).mean(), atol=1e-5)
  # judge: log p(Yes) - log p(No) after the judge conversation
  assert_allclose(_score(model, tok, "judge")[0][b, k],
                  p_yes[-1] - p_no[-1], atol=1e-5)


def test_share_prefixes_by_hand():
  # Two groups of two left-padded rows (pad 0); the last token of each row
  # is a target.
  rows = [[5, 6, 7, 8], [5, 6, 9], [3, 4], [3, 4, 4, 1]]
  batch = templates.finish_rows(rows, [1, 1, 1, 1], 0, 1)
  sh = self_scoring.share_prefixes(batch, 2, pad_id=0, pad_multiple=2)
  # Group 0 shares [5, 6]; group 1 shares [3] only: [3, 4] must keep its
  # target 4 in its suffix.
  np.testing.assert_array_equal(sh.prefix, [[5, 6], [0, 3]])
  np.testing.assert_array_equal(sh.prefix_mask, [[1, 1], [0, 1]])
  np.testing.assert_array_equal(sh.suffix, [[[7, 8, 0, 0], [9, 0, 0, 0]],
                                            [[4, 0, 0, 0], [4, 4, 1, 0]]])
  assert sh.suffix_mask.sum() == 2 + 1 + 1 + 3
  # A group whose rows differ at the first token cannot share: None.
  rows = templates.finish_rows([[1, 2], [3, 2]], [1, 1], 0, 1)
  assert self_scoring.share_prefixes(rows, 2, pad_id=0,
                                     pad_multiple=1) is None


def test_shared_prefix_logps_equal_full_rows(tiny_model):
  rows = [[5, 6, 7, 8, 9], [5, 6, 9], [3, 4, 2], [3, 4, 4, 1, 7, 7]]
  batch = templates.finish_rows(rows, [2, 1, 1, 3], 0, 8)
  want = np.asarray(scoring.jitted_token_logps(
      tiny_model, jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)))
  scorers = self_scoring.model_scorers(tiny_model)
  got = self_scoring._token_logps(scorers, batch, 2, rows_per_call=2,
                                  pad_id=0, pad_multiple=4)
  np.testing.assert_allclose(got[batch.target_mask], want[batch.target_mask],
                             atol=1e-5)
  want_last = np.asarray(scoring.jitted_last_logps(
      tiny_model, jnp.asarray(batch.tokens), jnp.asarray(batch.attention_mask)))
  got_last = self_scoring._answer_logps(scorers, batch, 2, rows_per_call=2,
                                        pad_id=0, pad_multiple=4)
  np.testing.assert_allclose(got_last, want_last, atol=1e-5)


def test_score_group_without_anchor_and_bad_scheme(tiny_model, tiny_tok):
  s, s_a = _score(tiny_model, tiny_tok, "pmi", score_anchor=False)
  assert s.shape == (2, 3) and s_a is None
  with pytest.raises(ValueError):
    _score(tiny_model, tiny_tok, "telepathy")


# ----------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct: a documented example


@pytest.mark.slow
def test_smollm2_documented_example():
  """Capital of France, anchor "The capital of France is Paris."

  Candidates: a paraphrase of the anchor, the anchor verbatim, a wrong city,
  an unrelated sentence. Asserted: finite scores; the verbatim candidate
  scores exactly like the anchor member (same rows, so s_1 = s_a, for
  pairwise_judge by symmetry); similarity by hand on SmolLM2's tokens. The
  score table is printed (run with -s); its values are the model's and are
  not asserted.
  """
  from purld_jax import models
  from purld_jax.models import embedded
  model, tok = models.load_pretrained(embedded.ensure_converted())
  prompts = [[{"role": "user",
               "content": "What is the capital of France?"}]]
  anchors = ["The capital of France is Paris."]
  texts = ["Paris is the capital of France.",
           "The capital of France is Paris.",
           "The capital of France is Lyon.",
           "I like turtles."]
  cands = [[tok.encode(t) + [tok.stop_ids[0]] for t in texts]]
  out = {}
  for scheme in ("judge", "pmi", "anchor_recon", "self_reward",
                 "pairwise_judge", "similarity"):
    s, s_a = self_scoring.score_group(model, tok, prompts, anchors, cands,
                                      scheme=scheme, rows_per_call=4)
    assert np.isfinite(s).all() and np.isfinite(s_a).all()
    assert_allclose(s[0, 1], s_a[0], atol=1e-4)
    out[scheme] = s[0]
    print(f"{scheme:>15}: " + "  ".join(f"{v:+.3f}" for v in s[0])
          + f"  | anchor {s_a[0]:+.3f}")
  # tokens: anchor "The| capital| of| France| is| Paris|." (7); paraphrase
  # "Paris| is| the| capital| of| France|." (7): LCS " capital of France ."
  # = 4 -> 2 * 4 / 14; Lyon: LCS 6 of 7 -> 12 / 14; "I| like| turtles|."
  # (4): LCS "." = 1 -> 2 / 11
  assert [len(tok.encode(t)) for t in texts] == [7, 7, 7, 4]
  assert_allclose(out["similarity"], [8 / 14, 1.0, 12 / 14, 2 / 11],
                  rtol=1e-6)


def test_pmi_stop_scores_the_stop_token(tiny_model, tiny_tok):
  tok, model = tiny_tok, tiny_model
  stop = tok.stop_ids[0]
  b, msgs, anchor = 1, PROMPTS[1], ANCHORS[1]
  y = tok.encode("mat")
  cands = _cands(tok)
  cands[b][0] = y + [stop] + tok.encode("dog")  # finished: "mat" + stop
  cands[b][1] = [stop]                           # empty
  cands[b][2] = list(y)                          # unfinished: no stop
  pmi_ctx = tok.encode_chat([msgs[0], {"role": "user", "content":
                                       templates.PMI_TEMPLATE.format(
                                           prompt=msgs[1]["content"],
                                           reference=anchor)}])
  plain_ctx = tok.encode_chat(msgs)
  a = tok.encode(anchor) + [stop]
  wa_y, pl_y, wa_e, pl_e, wa_a, pl_a = _unpadded(model, [
      pmi_ctx + y + [stop], plain_ctx + y + [stop], pmi_ctx + [stop],
      plain_ctx + [stop], pmi_ctx + a, plain_ctx + a])
  s, s_a = _score(model, tok, "pmi", cands=cands, pmi_stop=True)
  n = len(y) + 1
  assert_allclose(s[b, 0], (wa_y[-n:] - pl_y[-n:]).mean(), atol=1e-5)
  assert_allclose(s[b, 1], wa_e[-1] - pl_e[-1], atol=1e-5)
  assert abs(s[b, 1]) > 1e-4   # the empty candidate is scored, not 0
  assert_allclose(s_a[b], (wa_a[-len(a):] - pl_a[-len(a):]).mean(), atol=1e-5)
  # The unfinished candidate has no stop to score: as without the knob.
  off, _ = _score(model, tok, "pmi", cands=cands)
  assert_allclose(s[b, 2], off[b, 2], atol=1e-5)
  assert off[b, 1] == 0.0 and abs(s[b, 0] - off[b, 0]) > 1e-6


def test_through_stop():
  assert templates.through_stop([5, 6, 2, 7], (2, 3)) == [5, 6, 2]
  assert templates.through_stop([3, 9], (2, 3)) == [3]
  assert templates.through_stop([5, 6], (2, 3)) == [5, 6]


def test_config_ranking_pmi_stop_reaches_the_scorer_params():
  from configs import demo  # pylint: disable=g-import-not-at-top
  from purld_jax.train import pu_rl  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  assert pu_rl.ranking_params(c).pmi_stop is False  # METHOD.md's default
  c.ranking.pmi_stop = True
  assert pu_rl.ranking_params(c).pmi_stop is True


def test_length_debias_by_hand():
  # Group 0: lengths (2, 4) around 3, scores (1, 3) around 2: one point of
  # score per token. Group 1 has one length: it says nothing about the
  # slope. beta = (-1 * -1 + 1 * 1) / (1 + 1) = 1.
  s = np.array([[1.0, 3.0], [0.0, 7.0]])
  n = np.array([[2, 4], [5, 5]])
  out, s_a, beta = ranking.length_debias(
      s, n, anchor_score=np.array([5.0, 1.0]), anchor_length=np.array([3, 9]))
  assert beta == 1.0
  np.testing.assert_allclose(out, [[2.0, 2.0], [0.0, 7.0]])  # a tie; as was
  # The anchor moves by the same line from its group's mean length:
  # 5 - 1 * (3 - 3) = 5; 1 - 1 * (9 - 5) = -3.
  np.testing.assert_allclose(s_a, [5.0, -3.0])


def test_length_debias_pools_the_slope_and_skips_filler_rows():
  # Group 0: dn = (-1, 1), ds = (-2, 2) (slope 2); group 1: dn = (-2, 2),
  # ds = (2, -2) (slope -1 over a spread twice as wide).
  # Pooled: beta = (2 + 2 - 4 - 4) / (1 + 1 + 4 + 4) = -0.4.
  s = np.array([[0.0, 4.0], [3.0, -1.0]])
  n = np.array([[1, 3], [2, 6]])
  out, s_a, beta = ranking.length_debias(s, n)
  assert s_a is None
  np.testing.assert_allclose(beta, -4.0 / 10.0)
  np.testing.assert_allclose(out[0], [0.0 - 0.4, 4.0 + 0.4], rtol=1e-6)
  # A filler row neither feeds the slope nor moves.
  out, _, beta = ranking.length_debias(s, n, np.array([True, False]))
  assert beta == 2.0
  np.testing.assert_allclose(out, [[2.0, 2.0], [3.0, -1.0]])


def test_length_debias_edge_cases():
  s = np.array([[1.0, 2.0, 3.0]])
  out, _, beta = ranking.length_debias(s, np.array([[4, 4, 4]]))
  assert beta == 0.0  # no spread of lengths: nothing to remove
  np.testing.assert_array_equal(out, s)
  # Scores exactly linear in length plus a per-prompt offset: all removed.
  n = np.array([[1, 5, 9], [2, 3, 10]])
  out, _, beta = ranking.length_debias(0.5 * n + np.array([[7.0], [-3.0]]), n)
  np.testing.assert_allclose(beta, 0.5)
  np.testing.assert_allclose(out - out.mean(1, keepdims=True), 0.0,
                             atol=1e-6)
  with pytest.raises(ValueError, match="same"):
    ranking.length_debias(s, np.array([4, 4, 4]))
  with pytest.raises(ValueError, match="anchor_length"):
    ranking.length_debias(s, np.array([[1, 2, 3]]), anchor_score=np.ones(1))


def test_config_ranking_length_debias_reaches_the_scorer_params():
  from configs import demo  # pylint: disable=g-import-not-at-top
  from purld_jax.train import pu_rl  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  assert pu_rl.ranking_params(c).length_debias is False  # METHOD.md's
  c.ranking.length_debias = True
  assert pu_rl.ranking_params(c).length_debias is True


def test_gate_passes_by_hand():
  texts = [["No", "It is 12.", "I don't know", "-3"],
           ["Dear Sam,", "No", "", "1,000 words"]]
  # Prompt 0's anchor holds a number: candidates without one fail. Prompt
  # 1's anchor holds none: the gate cannot tell, every candidate passes.
  passed = ranking.gate_passes(texts, ["The answer is 12", "Hi Sam!"],
                               gate="number")
  np.testing.assert_array_equal(passed, [[False, True, False, True],
                                         [True, True, True, True]])
  assert ranking.gate_passes(texts, ["12", "3"], gate="none").all()
  with pytest.raises(ValueError, match="gate"):
    ranking.gate_passes(texts, ["12", "3"], gate="digits")
  with pytest.raises(ValueError, match="2 candidate groups for 1 anchors"):
    ranking.gate_passes(texts, ["12"], gate="number")


def test_answer_gate_by_hand():
  # Group 0: "No" (k = 0) scored best by the judge fails the gate. The floor
  # is min(s_a = 0.5, passing scores 1.0, -2.0) = -2.0; with margin 1 the
  # failed candidates sit at -3.0, tied.
  s = np.array([[5.0, 1.0, 4.0, -2.0],
                [3.0, 2.0, 1.0, 0.0],
                [1.0, 2.0, 3.0, 4.0]])
  passed = np.array([[False, True, False, True],
                     [True, True, True, True],
                     [False, False, False, False]])
  s_a = np.array([0.5, 9.0, -1.0])
  out = ranking.answer_gate(s, passed, s_a, margin=1.0)
  np.testing.assert_allclose(out[0], [-3.0, 1.0, -3.0, -2.0])
  np.testing.assert_allclose(out[1], s[1])  # all pass: unchanged
  # All fail: all at s_a - margin, tied (no DPO pair, zero advantages).
  np.testing.assert_allclose(out[2], [-2.0] * 4)
  assert out.dtype == np.float32
  # The anchor is the floor when it scores below every passing candidate.
  out = ranking.answer_gate(np.array([[2.0, 7.0]]), np.array([[True, False]]),
                            np.array([-4.0]), margin=0.5)
  np.testing.assert_allclose(out, [[2.0, -4.5]])
  # The losses then reject the failed candidate: best vs worst picks it.
  pairs = preferences.best_vs_worst(jnp.asarray(
      ranking.answer_gate(s, passed, s_a)))
  np.testing.assert_array_equal(np.asarray(pairs.chosen)[:2, 0], [1, 0])
  assert int(pairs.rejected[0, 0]) in (0, 2)
  assert int(pairs.rejected[1, 0]) == 3
  assert list(np.asarray(pairs.mask)[:, 0]) == [True, True, False]


def test_answer_gate_skips_filler_rows_and_checks_its_arguments():
  s = np.array([[5.0, 1.0], [5.0, 1.0]])
  passed = np.array([[False, True], [False, True]])
  out = ranking.answer_gate(s, passed, np.zeros(2), np.array([True, False]))
  np.testing.assert_allclose(out, [[-1.0, 1.0], [5.0, 1.0]])
  with pytest.raises(ValueError, match="same"):
    ranking.answer_gate(s, passed[0], np.zeros(2))
  with pytest.raises(ValueError, match="margin"):
    ranking.answer_gate(s, passed, np.zeros(2), margin=0.0)


def test_config_ranking_gate_reaches_the_scorer_params_and_is_checked():
  from configs import demo  # pylint: disable=g-import-not-at-top
  from purld_jax import main  # pylint: disable=g-import-not-at-top
  from purld_jax.train import pu_rl  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  assert pu_rl.ranking_params(c).gate == "none"  # METHOD.md's
  c.ranking.gate, c.ranking.gate_margin = "number", 2.0
  rp = pu_rl.ranking_params(c)
  assert (rp.gate, rp.gate_margin) == ("number", 2.0)
  c.ranking.gate, c.ranking.gate_margin = "digits", 0.0
  with pytest.raises(main.ConfigError) as e:
    main.validate(c)
  assert "ranking.gate='digits': not one of ['none', 'number']" in str(e.value)
  assert "ranking.gate_margin=0.0: must be > 0" in str(e.value)


def test_config_ranking_pair_opponents_reaches_the_scorer_and_is_checked():
  from configs import demo  # pylint: disable=g-import-not-at-top
  from purld_jax import main  # pylint: disable=g-import-not-at-top
  from purld_jax.train import pu_rl  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  assert pu_rl.ranking_params(c).pair_opponents == 0  # METHOD.md's
  c.ranking.pair_opponents = 4
  assert pu_rl.ranking_params(c).pair_opponents == 4
  main.validate(c)
  c.ranking.pair_opponents = 3
  with pytest.raises(main.ConfigError) as e:
    main.validate(c)
  assert "ranking.pair_opponents=3: must be 0 (every pair) or an even" in str(
      e.value)


def test_template_problems_by_hand():
  defaults = {"judge": templates.JUDGE_TEMPLATE,
              "self_reward": templates.SELF_REWARD_TEMPLATE,
              "pairwise_judge": templates.PAIRWISE_TEMPLATE,
              "pmi": templates.PMI_TEMPLATE,
              "anchor_recon": templates.RECON_TEMPLATE}
  for scheme, text in defaults.items():
    assert templates.template_problems(scheme, text) == [], scheme
  assert templates.template_problems("pairwise_judge", "{response_a}") == [
      "no {response_b}: scheme 'pairwise_judge' would never show it (takes "
      "{prompt}, {reference}, {response_a}, {response_b})"]
  # pmi is filled with the prompt and the anchor only: a {response} is not.
  assert templates.template_problems("pmi", "{prompt} {reference} {response}"
                                     ) == ["unknown placeholder {response}; "
                                           "scheme 'pmi' takes {prompt}, "
                                           "{reference}"]
  assert templates.template_problems("judge", "{response} {0}") == [
      "unknown placeholder {0}; scheme 'judge' takes {prompt}, {reference}, "
      "{response}"]
  assert templates.template_problems("judge", "{response} {{literal}}") == []
  assert templates.template_problems("similarity", "{anything") == []
