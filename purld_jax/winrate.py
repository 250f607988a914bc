"""Pairwise win rate against a reference, judged through the teacher client.

Each held-out prompt has the model's answer and a reference answer (the
anchor, or the SFT model's). A judge (any `teacher.Teacher`, e.g.
`teacher.make(cfg)` for an OpenAI-compatible endpoint, or a plain
`judge(messages) -> text` callable wrapped by `CallableJudge`) reads
`verdicts.TEMPLATE` and answers "Verdict: A", "Verdict: B" or "Verdict: tie".

Both orders, to cancel position bias, and verdict or probability scoring
(`scoring`): a pair's two replies become its outcome in [0, 1] as
`verdicts.py` says; pairs with an unreadable reply (`unparseable`) or a
failed judge request (`failed`) are left out of the rates or scored 0.5.

Here: length control, judging through the ledger (`CallableJudge`,
`open_store`, `judge_pairs`) and the rates (`WinRate`, `winrate`,
`format_table`).

Length control (in the spirit of AlpacaEval 2's length-controlled win rate,
simplified to one model and no per-instruction term): with
d_i = len_model_i - len_reference_i and s = std(d) (population std over the
pairs), the per-pair outcome y_i in [0, 1] ({0, 0.5, 1} with verdict
scoring) is fitted by a fractional
logistic regression

    P(win_i) = sigmoid(b0 + b1 * tanh(d_i / s))          (tanh term 0 if s = 0)

by Newton's method (IRLS) on the Bernoulli log-likelihood with fractional
targets, sum_i y_i log p_i + (1 - y_i) log(1 - p_i), with a ridge of
`L2` on b1 only. The LC win rate is sigmoid(b0): the win probability of an
answer as long as the reference's. All wins (or all losses) give 1 (or 0).

Intervals: 95 % percentile bootstrap over pairs (`evaluate.bootstrap_stat_ci`;
the LC fit, s included, is redone on every resample).

Cache: every judgement is a row of a `ledger.Ledger` at
`<workdir>/winrate/anchors.sqlite`, through `anchors.AnchorStore`, so the
ledger's guarantees hold (never paid twice; intents; attempts; stats). Its
key is the hash of the exact judge request: the judge's backend and model,
its generation params, and the rendered messages, which hold the template,
the prompt, answer A and answer B in the order shown. A resumed or repeated
evaluation makes no judge call for a judgement already stored.

Cost: `judgements` (2 per distinct pair) and `judge_calls` (HTTP attempts
made by this evaluation, retries included; 0 when all were cached), each
also per prompt.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from purld_jax import anchors as anchors_lib
from purld_jax import ledger as ledger_lib
from purld_jax import evaluate
from purld_jax import prompts as prompts_lib
from purld_jax import teacher as teacher_lib
from purld_jax import teacher_wire
from purld_jax import verdicts

SUBDIR = "winrate"
L2 = 1e-4
SCORINGS = ("verdict", "probability")
TIE_TOL = 1e-9  # |outcome - 0.5| counted a tie (probabilities round)


# ----------------------------------------------------------------------------
# Length-controlled win rate


def length_feature(len_a: np.ndarray, len_b: np.ndarray) -> np.ndarray:
  """tanh((len_a - len_b) / std(len_a - len_b)) f[N]; zeros if std is 0."""
  d = np.asarray(len_a, np.float64) - np.asarray(len_b, np.float64)
  s = d.std()
  return np.tanh(d / s) if s > 0 else np.zeros_like(d)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = L2,
                 iters: int = 100, tol: float = 1e-10) -> tuple[float, float]:
  """(b0, b1) maximising sum y log p + (1 - y) log(1 - p) - l2/2 * b1^2,
  p = sigmoid(b0 + b1 x), for targets y in [0, 1] (Newton / IRLS).

  All y = 1 (or 0) has no finite maximiser: (inf, 0) (or (-inf, 0)).
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if np.all(y == 1):
    return float("inf"), 0.0
  if np.all(y == 0):
    return float("-inf"), 0.0
  X = np.stack([np.ones_like(x), x], axis=1)  # pylint: disable=invalid-name
  beta = np.array([np.log(y.mean() / (1 - y.mean())), 0.0])
  ridge = np.diag([0.0, l2])
  for _ in range(iters):
    p = 0.5 * (1.0 + np.tanh(0.5 * (X @ beta)))  # sigmoid, no overflow
    grad = X.T @ (y - p) - ridge @ beta
    hess = (X * (p * (1 - p))[:, None]).T @ X + ridge
    step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
    beta = beta + step
    if np.max(np.abs(step)) < tol:
      break
  return float(beta[0]), float(beta[1])


def sigmoid(z: float) -> float:
  return float(0.5 * (1.0 + np.tanh(0.5 * z)))


def length_controlled_winrate(wins: np.ndarray, len_a: np.ndarray,
                              len_b: np.ndarray, *, l2: float = L2) -> float:
  """sigmoid(b0) of `fit_logistic(length_feature(len_a, len_b), wins)`: the
  win probability of A at zero length difference (see the module
  docstring). `wins` f[N] in {0, 0.5, 1} (ties as 0.5 targets)."""
  b0, _ = fit_logistic(length_feature(len_a, len_b), wins, l2=l2)
  return sigmoid(b0)


# ----------------------------------------------------------------------------
# Judging through the ledger


class CallableJudge:
  """A `judge(messages) -> text` callable as a `teacher.Teacher`.

  `messages` are OpenAI-style dicts. `model` names the judge in the ledger
  key: a different judge function must get a different name. Exceptions
  other than `teacher_wire.TeacherError` propagate (they are bugs, not
  replies).
  """

  simulated = False

  def __init__(self, fn: Callable[[list[dict]], str], *, model: str = "callable",
               max_concurrency: int = 1):
    self.fn, self.model, self.max_concurrency = fn, model, max_concurrency
    self.label = f"callable:{model}"

  def request(self, prompt):
    return teacher_lib.Request(messages=prompt.messages, backend="callable",
                               model=self.model, params=(),
                               images=prompt.images)

  def prepare(self):
    pass

  def ask(self, prompt, on_attempt=None):
    if prompt.images:  # fn takes text messages: it would judge blind
      raise teacher_wire.TeacherError(
          f"{prompt.id!r} has images; a callable judge takes text messages "
          "only: judge with a teacher that takes images", kind=
          "images_unsupported", fatal=True)
    t0 = time.monotonic()
    text = self.fn(prompt.as_dicts())
    attempt = teacher_wire.Attempt(1, "ok", latency_s=time.monotonic() - t0)
    if on_attempt:
      on_attempt(attempt)
    return teacher_lib.Reply(text=text, finish_reason="stop", truncated=False,
                             prompt_tokens=None, completion_tokens=None,
                             latency_s=attempt.latency_s, attempts=(attempt,),
                             simulated=False, teacher=self.label)


def open_store(workdir: str | os.PathLike, judge) -> anchors_lib.AnchorStore:
  """The judgement ledger `<workdir>/winrate/anchors.sqlite` for `judge` (a
  Teacher, or a callable wrapped in `CallableJudge`). Close it when done."""
  if not hasattr(judge, "request"):
    judge = CallableJudge(judge)
  if judge.simulated:
    raise teacher_lib.ConfigError(
        f"the judge {judge.label!r} is simulated (dataset backend); a win "
        "rate needs a judge that reads the answers")
  return anchors_lib.AnchorStore(os.path.join(os.fspath(workdir), SUBDIR),
                                 judge)


@dataclasses.dataclass(frozen=True)
class Judged:
  """The judge's replies in both orders, and what they cost."""

  model_first: tuple[str | None, ...]       # reply text; None: request failed
  reference_first: tuple[str | None, ...]
  model_first_logprobs: tuple               # Reply.logprobs per pair, or None
  reference_first_logprobs: tuple
  judgements: int       # distinct judge requests this evaluation needs
  cached: int           # of those, already in the ledger before it
  judge_calls: int      # HTTP attempts made now (retries included)
  failed: tuple         # ((judge prompt id, message), ...)


def judge_pairs(store: anchors_lib.AnchorStore,
                prompts: Sequence[prompts_lib.Prompt], model: Sequence[str],
                reference: Sequence[str], *,
                template: str = verdicts.TEMPLATE,
                system: str = verdicts.SYSTEM) -> Judged:
  """Both orders of every (prompt, model answer, reference answer), asking
  the judge only for judgements not in the ledger."""
  if not len(prompts) == len(model) == len(reference):
    raise ValueError(f"{len(prompts)} prompts, {len(model)} model answers, "
                     f"{len(reference)} reference answers")
  asks = {}
  for p, m, r in zip(prompts, model, reference):
    for tag, a, b in (("model_first", m, r), ("reference_first", r, m)):
      msgs = verdicts.judge_messages(p, a, b, template=template,
                                     system=system)
      # The prompt's images go with the judge message (its last): the judge
      # sees what the answers describe (a text-only judge teacher refuses).
      asks[(p.id, tag)] = prompts_lib.Prompt(id=f"{p.id}#{tag}", messages=msgs,
                                             images=p.images)
  todo = list(asks.values())
  missing = store.missing(todo)
  distinct = len({ledger_lib.ledger_key(store.teacher.request(q))
                  for q in todo})
  calls = 0

  def count(_, result):
    nonlocal calls
    calls += len(getattr(result, "attempts", ()) or ())

  report = store.fetch(list(missing.values()), on_done=count)
  got = dict(zip([q.id for q in todo], store.lookup(todo)))
  pick = lambda tag, attr: tuple(
      getattr(got[asks[(p.id, tag)].id], attr, None) for p in prompts)
  return Judged(
      model_first=pick("model_first", "text"),
      reference_first=pick("reference_first", "text"),
      model_first_logprobs=pick("model_first", "logprobs"),
      reference_first_logprobs=pick("reference_first", "logprobs"),
      judgements=distinct, cached=distinct - len(missing), judge_calls=calls,
      failed=report.failed)


# ----------------------------------------------------------------------------
# The evaluation


@dataclasses.dataclass(frozen=True)
class WinRate:
  """A model's win rate against a reference; see the module docstring.

  Attributes:
    outcomes: f[N] per-pair outcome (NaN: left out).
    verdicts: ((model-first verdict, reference-first verdict), ...).
    win_rate, win_rate_ci: mean outcome over judged pairs; 95 % CI.
    lc_win_rate, lc_win_rate_ci: length-controlled; 95 % CI.
  """

  ids: tuple[str, ...]
  scoring: str          # "verdict" or "probability"
  outcomes: np.ndarray
  verdicts: tuple[tuple[str | None, str | None], ...]
  len_model: np.ndarray
  len_reference: np.ndarray
  pairs: int
  judged: int
  wins: int
  losses: int
  ties: int
  disagreements: int    # of the ties, pairs whose two orders disagreed
  unparseable: int      # verdicts (not pairs) the parser could not read
  failed: int           # judge requests that failed after their retries
  win_rate: float
  win_rate_ci: tuple[float, float]
  lc_win_rate: float
  lc_win_rate_ci: tuple[float, float]
  judgements: int
  cached: int
  judge_calls: int

  def summary(self) -> dict:
    """The numbers without the per-pair arrays (JSON-ready)."""
    skip = ("ids", "outcomes", "verdicts", "len_model", "len_reference")
    row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in skip}
    n = max(self.pairs, 1)
    row.update(judgements_per_prompt=self.judgements / n,
               judge_calls_per_prompt=self.judge_calls / n)
    return row


def _rates(outcomes, len_model, len_reference, *, seed, samples):
  if not len(outcomes):
    nan = float("nan")
    return nan, (nan, nan), nan, (nan, nan)
  lc = lambda y, a, b: length_controlled_winrate(y, a, b)
  return (float(outcomes.mean()),
          evaluate.bootstrap_stat_ci(np.mean, outcomes, samples=samples,
                                     seed=seed),
          lc(outcomes, len_model, len_reference),
          evaluate.bootstrap_stat_ci(lc, outcomes, len_model, len_reference,
                                     samples=samples, seed=seed))


def winrate(store: anchors_lib.AnchorStore,
            prompts: Sequence[prompts_lib.Prompt], model: Sequence[str],
            reference: Sequence[str], *,
            len_model: Sequence[float] | None = None,
            len_reference: Sequence[float] | None = None,
            template: str = verdicts.TEMPLATE, system: str = verdicts.SYSTEM,
            unparseable: str = "exclude", scoring: str = "verdict",
            seed: int = 0, samples: int = 2000) -> WinRate:
  """The model's answers against the reference answers, prompt by prompt.

  Lengths default to whitespace-separated words of each answer; pass token
  counts for both sides or for neither (one unit for the difference).
  `scoring="probability"` needs a judge asked for logprobs (module
  docstring).
  """
  if scoring not in SCORINGS:
    raise ValueError(f"scoring={scoring!r}; known: {', '.join(SCORINGS)}")
  judged = judge_pairs(store, prompts, model, reference, template=template,
                       system=system)
  read = lambda texts: [None if t is None else verdicts.parse_verdict(t)
                         for t in texts]
  v1, v2 = read(judged.model_first), read(judged.reference_first)
  unread = sum(t is not None and v is None
               for ts, vs in ((judged.model_first, v1),
                              (judged.reference_first, v2))
               for t, v in zip(ts, vs))
  words = lambda texts: np.array([len(t.split()) for t in texts], np.float64)
  lm = words(model) if len_model is None else np.asarray(len_model, np.float64)
  lr = (words(reference) if len_reference is None
        else np.asarray(len_reference, np.float64))
  if scoring == "verdict":
    outcomes = verdicts.pair_outcomes(v1, v2, unparseable=unparseable)
    disagree = sum(a is not None and b is not None
                   and verdicts.order_outcome(a, model_first=True)
                   != verdicts.order_outcome(b, model_first=False)
                   for a, b in zip(v1, v2))
  else:
    p1 = [verdicts.verdict_probs(lp) for lp in judged.model_first_logprobs]
    p2 = [verdicts.verdict_probs(lp) for lp in judged.reference_first_logprobs]
    unread = sum(t is not None and p is None
                 for ts, ps in ((judged.model_first, p1),
                                (judged.reference_first, p2))
                 for t, p in zip(ts, ps))
    o1 = np.array([verdicts.order_probability(p, model_first=True)
                   for p in p1])
    o2 = np.array([verdicts.order_probability(p, model_first=False)
                   for p in p2])
    outcomes = (o1 + o2) / 2
    if unparseable == "tie":
      outcomes[np.isnan(outcomes)] = 0.5
    disagree = int(np.sum((o1 - 0.5) * (o2 - 0.5) < 0))
  keep = ~np.isnan(outcomes)
  y = outcomes[keep]
  rate, rate_ci, lc, lc_ci = _rates(y, lm[keep], lr[keep], seed=seed,
                                    samples=samples)
  return WinRate(
      ids=tuple(p.id for p in prompts), scoring=scoring, outcomes=outcomes,
      verdicts=tuple(zip(v1, v2)), len_model=lm, len_reference=lr,
      pairs=len(prompts), judged=int(keep.sum()),
      wins=int((y > 0.5 + TIE_TOL).sum()), losses=int((y < 0.5 - TIE_TOL).sum()),
      ties=int((np.abs(y - 0.5) <= TIE_TOL).sum()),
      disagreements=int(disagree), unparseable=int(unread),
      failed=len(judged.failed), win_rate=rate, win_rate_ci=rate_ci,
      lc_win_rate=lc, lc_win_rate_ci=lc_ci, judgements=judged.judgements,
      cached=judged.cached, judge_calls=judged.judge_calls)


def format_table(rows: Sequence[tuple[str, WinRate]], *, reference: str) -> str:
  """One line per (model name, WinRate): raw and LC win rates with CIs."""
  head = (f"{'model':<10} {'pairs':>5} {'judged':>6} {'W/T/L':>11} "
          f"{'win vs ' + reference:>14} {'95% CI':>15} {'LC win':>7} "
          f"{'95% CI':>15} {'unread':>6} {'failed':>6} {'calls/prompt':>12}")
  lines = [head, "-" * len(head)]
  pct = lambda x: f"{100 * x:.1f}%"
  ci = lambda c: "[{:.1f}, {:.1f}]".format(*(100 * v for v in c))
  for name, w in rows:
    wtl = f"{w.wins}/{w.ties}/{w.losses}"
    lines.append(
        f"{name:<10} {w.pairs:>5} {w.judged:>6} {wtl:>11} "
        f"{pct(w.win_rate):>14} {ci(w.win_rate_ci):>15} "
        f"{pct(w.lc_win_rate):>7} {ci(w.lc_win_rate_ci):>15} "
        f"{w.unparseable:>6} {w.failed:>6} "
        f"{w.summary()['judge_calls_per_prompt']:>12.2f}")
  return "\n".join(lines)
