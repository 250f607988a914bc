r"""Re-rank a run's stored candidate pools with every scheme, and the table of
self-ranking vs oracle agreement per scheme and K, without sampling again.

  python experiments/rerank.py --workdir=workdirs/demo \
      --schemes=judge,pmi,anchor_recon,pairwise_judge,similarity \
      --ks=2,4 --seeds=0,1,2 --out=workdirs/demo/rerank.csv

Reads the run's rollout store (WORKDIR/rollouts, purld_jax/rollout_store.py),
scores every step's candidates with --model (default the run's reference,
WORKDIR/reference) under scores/<prefix><scheme> (steps already scored are
skipped: a killed study resumes), then prints, for each scheme and K (K
candidates sub-sampled from the stored pool per prompt, per seed),
`diagnostics.ranking_vs_oracle` and the mean per-prompt Kendall tau-b of
the scores with correctness, and `diagnostics.shorter_preferred` (the share
of unequal-length candidate pairs whose shorter member scores higher).
Needs prompts with answers (oracle correctness is stored only then).

--deltas=q (or a list) gives pu.delta's calibration instead (`gate_table`,
docs/METHOD.md step 4): per scheme and delta, how the PU gate's DPO pairs
agree with the oracle (net right-over-wrong pairs per group), beside the
anchor-as-chosen baseline's pairs; the largest net is marked best:

  python experiments/rerank.py --workdir=W --schemes=anchor_recon,pmi \
      --deltas=q --steps=1,2,3,4,5,6,7,8 --out=W/delta.csv

--length_debias adds a row SCHEME+length_debias per scheme: its scores
after `ranking.length_debias` (the linear length trend inside groups
removed, one slope per stored step), computed from the stored scores, with
no model: what `ranking.length_debias=True` would have handed the losses.
--gate=number likewise adds SCHEME+gate_number: the stored scores after
`ranking.answer_gate` (candidates without a number, where the anchor has
one, ranked below the group; the anchor's stored score needed), from the
stored texts and anchors: what `ranking.gate=number` would have handed them.

The run's own scores (scores/<ranking.scheme>) came from the policy snapshot
of each step when ranking.scorer = "policy"; --model scores every step with
one model, so the prefix (default "ref_") keeps the two apart. Sub-sampling
restricts pool scores: exact for pointwise schemes, approximate for
pairwise_judge (Bradley-Terry over the whole pool).
"""

from __future__ import annotations

import csv
import functools
import os
import sys
from typing import Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from purld_jax import diagnostics  # noqa: E402
from purld_jax import evaluate  # noqa: E402
from purld_jax import pu  # noqa: E402
from purld_jax import ranking  # noqa: E402
from purld_jax import rollout_store  # noqa: E402
from purld_jax import self_scoring  # noqa: E402
from purld_jax.train import dpo  # noqa: E402


def rerank(store: rollout_store.RolloutStore, model, tok,
           schemes: Sequence[str], *, prefix: str = "",
           steps: Sequence[int] | None = None, overwrite: bool = False,
           make_verifier=evaluate.batch_verifier,
           **score_kwargs) -> list[tuple[int, str]]:
  """Scores each stored step's candidates with every scheme
  (`self_scoring.score_group(model, tok, ...)`, anchor scored too) into
  scores/<prefix><scheme>; pairs already present are skipped (resumable).

  `model` is one scorer for every step (e.g. the reference: the run's own
  scores came from the policy snapshot of each step when ranking.scorer is
  "policy"; the prefix keeps the two apart). `score_kwargs` go to
  score_group (yes_word, rows_per_call, scorers, ...); "oracle" uses
  `make_verifier(stored answers)`. Returns the (step, name)s written."""
  done = []
  for step in store.steps() if steps is None else steps:
    todo = [s for s in schemes
            if overwrite or prefix + s not in store.schemes(step)]
    if not todo:
      continue
    r = store.read(step)
    for scheme in todo:
      verifier = make_verifier(r.answers) if scheme == "oracle" else None
      s, s_a = self_scoring.score_group(
          model, tok, r.messages, r.anchors, r.candidates(), scheme=scheme,
          score_anchor=True, verifier=verifier, **score_kwargs)
      store.add_scores(step, prefix + scheme, s, s_a, overwrite=True)
      done.append((step, prefix + scheme))
  return done


def agreement(scores: np.ndarray, correct: np.ndarray,
              valid: np.ndarray) -> dict[str, float]:
  """`diagnostics.ranking_vs_oracle` plus kendall_tau: the mean over valid
  prompts of tau-b(scores, correctness) where it is defined (mixed groups)."""
  out = diagnostics.ranking_vs_oracle(scores, correct, valid)
  tau = diagnostics.kendall_tau_rows(scores, correct, valid)
  tau = tau[np.isfinite(tau)]
  out["kendall_tau"] = float(tau.mean()) if len(tau) else np.nan
  return out


def agreement_table(store: rollout_store.RolloutStore,
                    schemes: Sequence[str],
                    ks: Sequence[int], seeds: Sequence[int], *,
                    steps: Sequence[int] | None = None,
                    length_debias: bool = False,
                    gate: str = "none") -> list[dict]:
  """One row per (scheme, k, seed): `agreement` over the prompts of every
  stored step with oracle correctness, k candidates sub-sampled per prompt
  (`rollout_store.subsample`). Steps lacking a scheme's scores are left
  out of its rows (the row's `steps` counts those used).

  length_debias: also a row per scheme named DEBIASED.format(scheme): its
  sub-sampled scores through `ranking.length_debias`, one slope per stored
  step (as training with `ranking.length_debias` fits it per batch).
  gate: also a row per scheme named GATED.format(scheme, gate): its
  sub-sampled scores through `ranking.answer_gate` with `gate`'s passes
  (`ranking.gate_passes` of the stored texts and anchors)."""
  rollouts = [r for r in store.iter(steps) if r.correct is not None]
  if not rollouts:
    raise ValueError(f"{store.path}: no step has oracle correctness")
  rows = []
  for scheme in schemes:
    for name, how in [(scheme, None)] + (
        [(DEBIASED.format(scheme), "debias")] if length_debias else []) + (
            [(GATED.format(scheme, gate), "gate")] if gate != "none" else []):
      for k in ks:
        for seed in seeds:
          parts = [rollout_store.subsample(r, k, seed) for r in rollouts
                   if scheme in r.scores]
          if not parts:
            continue
          cat = lambda f: np.concatenate([f(p) for p in parts])
          score = lambda p: p.scores[scheme]
          if how == "debias":
            score = lambda p: ranking.length_debias(
                p.scores[scheme], rollout_store.candidate_lengths(p),
                p.valid)[0]
          elif how == "gate":
            score = functools.partial(_gated, scheme=scheme, gate=gate)
          row = dict(scheme=name, k=k, seed=seed, steps=len(parts),
                     prompts=int(cat(lambda p: p.valid).sum()))
          row.update(agreement(cat(score), cat(lambda p: p.correct),
                               cat(lambda p: p.valid)))
          short = cat(lambda p: diagnostics.shorter_preferred(
              score(p), rollout_store.candidate_lengths(p), p.valid))
          short = short[np.isfinite(short)]  # prompts with unequal lengths
          row["shorter_preferred"] = (float(short.mean()) if len(short)
                                      else np.nan)
          rows.append(row)
  return rows


def _gated(r: rollout_store.Rollout, *, scheme: str, gate: str
           ) -> np.ndarray:
  """`r`'s stored `scheme` scores through `ranking.answer_gate`."""
  if scheme not in r.anchor_scores:
    raise ValueError(f"step {r.step}: no stored anchor score for {scheme!r} "
                     "(the gate's floor needs it)")
  passed = ranking.gate_passes(r.texts, r.anchors, gate=gate)
  return ranking.answer_gate(r.scores[scheme], passed,
                             r.anchor_scores[scheme], r.valid)


def gate_vs_oracle(scores: np.ndarray, anchor_score: np.ndarray,
                   correct: np.ndarray, anchor_correct: np.ndarray,
                   valid: np.ndarray, *, delta: float | str | None,
                   prior: float,
                   anchor_fallback: bool = True) -> dict[str, float]:
  """How the DPO pairs of the PU gate (docs/METHOD.md step 4; best in P
  over the worst outside P, P empty: anchor over worst) agree with the
  oracle, per valid group. delta None: the anchor-as-chosen baseline's
  pairs (anchor over worst, every group) instead; delta "shift": pu.mode
  shift's (best over worst of the scores, s_a unused).

  Args:
    scores: f[G, K]; anchor_score: f[G] (s_a, the same scheme).
    correct: f/bool[G, K] the oracle; anchor_correct: f/bool[G] the anchor's.
    valid: bool[G] real groups.

  Returns: pairs (a pair per group), fallback (anchor-over-worst pairs per
  group), right_over_wrong / wrong_over_right (pairs per group whose chosen
  is right and rejected wrong, or the reverse; same-correctness pairs are
  neither), net (their difference: the oracle's verdict on what training
  pulls toward, per group), pair_accuracy (right_over_wrong of the pairs
  with a verdict), p_nonempty (share of groups with a likely positive) and
  p_precision (share of likely positives that are right).
  """
  valid = np.asarray(valid, bool)
  k = scores.shape[-1]
  if delta is None:
    pairs = dpo.make_pairs(scores, anchor_score, rule="anchor_as_chosen",
                           margin=0.0, valid=valid)
    pos = np.zeros(scores.shape, bool)
  elif delta == "shift":
    pairs = dpo.make_pairs(scores, anchor_score, rule="best_vs_worst",
                           margin=0.0, mode="shift", prior=0.0, valid=valid)
    pos = np.zeros(scores.shape, bool)
  else:
    pairs = dpo.make_pairs(scores, anchor_score, rule="best_vs_worst",
                           margin=0.0, mode="gate", delta=delta, prior=prior,
                           anchor_fallback=anchor_fallback, valid=valid)
    pos = np.asarray(pu.gate_positives(scores, anchor_score, delta=delta,
                                       prior=prior)) & valid[:, None]
  right = np.concatenate([np.asarray(correct) > 0.5,
                          np.asarray(anchor_correct)[:, None] > 0.5], -1)
  # One pair a group (best-vs-worst rules): the verifier's verdict per
  # present pair (diagnostics.pairs_vs_oracle), rescaled to per group.
  chosen, rejected = (np.asarray(x)[:, :1] for x in pairs[:2])
  mask = np.asarray(pairs.mask)[:, :1] & valid[:, None]
  got = diagnostics.pairs_vs_oracle(chosen, rejected, mask, right)
  n, present = max(int(valid.sum()), 1), int(mask.sum())
  good, bad, fallback = (
      0.0 if not present else got[f"pair_{x}"] * present / n
      for x in ("right_over_wrong", "wrong_over_right", "anchor_chosen"))
  return dict(
      pairs=present / n, fallback=fallback,
      right_over_wrong=good, wrong_over_right=bad, net=good - bad,
      pair_accuracy=good / (good + bad) if good + bad else np.nan,
      p_nonempty=pos.any(-1)[valid].mean() if valid.any() else np.nan,
      p_precision=right[:, :k][pos].mean() if pos.any() else np.nan)


def gate_table(store: rollout_store.RolloutStore, schemes: Sequence[str],
               deltas: Sequence[float] | None, *, prior: float = 0.5,
               quantiles: int = 10, steps: Sequence[int] | None = None,
               ks: Sequence[int] | None = None, seeds: Sequence[int] = (0,),
               make_verifier=evaluate.batch_verifier) -> list[dict]:
  """pu.delta's calibration (docs/METHOD.md step 4) on a stored pool: one
  row per scheme and delta (`gate_vs_oracle` over every stored group with
  oracle correctness and the scheme's anchor score), then pu.mode shift
  (delta "shift") and the anchor-as-chosen baseline (delta "anchor").
  deltas None: 0 and the `quantiles`-quantiles of the gaps s_a - s_k (the
  scheme's own scale). The row of the largest `net` is marked best=1.
  ks: also per group size, each k of the K candidates sub-sampled with
  every seed of `seeds` (`rollout_store.subsample`); rows carry k (K for
  the whole pool) and seed (-1 for the whole pool)."""
  rollouts = [r for r in store.iter(steps) if r.correct is not None]
  if not rollouts:
    raise ValueError(f"{store.path}: no step has oracle correctness")
  anchor_right = {r.step: np.array(
      [make_verifier(r.answers)(b, a) for b, a in enumerate(r.anchors)])
      for r in rollouts}
  pools = [(rollouts[0].k, -1, rollouts)] if not ks else [
      (k, seed, [rollout_store.subsample(r, k, seed) for r in rollouts])
      for k in ks for seed in seeds]
  rows = []
  for k, seed, pool in pools:
    for scheme in schemes:
      rows += [dict(r, k=k, seed=seed) for r in _gate_rows(
          pool, scheme, anchor_right, deltas, prior=prior,
          quantiles=quantiles, where=store.path)]
  return rows


def _gate_rows(rollouts, scheme: str, anchor_right: dict, deltas, *,
               prior: float, quantiles: int, where: str) -> list[dict]:
  have = [r for r in rollouts if scheme in r.anchor_scores]
  if not have:
    raise ValueError(f"{where}: no step holds the anchor score of "
                     f"{scheme!r} (rerank it first)")
  cat = lambda f: np.concatenate([f(r) for r in have])  # noqa: E731
  s, s_a = cat(lambda r: r.scores[scheme]), cat(
      lambda r: r.anchor_scores[scheme])
  valid = cat(lambda r: r.valid)
  args = (s, s_a, cat(lambda r: r.correct),
          cat(lambda r: anchor_right[r.step]), valid)
  grid = deltas
  if grid is None:
    gap = (s_a[:, None] - s)[valid]
    grid = sorted({0.0, *np.round(np.quantile(
        np.maximum(gap, 0), np.linspace(0, 1, quantiles + 1)), 4)})
  part = [dict(scheme=scheme, delta=float(d), groups=int(valid.sum()),
               **gate_vs_oracle(*args, delta=float(d), prior=prior))
          for d in grid]
  best = max(part, key=lambda r: r["net"])
  for r in part:
    r["best"] = int(r is best)
  return part + [dict(scheme=scheme, delta=name, groups=int(valid.sum()),
                      best=0, **gate_vs_oracle(*args, delta=d, prior=prior))
                 for name, d in (("shift", "shift"), ("anchor", None))]


GATE_FIELDS = ("scheme", "k", "seed", "delta", "groups", "pairs", "fallback",
               "right_over_wrong", "wrong_over_right", "net",
               "pair_accuracy", "p_nonempty", "p_precision", "best")
DEBIASED = "{}+length_debias"
GATED = "{}+gate_{}"
FIELDS = ("scheme", "k", "seed", "steps", "prompts", "sample_accuracy",
          "mixed_groups", "top_right", "pair_accuracy", "kendall_tau",
          "shorter_preferred")


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from purld_jax import models  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  store = rollout_store.RolloutStore.open(
      os.path.join(f.workdir, "rollouts"))
  names = [f.prefix + s for s in f.schemes]
  steps = [int(s) for s in f.steps] or None
  if f.schemes:
    model, tok = models.load_pretrained(
        f.model or os.path.join(f.workdir, "reference"), dtype=jnp.float32)
    done = rerank(store, model, tok, f.schemes, prefix=f.prefix, steps=steps,
                  pmi_stop=f.pmi_stop, pair_opponents=f.pair_opponents)
    print(f"scored {len(done)} (step, scheme) pairs", file=sys.stderr)
  if f.deltas:
    fields = GATE_FIELDS
    rows = gate_table(store, names + list(f.stored),
                      None if f.deltas == ["q"] else
                      [float(d) for d in f.deltas], prior=f.prior,
                      steps=steps)
  else:
    fields = FIELDS
    rows = agreement_table(store, names + list(f.stored),
                           ks=[int(k) for k in f.ks],
                           seeds=[int(s) for s in f.seeds], steps=steps,
                           length_debias=f.length_debias, gate=f.gate)
  print(" ".join(f"{c:>15}" for c in fields))
  for r in rows:
    print(" ".join(f"{r[c]:>15.4f}" if isinstance(r[c], float)
                   else f"{r[c]!s:>15}" for c in fields))
  if f.out:
    with open(f.out, "w", newline="", encoding="utf-8") as fh:
      w = csv.DictWriter(fh, fields)
      w.writeheader()
      w.writerows(rows)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "the run's workdir (WORKDIR/rollouts)")
  flags.DEFINE_string("model", None, "HF scorer directory (default: "
                      "WORKDIR/reference)")
  flags.DEFINE_list("schemes", "judge,pmi,anchor_recon,similarity",
                    "schemes to score the stored candidates with")
  flags.DEFINE_string("prefix", "ref_", "stored as scores/<prefix><scheme>")
  flags.DEFINE_bool("pmi_stop", False, "pmi also scores each candidate's "
                    "stop token (ranking.pmi_stop; give it its own --prefix)")
  flags.DEFINE_integer("pair_opponents", 0, "pairwise_judge: opponents "
                       "per member (ranking.pair_opponents; 0 = every pair; "
                       "give it its own --prefix)")
  flags.DEFINE_bool("length_debias", False, "also tabulate each score "
                    "through ranking.length_debias (rows SCHEME"
                    "+length_debias; no model needed)")
  flags.DEFINE_enum("gate", "none", list(ranking.ANSWER_GATES), "also "
                    "tabulate each score through ranking.answer_gate with "
                    "this gate (rows SCHEME+gate_GATE; no model needed)")
  flags.DEFINE_list("stored", "", "also tabulate these stored score names "
                    "(e.g. the run's own: judge)")
  flags.DEFINE_list("deltas", "", "instead of the agreement table, "
                    "pu.delta's calibration (gate_table): these deltas, or "
                    "q for 0 and the deciles of s_a - s_k")
  flags.DEFINE_float("prior", 0.5, "pu.prior of the gate (--deltas)")
  flags.DEFINE_list("steps", "", "only these stored steps (default all)")
  flags.DEFINE_list("ks", "2,4", "group sizes sub-sampled")
  flags.DEFINE_list("seeds", "0,1,2", "sub-sampling seeds")
  flags.DEFINE_string("out", None, "write the rows as CSV here")
  flags.mark_flag_as_required("workdir")
  app.run(main)
