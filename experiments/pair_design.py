r"""How much of pairwise_judge's ranking survives a sparse pair design?

  python -m experiments.pair_design \
      experiments/ablation/small_pairs4/cells/k16_pairwise_judge_dpo_s0 \
      --opponents=0,2,4,8 --steps=1,2,3,4 \
      --out=experiments/ablation/small_pairs4/pair_design

pairwise_judge asks the judge about every ordered pair of a prompt's M = K + 1
members (K candidates and the anchor): M (M - 1) rows, 272 at K = 16.
`ranking.pair_opponents = n` judges each member against n others only (a
cyclic design, `templates.pair_design`): M n rows. This study re-scores the
same stored candidates (the cell's rollouts/ store) with the cell's
reference model, once with every pair (n = 0, which must be listed) and
once per sparse n, under scores/ref_pairs<n>_pairwise_judge (resumable:
steps already scored are skipped), and compares each sparse ranking of the
K candidates with the full one, per prompt:

  tau_full      Kendall tau-b with the full design's scores (1 = the same
                order), mean over prompts, 95 % bootstrap CI;
  best_same     the share of prompts whose top candidate is the same;
  worst_same    the same for the bottom one;
  pair_same     both the same: DPO's best-vs-worst pair unchanged (CI);
  mixed         prompts whose candidates are partly right;
  pair_accuracy, top_right, kendall_tau
                the ranking against oracle correctness
                (`diagnostics.ranking_vs_oracle`, over the mixed prompts);
  rows          judge rows per prompt; seconds: the scoring wall time
                (timings.json, from the run that scored it).

Writes pair_design.md, pair_design.csv and pair_design.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Mapping, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from purld_jax import diagnostics  # noqa: E402
from purld_jax import evaluate  # noqa: E402
from purld_jax import templates  # noqa: E402

SCHEME = "pairwise_judge"
COLUMNS = ("opponents", "rows", "seconds", "prompts", "tau_full",
           "tau_full_lo", "tau_full_hi", "best_same", "worst_same",
           "pair_same", "pair_same_lo", "pair_same_hi", "mixed",
           "pair_accuracy",
           "top_right", "kendall_tau")


def score_name(opponents: int) -> str:
  return f"ref_pairs{opponents}_{SCHEME}"


def design_rows(scores: Mapping[int, np.ndarray], correct: np.ndarray | None,
                valid: np.ndarray) -> list[dict]:
  """One row per design from the candidates' scores.

  Args:
    scores: opponents -> f[B, K] scores of the same B prompts' K candidates;
      key 0 (every pair) is the reference.
    correct: f/bool[B, K] oracle correctness, or None.
    valid: bool[B] real prompts.

  Returns:
    dicts with COLUMNS' keys except rows and seconds.
  """
  if 0 not in scores:
    raise ValueError("the full design (opponents 0) is the reference: "
                     "list it")
  valid = np.asarray(valid, bool)
  full = np.asarray(scores[0], np.float64)[valid]
  out = []
  for n in sorted(scores):
    s = np.asarray(scores[n], np.float64)[valid]
    tau = diagnostics.kendall_tau_rows(s, full)
    tau = tau[np.isfinite(tau)]
    best = s.argmax(-1) == full.argmax(-1)
    worst = s.argmin(-1) == full.argmin(-1)
    both = (best & worst).astype(np.float64)
    row = dict(opponents=n, prompts=int(valid.sum()),
               tau_full=float(tau.mean()) if len(tau) else np.nan,
               best_same=float(best.mean()), worst_same=float(worst.mean()),
               pair_same=float(both.mean()))
    row["tau_full_lo"], row["tau_full_hi"] = (
        evaluate.bootstrap_ci(tau) if len(tau) else (np.nan, np.nan))
    row["pair_same_lo"], row["pair_same_hi"] = evaluate.bootstrap_ci(both)
    if correct is not None:
      agree = diagnostics.ranking_vs_oracle(s, np.asarray(correct)[valid])
      tau_o = diagnostics.kendall_tau_rows(s, np.asarray(correct)[valid])
      tau_o = tau_o[np.isfinite(tau_o)]
      row.update(mixed=int(round(agree["mixed_groups"] * len(s))),
                 pair_accuracy=agree["pair_accuracy"],
                 top_right=agree["top_right"],
                 kendall_tau=float(tau_o.mean()) if len(tau_o) else np.nan)
    out.append(row)
  return out


def _fmt(x, digits=2):
  return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else (
      f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def table(rows: Sequence[dict], members: int) -> str:
  body = [[("all" if r["opponents"] == 0 else r["opponents"]), r["rows"],
           _fmt(r.get("seconds"), 0),
           f"{_fmt(r['tau_full'])} [{_fmt(r['tau_full_lo'])}, "
           f"{_fmt(r['tau_full_hi'])}]", _fmt(r["best_same"]),
           _fmt(r["worst_same"]),
           f"{_fmt(r['pair_same'])} [{_fmt(r['pair_same_lo'])}, "
           f"{_fmt(r['pair_same_hi'])}]", r.get("mixed", "n/a"),
           _fmt(r.get("pair_accuracy")),
           _fmt(r.get("top_right")), _fmt(r.get("kendall_tau"))]
          for r in rows]
  return common.markdown_table(body, (
      f"opponents (of {members - 1})", "judge rows / prompt",
      "scoring s", "tau vs all pairs [95 % CI]", "same best", "same worst",
      "same DPO pair [95 % CI]", "prompts partly right",
      "oracle pair acc.", "oracle top right",
      "oracle tau"))


def plot(rows: Sequence[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = sorted(rows, key=lambda r: r["rows"])
  x = [r["rows"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))
  lo = [r["tau_full"] - r["tau_full_lo"] for r in rows]
  hi = [r["tau_full_hi"] - r["tau_full"] for r in rows]
  ax.errorbar(x, [r["tau_full"] for r in rows], yerr=[lo, hi], marker="o",
              capsize=3, label="tau vs all pairs")
  ax.plot(x, [r["pair_same"] for r in rows], marker="s",
          label="same DPO pair (share)")
  if all(r.get("pair_accuracy") is not None for r in rows):
    ax.plot(x, [r["pair_accuracy"] for r in rows], marker="^",
            label="oracle pair accuracy")
  ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="oracle chance")
  ax.set_xlabel("judge rows per prompt")
  ax.set_ylim(0, 1.05)
  ax.set_title("pairwise_judge: sparse pair designs vs every pair")
  ax.legend(loc="lower right")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0] + " (see the module docstring).",
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdir", help="a run's workdir: its rollouts/ store and "
                 "reference/ model")
  p.add_argument("--opponents", default="0,2,4,8",
                 help="designs to score, comma separated (0 = every pair, "
                 "required)")
  p.add_argument("--steps", default="",
                 help="stored steps to re-score (default every step)")
  p.add_argument("--out", required=True, help="output folder")
  a = p.parse_args(argv)
  opponents = sorted({int(x) for x in a.opponents.split(",") if x})
  if 0 not in opponents:
    p.error("--opponents must include 0 (every pair: the reference)")
  from experiments import ablation  # pylint: disable=g-import-not-at-top
  from experiments import rerank  # pylint: disable=g-import-not-at-top
  from purld_jax import rollout_store  # pylint: disable=g-import-not-at-top
  cfg = ablation.cell_config(a.workdir)
  if cfg is None:
    p.error(f"{a.workdir}: no config.json (not a run's workdir)")
  store = rollout_store.RolloutStore.open(ablation.store_path(a.workdir, cfg))
  steps = ([int(x) for x in a.steps.split(",") if x] if a.steps
           else store.steps())
  missing = sorted(set(steps) - set(store.steps()))
  if missing:
    p.error(f"--steps: {missing} not in {store.path} (has {store.steps()})")
  os.makedirs(a.out, exist_ok=True)
  timing_path = os.path.join(a.out, "timings.json")
  timings = {}
  if os.path.exists(timing_path):
    with open(timing_path, encoding="utf-8") as f:
      timings = json.load(f)
  todo = [n for n in opponents
          if any(score_name(n) not in store.schemes(s) for s in steps)]
  if todo:
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from purld_jax import models  # pylint: disable=g-import-not-at-top
    model, tok = models.load_pretrained(
        os.path.join(a.workdir, "reference"), dtype=jnp.float32)
    kwargs = ablation.scoring_kwargs(cfg)
    kwargs.pop("pair_opponents")  # each design sets its own
    for n in todo:
      t0 = time.perf_counter()
      rerank.rerank(store, model, tok, [SCHEME], prefix=f"ref_pairs{n}_",
                    steps=steps, pair_opponents=n, **kwargs)
      timings[str(n)] = time.perf_counter() - t0
      print(f"[pair_design] opponents {n}: {timings[str(n)]:.0f} s",
            file=sys.stderr)
      with open(timing_path, "w", encoding="utf-8") as f:
        json.dump(timings, f, indent=1)
  rolls = list(store.iter(steps))
  cat = lambda f: np.concatenate([f(x) for x in rolls])
  scores = {n: cat(lambda x, n=n: x.scores[score_name(n)]) for n in opponents}
  correct = (cat(lambda x: x.correct)
             if all(x.correct is not None for x in rolls) else None)
  members = scores[0].shape[1] + 1
  rows = design_rows(scores, correct, cat(lambda x: x.valid))
  for row in rows:
    row["rows"] = int(templates.pair_design(members, row["opponents"]).sum())
    row["seconds"] = timings.get(str(row["opponents"]))
  common.write_csv(os.path.join(a.out, "pair_design.csv"), rows, COLUMNS)
  command = ("python -m experiments.pair_design "
             + " ".join(argv if argv is not None else sys.argv[1:]))
  head = (f"# pairwise_judge: sparse pair designs\n\n`{command}`\n\n"
          "Seconds: the scoring wall time (2-core CPU here). "
          f"`{a.workdir}`, steps "
          f"{steps}: {rows[0]['prompts']} prompts x {members - 1} candidates "
          f"+ the anchor, scored by the cell's reference.\n\n")
  with open(os.path.join(a.out, "pair_design.md"), "w",
            encoding="utf-8") as f:
    f.write(head + table(rows, members) + "\n")
  plot(rows, os.path.join(a.out, "pair_design.png"))
  print(table(rows, members))
  return rows


if __name__ == "__main__":
  main()
