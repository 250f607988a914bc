"""Pairwise win rate: verdicts, both orders, the judgement cache, LC fit."""

import dataclasses
import re

import numpy as np
import pytest
from numpy.testing import assert_allclose

from purld_jax import evaluate
from purld_jax import prompts as prompts_lib
from purld_jax import teacher as teacher_lib
from purld_jax import teacher_wire
from purld_jax import verdicts
from purld_jax import winrate
from tests import fault_server as fault_server_lib

N = 6
PROMPTS = [prompts_lib.Prompt.from_text(f"question {i}", id=f"q{i}")
           for i in range(N)]
MODEL = [f"MODEL answer {i}" for i in range(N)]
REFERENCE = [f"reference answer {i}" for i in range(N)]


def shown(messages):
  """(answer A, answer B) as the judge sees them in `verdicts.TEMPLATE`."""
  user = messages[-1]["content"]
  a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", user, re.S).group(1)
  b = re.search(r"\[Answer B\]\n(.*?)\n\nWhich answer", user, re.S).group(1)
  return a, b


class Counting:
  """A judge function that counts its calls."""

  def __init__(self, fn):
    self.fn, self.calls = fn, 0

  def __call__(self, messages):
    self.calls += 1
    return self.fn(messages)


def prefers_model(messages):
  a, _ = shown(messages)
  return "Verdict: A" if a.startswith("MODEL") else "Verdict: B"


def run(tmp_path, fn, *, model_name="judge", **kw):
  store = winrate.open_store(tmp_path, winrate.CallableJudge(
      fn, model=model_name))
  try:
    return winrate.winrate(store, PROMPTS, MODEL, REFERENCE, samples=200, **kw)
  finally:
    store.close()


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize("text, want", [
    ("Verdict: A", "A"),
    ("verdict: b", "B"),
    ("**Verdict:** tie", "tie"),
    ("A is longer. Verdict: B", "B"),
    ("Verdict: A\n...on reflection, Verdict: B", "B"),   # the last one wins
    ("[[A]]", "A"),
    ("Answer B.", "B"),
    ("Tie", "tie"),
    ("Both are fine.", None),
    ("A or B, hard to say", None),
    ("", None),
])
def test_parse_verdict(text, want):
  assert verdicts.parse_verdict(text) == want


@pytest.mark.parametrize("model_first, reference_first, want", [
    ("A", "B", 1.0),      # model preferred in both orders
    ("B", "A", 0.0),      # reference preferred in both orders
    ("tie", "tie", 0.5),
    ("A", "A", 0.5),      # position bias: win then loss -> disagree -> tie
    ("B", "B", 0.5),
    ("A", "tie", 0.5),    # win then tie: disagree -> tie
])
def test_pair_outcome_from_both_orders(model_first, reference_first, want):
  got = verdicts.pair_outcomes([model_first], [reference_first])
  assert got.tolist() == [want]


def test_pair_with_an_unparseable_verdict_is_excluded_or_a_tie():
  assert np.isnan(verdicts.pair_outcomes([None], ["B"])).all()
  assert verdicts.pair_outcomes(["A"], [None], unparseable="tie").tolist() == [0.5]
  with pytest.raises(ValueError):
    verdicts.pair_outcomes(["A"], ["B"], unparseable="drop")


def test_judge_messages_put_a_first():
  msgs = verdicts.judge_messages(PROMPTS[0], "first", "second")
  assert msgs[0] == ("system", verdicts.SYSTEM)
  role, user = msgs[1]
  assert role == "user" and user.index("first") < user.index("second")
  assert shown([{"content": user}]) == ("first", "second")
  assert "question 0" in user


# ---------------------------------------------------------------- evaluations


def test_known_win(tmp_path):
  w = run(tmp_path, prefers_model)
  assert (w.wins, w.ties, w.losses, w.judged) == (N, 0, 0, N)
  assert w.win_rate == 1.0 and w.win_rate_ci == (1.0, 1.0)
  assert w.lc_win_rate == 1.0
  assert w.verdicts == (("A", "B"),) * N


def test_known_loss(tmp_path):
  w = run(tmp_path, lambda m: "Verdict: B" if shown(m)[0].startswith("MODEL")
          else "Verdict: A")
  assert (w.wins, w.losses, w.win_rate, w.lc_win_rate) == (0, N, 0.0, 0.0)


def test_known_tie(tmp_path):
  w = run(tmp_path, lambda m: "Verdict: tie")
  assert (w.ties, w.disagreements, w.judged) == (N, 0, N)
  # All targets 0.5: the fit's intercept is logit(0.5) = 0, sigmoid(0) = 0.5.
  assert w.win_rate == 0.5 and w.lc_win_rate == pytest.approx(0.5, abs=1e-9)


def test_position_bias_cancels(tmp_path):
  # Always "A": the model wins when first and loses when second -> ties.
  w = run(tmp_path, lambda m: "Verdict: A")
  assert (w.ties, w.disagreements, w.win_rate) == (N, N, 0.5)


def test_unparseable_verdicts_are_counted(tmp_path):
  # q0 and q1 get a reply without a verdict in the reference-first order.
  def fn(messages):
    a, _ = shown(messages)
    if a.startswith("reference answer") and a[-1] in "01":
      return "I cannot decide."
    return prefers_model(messages)
  w = run(tmp_path / "exclude", fn)
  assert (w.unparseable, w.judged, w.pairs, w.wins) == (2, N - 2, N, N - 2)
  assert np.isnan(w.outcomes[:2]).all() and w.win_rate == 1.0
  w = run(tmp_path / "tie", fn, unparseable="tie")
  assert (w.unparseable, w.judged, w.wins, w.ties) == (2, N, N - 2, 2)
  assert w.win_rate == pytest.approx((N - 2 + 2 * 0.5) / N)   # 5/6


def test_second_evaluation_makes_no_judge_call(tmp_path):
  judge = Counting(prefers_model)
  first = run(tmp_path, judge)
  assert judge.calls == 2 * N
  assert (first.judgements, first.cached, first.judge_calls) == (2 * N, 0, 2 * N)
  second = run(tmp_path, judge)
  assert judge.calls == 2 * N                     # none more
  assert (second.cached, second.judge_calls) == (2 * N, 0)
  assert second.summary()["judge_calls_per_prompt"] == 0.0
  assert second.verdicts == first.verdicts
  # Another judge model is another key: asked again.
  run(tmp_path, judge, model_name="judge-2")
  assert judge.calls == 4 * N


def test_a_failed_judgement_is_asked_again_on_resume(tmp_path):
  def flaky(messages):
    if "question 3" in messages[-1]["content"]:
      raise teacher_wire.TeacherError("down", kind="server_error")
    return prefers_model(messages)
  w = run(tmp_path, flaky)
  assert (w.failed, w.judged, w.unparseable) == (2, N - 1, 0)
  judge = Counting(prefers_model)
  w = run(tmp_path, judge)
  assert judge.calls == 2                          # q3's two orders only
  assert (w.failed, w.judged, w.cached, w.win_rate) == (0, N, 2 * N - 2, 1.0)


def test_identical_answers_are_one_judgement(tmp_path):
  judge = Counting(lambda m: "Verdict: A")
  store = winrate.open_store(tmp_path, winrate.CallableJudge(judge))
  try:
    w = winrate.winrate(store, PROMPTS[:1], ["same"], ["same"], samples=50)
  finally:
    store.close()
  # One request (both orders render the same), its "A" read in both orders
  # (win then loss): a tie.
  assert (judge.calls, w.judgements, w.win_rate) == (1, 1, 0.5)


def test_a_simulated_judge_is_refused(tmp_path):
  dataset = teacher_lib.make(teacher_lib.TeacherConfig(backend="dataset"))
  with pytest.raises(teacher_lib.ConfigError, match="simulated"):
    winrate.open_store(tmp_path, dataset)


def test_through_a_real_openai_compatible_server(tmp_path, monkeypatch):
  # The fault server answers every request "Verdict: A" (position bias):
  # every pair is a tie; one injected 503 is retried and counted as a call.
  monkeypatch.setattr(fault_server_lib, "answer_for", lambda _: "Verdict: A")
  with fault_server_lib.FaultServer() as server:
    server.push(("status", 503, {}))
    cfg = teacher_lib.TeacherConfig(
        base_url=server.base_url, model="judge", api_key_env="",
        max_tokens=16, backoff_base_s=0.01, max_concurrency=2)
    store = winrate.open_store(tmp_path, teacher_lib.make(cfg))
    try:
      w = winrate.winrate(store, PROMPTS, MODEL, REFERENCE, samples=50)
      again = winrate.winrate(store, PROMPTS, MODEL, REFERENCE, samples=50)
    finally:
      store.close()
    assert server.calls() == 2 * N + 1
    sent = server.requests[-1]["messages"]
    assert sent[0] == {"role": "system", "content": verdicts.SYSTEM}
  assert (w.ties, w.disagreements, w.win_rate) == (N, N, 0.5)
  assert (w.judgements, w.judge_calls) == (2 * N, 2 * N + 1)
  assert (again.judge_calls, again.cached) == (0, 2 * N)


def test_format_table_has_one_line_per_model(tmp_path):
  w = run(tmp_path, prefers_model)
  table = winrate.format_table([("final", w)], reference="sft")
  assert len(table.splitlines()) == 3
  assert "100.0%" in table and f"{N}/0/0" in table


# ---------------------------------------------------------------- length control


def test_length_feature_by_hand():
  # d = (2, -2), population std 2 -> tanh(1), tanh(-1).
  assert_allclose(winrate.length_feature([3, 1], [1, 3]),
                  [np.tanh(1.0), np.tanh(-1.0)])
  assert winrate.length_feature([5, 5], [2, 2]).tolist() == [0.0, 0.0]


def test_fractional_targets_at_the_truth_are_recovered_exactly():
  # y_i = sigmoid(b0 + b1 x_i) exactly: the score X^T (y - p) is 0 at the
  # truth, so without a ridge Newton lands on (b0, b1).
  x = np.linspace(-1, 1, 21)
  b0, b1 = -0.4, 1.3
  y = 1 / (1 + np.exp(-(b0 + b1 * x)))
  assert_allclose(winrate.fit_logistic(x, y, l2=0.0), (b0, b1), atol=1e-8)
  assert_allclose(winrate.fit_logistic(x, y), (b0, b1), atol=1e-3)  # ridge


def test_all_ties_fit_zero_and_all_wins_fit_infinity():
  x = np.array([-1.0, 0.0, 1.0])
  assert_allclose(winrate.fit_logistic(x, np.full(3, 0.5)), (0.0, 0.0),
                  atol=1e-12)
  assert winrate.fit_logistic(x, np.ones(3)) == (np.inf, 0.0)
  assert winrate.length_controlled_winrate(np.zeros(3), x, 0 * x) == 0.0


def test_lc_winrate_removes_a_known_length_effect():
  # Outcomes drawn from P(win) = sigmoid(b0 + b1 tanh(d / std d)) with b0 = 0
  # (no preference at equal length) and b1 = 2; the model is longer on
  # average (d ~ N(40, 50) words), so the raw rate is pulled up to about
  # mean(sigmoid(2 tanh(d / std d))) while the LC rate stays at
  # sigmoid(0) = 0.5.
  rng = np.random.default_rng(0)
  n, b0, b1 = 4000, 0.0, 2.0
  len_ref = rng.integers(100, 300, n).astype(float)
  d = rng.normal(40, 50, n)
  len_model = len_ref + d
  f = np.tanh(d / d.std())
  p = 1 / (1 + np.exp(-(b0 + b1 * f)))
  wins = (rng.random(n) < p).astype(float)
  fit0, fit1 = winrate.fit_logistic(f, wins)
  assert abs(fit0 - b0) < 0.1 and abs(fit1 - b1) < 0.2
  lc = winrate.length_controlled_winrate(wins, len_model, len_ref)
  assert lc == pytest.approx(winrate.sigmoid(fit0))
  assert abs(lc - 0.5) < 0.025
  assert wins.mean() == pytest.approx(p.mean(), abs=0.025)
  assert wins.mean() > 0.65                      # biased by length
  # Ties as 0.5 targets: a sure tie on every pair leaves the fit at 0.5.
  assert winrate.length_controlled_winrate(
      np.full(n, 0.5), len_model, len_ref) == pytest.approx(0.5, abs=1e-9)


def test_bootstrap_stat_ci_of_the_mean_is_bootstrap_ci():
  x = np.random.default_rng(1).random(30)
  assert evaluate.bootstrap_stat_ci(np.mean, x, samples=300, seed=3) == \
      pytest.approx(evaluate.bootstrap_ci(x, samples=300, seed=3))
  with pytest.raises(ValueError, match="different lengths"):
    evaluate.bootstrap_stat_ci(lambda a, b: 0.0, x, x[:3])


def test_lc_interval_brackets_the_estimate():
  rng = np.random.default_rng(2)
  n = 300
  len_ref = np.full(n, 100.0)
  len_model = len_ref + rng.normal(0, 30, n)
  wins = rng.choice([0.0, 0.5, 1.0], n)
  lc = winrate.length_controlled_winrate(wins, len_model, len_ref)
  lo, hi = evaluate.bootstrap_stat_ci(winrate.length_controlled_winrate, wins,
                                      len_model, len_ref, samples=200)
  assert lo <= lc <= hi and hi - lo < 0.2


# ---------------------------------------------------------------- probability scoring


def _lp(*pairs):
  return tuple((tok, float(np.log(p))) for tok, p in pairs)


class ProbJudge(winrate.CallableJudge):
  """Replies "Verdict: X" (X the likeliest) with logprobs whose verdict
  position carries probs(messages) = (pA, pB, ptie)."""

  def ask(self, prompt, on_attempt=None):
    p_a, p_b, p_tie = self.fn(prompt.as_dicts())
    alts = sorted(((" A", p_a), (" B", p_b), (" tie", p_tie)),
                  key=lambda t: -t[1])
    reply = super().ask(prompt, on_attempt)
    return dataclasses.replace(
        reply, text="Verdict:" + alts[0][0],
        logprobs=(_lp(("Ver", .99), ("tie", .01)), _lp(("dict", 1.)),
                  _lp((":", 1.)), _lp(*(a for a in alts if a[1] > 0))))


def run_prob(tmp_path, probs, **kw):
  store = winrate.open_store(tmp_path, ProbJudge(probs, model="prob"))
  try:
    return winrate.winrate(store, PROMPTS, MODEL, REFERENCE, samples=200, **kw)
  finally:
    store.close()


def test_verdict_probs_by_hand():
  # The "tie" listed at position 0 ("Ver") is not the verdict: position 3 is,
  # right after "Verdict:"; " A" and "a" both spell A; " C" is no verdict.
  lps = (_lp(("Ver", .9), ("tie", .1)), _lp(("dict", 1.)), _lp((":", 1.)),
         _lp((" A", .5), (" B", .2), ("a", .1), (" tie", .1), (" C", .1)))
  assert verdicts.verdict_position(lps) == 3
  assert_allclose(verdicts.verdict_probs(lps), (.6 / .9, .2 / .9, .1 / .9))
  # A bare reply: the first token is the verdict.
  assert_allclose(verdicts.verdict_probs((_lp(("B", .7), ("A", .3)),)),
                  (.3, .7, 0.))
  assert verdicts.verdict_probs((_lp(("Both", .9), (" A", .1)),)) is None
  assert verdicts.verdict_probs(None) is None
  # P(model better): pA + ptie/2 when the model is A, pB + ptie/2 when B.
  assert verdicts.order_probability((.6, .3, .1), model_first=True) == (
      pytest.approx(.65))
  assert verdicts.order_probability((.6, .3, .1), model_first=False) == (
      pytest.approx(.35))


def test_probability_scoring_cancels_a_constant_position_bias(tmp_path):
  # pA = .8 whatever is shown: .8 model first, .2 reference first -> .5.
  w = run_prob(tmp_path, lambda m: (.8, .2, 0.), scoring="probability")
  assert_allclose(w.outcomes, .5)
  # Each order favours whichever answer is A: a disagreement on every pair.
  assert (w.scoring, w.ties, w.win_rate, w.disagreements) == (
      "probability", N, .5, N)


def test_probability_scoring_sees_a_preference_that_verdicts_hide(tmp_path):
  # The judge always says "A", but A is likelier when the model's answer is
  # A (.9) than when the reference's is (.6): model first P(model) = .9,
  # reference first P(model) = pB = .4; the pair's outcome (.9 + .4) / 2.
  probs = lambda m: (.9, .1, 0.) if shown(m)[0].startswith("MODEL") else (
      .6, .4, 0.)
  verdicts = run_prob(tmp_path, probs)
  assert (verdicts.ties, verdicts.win_rate) == (N, .5)
  w = run_prob(tmp_path, probs, scoring="probability")
  assert_allclose(w.outcomes, .65)
  assert (w.wins, w.losses, w.disagreements) == (N, 0, N)  # .9 vs .4
  assert w.win_rate == pytest.approx(.65)
  assert w.judge_calls == 0  # the same judgements, from the ledger


def test_probability_scoring_without_logprobs_is_unreadable(tmp_path):
  # A text-only judge: no probabilities to read, every pair left out.
  w = run(tmp_path, prefers_model, scoring="probability")
  assert (w.judged, w.unparseable) == (0, 2 * N)
  assert np.isnan(w.win_rate)
  with pytest.raises(ValueError, match="scoring='vote'"):
    run(tmp_path, prefers_model, scoring="vote")


def test_probability_scoring_through_an_openai_compatible_server(
    tmp_path, monkeypatch):
  # The fault server as a judge that says "Verdict: A" with pA = .75: the
  # logprobs travel over HTTP into the ledger and back; win rate .5.
  monkeypatch.setattr(fault_server_lib, "answer_for", lambda _: "Verdict: A")
  monkeypatch.setattr(fault_server_lib, "logprobs_for", lambda text, top: [
      {"token": "Verdict:", "logprob": 0.0, "top_logprobs": []},
      {"token": " A", "logprob": float(np.log(.75)), "top_logprobs": [
          {"token": " A", "logprob": float(np.log(.75))},
          {"token": " B", "logprob": float(np.log(.25))}][:top]}])
  with fault_server_lib.FaultServer() as server:
    cfg = teacher_lib.TeacherConfig(
        base_url=server.base_url, model="judge", api_key_env="",
        max_tokens=8, top_logprobs=5, max_concurrency=2)
    store = winrate.open_store(tmp_path, teacher_lib.make(cfg))
    try:
      w = winrate.winrate(store, PROMPTS, MODEL, REFERENCE, samples=50,
                          scoring="probability")
    finally:
      store.close()
  assert_allclose(w.outcomes, .5)
  assert (w.judged, w.unparseable, w.judge_calls) == (N, 0, 2 * N)
