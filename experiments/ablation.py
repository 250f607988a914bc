r"""Ablations under the study protocol: group size K x ranking scheme.

  python -m experiments.ablation                 # (a) pool + (b) K in {2,4,8,16}, PU-RLD DPO
  python -m experiments.ablation --part=pool     # (a) only: no training
  python -m experiments.ablation --split=dev --seeds=0 --ks=2,8 \
      --schemes=anchor_recon,pmi --losses=purld_dpo,purld_ldl
  python -m experiments.ablation --dry_run       # the cells, nothing run

(a) pool: one candidate pool per prompt, so the schemes and the K are
compared on the same candidates. Cell pool_k<K_max>_s<seed> samples K_max
(--k_max) candidates for --pool_steps x rl.batch_size training prompts
from the seed's SFT model (a PU-RL run at learning rate 0, so every step
samples from the reference; its rollout store keeps the pools). The
reference re-scores them with every scheme of --schemes and the oracle
(experiments/rerank.py; resumable), and each K of --ks is sub-sampled from
the pool with every --subsample_seeds seed. Per scheme x K, on the prompts
with both right and wrong candidates: the share of (right, wrong) pairs the
scheme orders right (pair accuracy), the top-scored candidate right, the
Kendall tau of scores vs correctness. pairwise_judge scores (K+1) K pairs a
prompt: name it with --k_max=8 on a CPU.

(b) train: the ladder's cells (experiments/ladder.py), one per loss rung
(--losses) x scheme x K x seed, named <rung>_k<K>_<scheme>_s<seed> and
trained from sft_s<seed>; at the protocol's own K (4) and scheme
(anchor_recon) the cell is the main table's <rung>_s<seed>, run once for
both. Each row: sampled pass@1, its gain over SFT paired by seed and
prompt (95 % interval over seeds and prompts), greedy gain beside it.

Cells and answers.json are the ladder study's folder (--out, default
experiments/ladder/<scale>_<split>); this study writes ablation_pool.md/.csv,
kendall_tau.png, ablation_train.md/.csv and ablation_k.png there. Cost on a
2-core CPU: a (b) cell about 45 min (eval split), the pool and its
re-scoring about 30 min; 4 K x 3 seeds of one loss = 9 h: run seed by seed
(--seeds=0), each finished cell is kept.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from experiments import analysis  # noqa: E402
from experiments import common  # noqa: E402
from experiments import ladder  # noqa: E402
from experiments import pool as pool_lib  # noqa: E402

# configs/arith.py's K and the ladder's scheme: a (b) cell with both is the
# main table's cell (tests/test_ablation.py checks the config).
PROTOCOL_K, PROTOCOL_SCHEME = 4, "anchor_recon"


# ----------------------------------------------------------------------------
# (b) K x scheme x loss, trained


def tag(k: int, scheme: str) -> str:
  """The ladder tag of a (b) cell: none at the protocol's K and scheme."""
  return "" if (k, scheme) == (PROTOCOL_K, PROTOCOL_SCHEME) \
      else f"_k{k}_{scheme}"


def train_cells(scale: str, split: str, ks, schemes, losses, seeds, *,
                extra: Mapping[str, Any] = (), train: Mapping[str, Any] = (),
                config: str = ladder.ARITH) -> list[common.Cell]:
  """The seeds' SFT cells, then loss x scheme x K x seed (ladder.cells)."""
  out: dict[str, common.Cell] = {}
  for k in ks:
    for scheme in schemes:
      more = {} if k == PROTOCOL_K else {"sampling.num_candidates": k}
      for c in ladder.cells(losses, seeds, scale=scale, split=split,
                            scheme=scheme, extra=extra,
                            train={**more, **dict(train)}, tag=tag(k, scheme),
                            config=config):
        out.setdefault(c.name, c)
  return list(out.values())


TRAIN_FIELDS = ("rung", "scheme", "k", "status", "seeds", "prompts",
                "accuracy", "accuracy_lo", "accuracy_hi", "gain", "gain_lo",
                "gain_hi", "greedy_gain", "greedy_gain_lo", "greedy_gain_hi")


def train_rows(runner: common.Runner, out: str, ks, schemes, losses,
               seeds) -> list[dict]:
  """One row per loss x scheme x K: the finished cells' answers (added to
  answers.json), sampled pass@1 and the gains over SFT (ladder.rows)."""
  got = []
  for rung in losses:
    for scheme in schemes:
      for k in ks:
        data = analysis.compact(runner, out, ["sft", rung], seeds, tag(k, scheme))
        row = dict(rung=rung, scheme=scheme, k=k, status="not run", seeds=0)
        for metric in ("sampled", "greedy"):
          r = ladder.rows(data, ["sft", rung], seeds, tag(k, scheme),
                          metric)[1]
          if r["status"] != "done" or "gain" not in r:
            continue
          pre = "" if metric == "sampled" else "greedy_"
          row.update({f"{pre}gain": r["gain"], f"{pre}gain_lo": r["gain_lo"],
                      f"{pre}gain_hi": r["gain_hi"]})
          if metric == "sampled" or row["status"] != "done":
            row.update(status="done", seeds=r["paired_seeds"],
                       prompts=r["prompts"], accuracy=r["accuracy"],
                       accuracy_lo=r["accuracy_lo"],
                       accuracy_hi=r["accuracy_hi"])
        got.append(row)
  return got


def train_markdown(rows: Sequence[dict]) -> str:
  def gain(r, pre=""):
    return analysis.gain_text(dict(gain=r[pre + "gain"],
                                 gain_lo=r[pre + "gain_lo"],
                                 gain_hi=r[pre + "gain_hi"]),
                            bold_significant=True) if pre + "gain" in r else ""
  body = [[ladder.RUNGS[r["rung"]][0], r["scheme"], r["k"],
           "not run" if r["status"] != "done" else
           f"{100 * r['accuracy']:.1f} [{100 * r['accuracy_lo']:.1f}, "
           f"{100 * r['accuracy_hi']:.1f}]", gain(r), gain(r, "greedy_"),
           r["seeds"]] for r in rows]
  return analysis.markdown_table(body, [
      "loss", "scheme", "K", "sampled pass@1 % [95 % CI]",
      "gain vs SFT, pt", "greedy gain vs SFT, pt", "seeds"])


def k_plot(train: Sequence[dict], pool: Sequence[dict], path: str) -> None:
  """Gain over SFT vs K per scheme x loss (95 % bands), and beside it the
  pool's pair accuracy vs K per scheme."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  done = [r for r in train if r["status"] == "done"]
  agree = [r for r in pool if r["scheme"] != "oracle"
           and np.isfinite(r["pair_accuracy"])]  # NaN: no mixed prompt
  if not done and not agree:
    return
  panels = [p for p, rows in (("train", done), ("pool", agree)) if rows]
  fig, axs = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4),
                          squeeze=False)
  axes = dict(zip(panels, axs[0]))
  colors = {s: plt.cm.tab10(i) for i, s in enumerate(pool_lib.SCHEMES)}
  for (rung, scheme) in dict.fromkeys((r["rung"], r["scheme"]) for r in done):
    pts = sorted((r["k"], r["gain"], r["gain_lo"], r["gain_hi"]) for r in done
                 if (r["rung"], r["scheme"]) == (rung, scheme))
    k, v, lo, hi = (np.array(x, np.float64) for x in zip(*pts))
    line, = axes["train"].plot(k, 100 * v, "-o", color=colors.get(scheme),
                               label=f"{rung} {scheme}")
    axes["train"].fill_between(k, 100 * lo, 100 * hi, alpha=0.2,
                               color=line.get_color())
  if done:
    axes["train"].axhline(0, lw=1, color="k")
    axes["train"].set_ylabel("sampled pass@1 gain over SFT (pt), 95 % CI")
    axes["train"].set_title("(b) trained")
  for scheme in dict.fromkeys(r["scheme"] for r in agree):
    pts = sorted((r["k"], r["pair_accuracy"]) for r in agree
                 if r["scheme"] == scheme)
    axes["pool"].plot(*zip(*pts), "-o", color=colors.get(scheme),
                      label=scheme)
  if agree:
    axes["pool"].axhline(0.5, ls="--", lw=1, color="k")
    axes["pool"].set_ylabel("pair accuracy vs the verifier (mixed prompts)")
    axes["pool"].set_title("(a) one pool, re-ranked (chance 0.5)")
  for ax in axes.values():
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (candidates per prompt)")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
  return [x for x in text.split(",") if x]


def parse_args(argv):
  p = ladder.study_parser("ablation", __doc__, scheme=False, tag="")
  p.add_argument("--part", choices=("all", "pool", "train"), default="all")
  p.add_argument("--ks", default="2,4,8,16")
  p.add_argument("--schemes", default="", help="default: (a) every scheme "
                 "but pairwise_judge; (b) anchor_recon")
  p.add_argument("--losses", default="purld_dpo",
                 help=f"(b): comma list of {', '.join(ladder.SELF_RANKING)}")
  p.add_argument("--k_max", type=int, default=16, help="(a) pool size")
  p.add_argument("--pool_steps", type=int, default=4)
  p.add_argument("--pairwise_steps", type=int, default=1)
  p.add_argument("--subsample_seeds", default="0,1,2,3,4")
  a = ladder.study_args(p, argv)
  try:
    a.ks, a.subsample_seeds = _ints(a.ks), _ints(a.subsample_seeds)
  except ValueError as e:
    p.error(f"--ks/--subsample_seeds: comma lists of integers ({e})")
  a.losses = _names(a.losses)
  if bad := [x for x in a.losses if x not in ladder.SELF_RANKING]:
    p.error(f"--losses: unknown {bad} (known: "
            f"{', '.join(ladder.SELF_RANKING)})")
  a.schemes = _names(a.schemes)
  if bad := [s for s in a.schemes if s not in pool_lib.SCHEMES]:
    p.error(f"--schemes: unknown {bad} "
            f"(known: {', '.join(pool_lib.SCHEMES)})")
  if a.part != "train" and max(a.ks) > a.k_max:
    p.error(f"--ks {a.ks}: above --k_max {a.k_max}")
  return a


def main(argv=None, *, runner: common.Runner | None = None) -> dict:
  """{"pool": grid, "train": rows} of the parts run."""
  argv = sys.argv[1:] if argv is None else argv
  a = parse_args(argv)
  extra, train = a.extra, a.train
  runner = runner or common.Runner(a.out)
  seeds = a.seeds if a.part != "pool" else a.seeds[:1]
  study = ladder.cells([], seeds, scale=a.scale, split=a.split, extra=extra,
                       config=a.config)
  pool = pool_lib.pool_cell(a.scale, a.seeds[0], k_max=a.k_max,
                            steps=a.pool_steps, config=a.config,
                            extra=extra)
  if a.part != "train":
    study.append(pool)
  if a.part != "pool":
    study += [c for c in train_cells(
        a.scale, a.split, a.ks, a.schemes or [PROTOCOL_SCHEME], a.losses,
        a.seeds, extra=extra, train=train, config=a.config) if c.name not in
        {s.name for s in study}]
  if a.dry_run:
    runner.dry_run(study)
    return {}
  os.makedirs(a.out, exist_ok=True)
  statuses = runner.run_all(study)
  head = (f"`python -m experiments.ablation {' '.join(argv)}`\n\nCells: "
          f"{json.dumps(statuses)}.\n\n")
  got = {}
  if a.part != "train" and runner.is_done(pool):
    got["pool"] = pool_lib.report(
        runner, pool, a.out, head,
        schemes=a.schemes or list(pool_lib.DEFAULT_POOL), ks=a.ks,
        seeds=a.subsample_seeds, pairwise_steps=a.pairwise_steps)
  if a.part != "pool":
    rows = train_rows(runner, a.out, a.ks, a.schemes or [PROTOCOL_SCHEME],
                      a.losses, a.seeds)
    analysis.write_csv(os.path.join(a.out, "ablation_train.csv"), rows,
                     TRAIN_FIELDS)
    text = head + ("## (b) K x scheme x loss, trained\n\n"
                   + train_markdown(rows) + "\n")
    with open(os.path.join(a.out, "ablation_train.md"), "w",
              encoding="utf-8") as f:
      f.write(text)
    print(text)
    got["train"] = rows
  if got:
    k_plot(got.get("train", []), got.get("pool", []),
           os.path.join(a.out, "ablation_k.png"))
  return got


if __name__ == "__main__":
  main()
