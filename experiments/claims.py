r"""Two claims about the self-ranking, measured on a stored candidate pool
(the rollout store of a run, WORKDIR/rollouts; no model, no sampling).

  python -m experiments.claims --workdir=W --scheme=ref_anchor_recon \
      --out=experiments/ladder/small_dev/claims_anchor_recon

Order consistency (docs/METHOD.md step 5): a strictly increasing transform
of the scores leaves every group's argmax and its best-over-worst pair as
they were; the measured share of groups unchanged, per transform (1.0 is
the claim; float rounding that merges two scores into a tie would show
below it).

Concentration (step 5, the listwise label d = softmax(s / tau_label)): as
tau_label falls, d's mass on the candidates within `delta` of the group's
best score grows toward 1; beside it, d's mass on the verifier's right
candidates (does concentrating also concentrate on what is right?) and on
a uniform d for reference.

Writes OUT.csv (one row per claim, transform or tau) and OUT.png.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Callable, Mapping, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from purld_jax import preferences  # noqa: E402
from purld_jax import rollout_store  # noqa: E402

# name -> a strictly increasing map of float64 scores
TRANSFORMS: Mapping[str, Callable[[np.ndarray], np.ndarray]] = {
    "3s - 1": lambda s: 3.0 * s - 1.0,
    "s^3": lambda s: s ** 3,
    "exp(s)": np.exp,
    "sigmoid(s)": lambda s: 1.0 / (1.0 + np.exp(-s)),
}
TAUS = (10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01)


def _pair(scores: np.ndarray, valid: np.ndarray):
  p = preferences.best_vs_worst(np.asarray(scores, np.float32),
                                candidate_mask=valid)
  return (np.asarray(p.chosen)[:, 0], np.asarray(p.rejected)[:, 0],
          np.asarray(p.mask)[:, 0])


def order_consistency(scores: np.ndarray, valid: np.ndarray,
                      transforms=TRANSFORMS) -> dict[str, float]:
  """{transform: share of groups whose argmax and best-over-worst pair
  (chosen, rejected, present) are those of the raw scores}.

  Args:
    scores: f[G, K]; valid: bool[G, K] real candidates (a group needs one).
  """
  keep = valid.any(-1)
  base = _pair(scores, valid)
  out = {}
  for name, f in transforms.items():
    got = _pair(f(np.asarray(scores, np.float64)), valid)
    same = np.ones(len(scores), bool)
    for a, b in zip(base, got):
      same &= a == b
    out[name] = float(same[keep].mean()) if keep.any() else np.nan
  return out


def concentration(scores: np.ndarray, correct: np.ndarray | None,
                  valid: np.ndarray, *, delta: float,
                  taus: Sequence[float] = TAUS) -> list[dict]:
  """One row per tau: mean over groups of d's mass on the near-best
  candidates (s_k >= max s - delta) and on the right ones (NaN without
  `correct`), d = `preferences.label_distribution(scores, tau)`; tau "inf"
  is the uniform distribution.

  Args:
    scores: f[G, K]; correct: f/bool[G, K] or None; valid: bool[G, K].
    delta: >= 0, in the scores' own units.
  """
  keep = valid.any(-1)
  s = np.where(valid, scores, -np.inf)
  near = valid & (s >= s.max(-1, keepdims=True) - delta)
  right = None if correct is None else (np.asarray(correct) > 0.5) & valid
  rows = []
  for tau in (np.inf, *taus):
    if np.isinf(tau):
      d = valid / np.maximum(valid.sum(-1, keepdims=True), 1)
    else:
      d = np.asarray(preferences.label_distribution(
          np.asarray(scores, np.float32), tau=float(tau),
          candidate_mask=valid), np.float64)
    rows.append(dict(
        tau=float(tau), near_best_mass=float((d * near).sum(-1)[keep].mean()),
        right_mass=(np.nan if right is None
                    else float((d * right).sum(-1)[keep].mean()))))
  return rows


def load(workdir: str, scheme: str):
  """(scores f[G, K], correct f[G, K] or None, valid bool[G, K]) of every
  stored step holding `scheme`'s scores, filler groups' candidates masked."""
  store = rollout_store.RolloutStore.open(os.path.join(workdir, "rollouts"))
  parts = [r for r in store.iter() if scheme in r.scores]
  if not parts:
    raise ValueError(f"{workdir}/rollouts: no step holds scores {scheme!r}")
  scores = np.concatenate([r.scores[scheme] for r in parts])
  valid = np.concatenate([np.broadcast_to(r.valid[:, None], r.scores[
      scheme].shape) for r in parts])
  correct = (None if any(r.correct is None for r in parts)
             else np.concatenate([r.correct for r in parts]))
  return scores, correct, valid & np.isfinite(scores)


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  conc = [r for r in rows if r["claim"] == "concentration"
          and np.isfinite(r["tau"])]
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  taus = [r["tau"] for r in conc]
  ax.plot(taus, [r["near_best_mass"] for r in conc], "o-",
          label="mass within delta of the best")
  if all(np.isfinite(r["right_mass"]) for r in conc):
    ax.plot(taus, [r["right_mass"] for r in conc], "s-",
            label="mass on right candidates (verifier)")
    uni = [r for r in rows if r["claim"] == "concentration"
           and np.isinf(r["tau"])][0]
    ax.axhline(uni["right_mass"], ls=":", c="gray",
               label="right, uniform d")
  ax.set_xscale("log")
  ax.invert_xaxis()
  ax.set_xlabel("tau_label (falling)")
  ax.set_ylabel("mean mass of d per group")
  ax.set_ylim(0, 1.02)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.claims",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a run's workdir")
  p.add_argument("--scheme", required=True,
                 help="stored scores to read (e.g. anchor_recon, or "
                 "ref_anchor_recon after experiments/rerank.py)")
  p.add_argument("--delta", type=float, default=0.1,
                 help="near-best: within this of the group's best score")
  p.add_argument("--out", required=True, help="writes OUT.csv and OUT.png")
  a = p.parse_args(argv)
  try:
    scores, correct, valid = load(a.workdir, a.scheme)
  except (ValueError, FileNotFoundError) as e:
    print(f"claims: {e}", file=sys.stderr)
    return 2
  rows = [dict(claim="order_consistency", transform=k, share_unchanged=v)
          for k, v in order_consistency(scores, valid).items()]
  rows += [dict(claim="concentration", delta=a.delta, **r)
           for r in concentration(scores, correct, valid, delta=a.delta)]
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  fields = ("claim", "transform", "share_unchanged", "delta", "tau",
            "near_best_mass", "right_mass")
  with open(a.out + ".csv", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fields)
    w.writeheader()
    w.writerows(rows)
  plot(rows, a.out + ".png", f"{a.scheme}: {valid.any(-1).sum()} groups, "
       f"delta {a.delta}")
  for r in rows:
    print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in r.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
