r"""The K x scheme (x loss) ablation: ranking agreement and a training grid.

  python -m experiments.ablation --scale=small                  # both parts
  python -m experiments.ablation --scale=small --part=agreement # the cheap one
  python -m experiments.ablation --scale=small --full --dry_run # every cell
  python -m experiments.ablation --scale=tiny --out=/tmp/abl    # seconds

(a) Agreement, the fair and cheap part: ONE candidate pool per prompt,
K_max = --k_max (16) candidates of --pool_prompts x --pool_steps prompts,
sampled by the shared SFT reference (cell `pool`: a PU-RL run at
opt.learning_rate = 0, so every step samples from the reference, whose
rollout store keeps the pools: purld_jax/rollout_store.py), re-scored by the
reference with every scheme of --schemes (experiments/rerank.py, resumable;
`oracle` too, as a check) and sub-sampled to each K of --ks with every seed
of --subsample_seeds. Per scheme x K: the share of prompts with both right
and wrong candidates (mixed), and on those the share of (right, wrong) pairs
ordered right (pair accuracy), the top-scored candidate right (top-1), the
mean Kendall tau-b of scores vs correctness. pairwise_judge scores
(K+1) K pairs per prompt (272 at K = 16, about 2 h per pool step on a
2-core CPU), so it is not in the default --schemes; named, it is scored on
the first --pairwise_steps steps only (its `steps` column says how many);
--k_max=8 --schemes=pairwise_judge,... takes about 17 min here.

(b) Training grid: K x scheme x loss (dpo | grpo | ldl, the PU-RLD rows of
experiments/main_table.py) x --seeds, one cell each from the shared SFT
reference, held-out accuracy with CIs and the gain over SFT (paired), and
the oracle agreement the run logged during training (metrics.jsonl).
Default: K in {4, 8} x {anchor_recon, pmi, similarity} x ldl, seed 0 (6
cells; LDL is the loss on which the schemes separate at small scale:
experiments/README.md); with part (a) and the SFT cell within an hour on
this 2-core CPU (experiments/README.md, "Cost"). --full: K in
{2, 4, 8, 16} x {judge, pmi, anchor_recon, pairwise_judge, similarity} x
{dpo, grpo, ldl} = 60 cells per seed, 10-20 h per seed here (K = 16 and
pairwise_judge dominate): for a GPU host. `python -m experiments.grid`
merges several studies' part (b) into one K x scheme table per loss.

Small scale = configs/demo.py (SmolLM2-135M, arithmetic, SIMULATED dataset
teacher). --reference_from=DIR reuses a finished `sft` cell of another study
(e.g. experiments/main_table/small/cells/sft): its folder is linked in.

Outputs in --out (default experiments/ablation/<scale>): table.md (both
parts: table_agreement.md and table_training.md joined, each written by
the last call that ran its part, with that call's command), agreement.csv
(per scheme x K, mean and sd over sub-sampling seeds), agreement_rows.csv
(per seed), kendall_tau.png (heatmap scheme x K),
training.csv, training.png, k_trend.png (gain over SFT vs K per scheme x
loss, beside the pool's pair accuracy vs K), cells/ and cells.jsonl. Re-running skips
finished cells and stored scores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Mapping, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from experiments import main_table  # noqa: E402

POOL = "pool"
PREFIX = "ref_"  # stored as scores/ref_<scheme>: scored by the reference
SCHEMES = ("judge", "pmi", "anchor_recon", "pairwise_judge", "similarity",
           "self_reward")
LOSSES = ("dpo", "grpo", "ldl")
DEFAULT_TRAIN = dict(ks=(4, 8), schemes=("anchor_recon", "pmi",
                                         "similarity"), losses=("ldl",))
# Part (a) by default: every scheme but pairwise_judge (quadratic in K_max).
DEFAULT_AGREEMENT = tuple(s for s in SCHEMES if s != "pairwise_judge")
FULL_TRAIN = dict(ks=(2, 4, 8, 16), schemes=SCHEMES[:5], losses=LOSSES)
METRICS = ("sample_accuracy", "mixed_groups", "top_right", "pair_accuracy",
           "kendall_tau")


# ----------------------------------------------------------------------------
# (a) Agreement on one stored pool


def pool_cell(scale: str, *, k_max: int, prompts: int, steps: int,
              extra=()) -> common.Cell:
  """A PU-RL run whose rollout store is the pool: lr 0 (every step samples
  from the reference), no held-out evaluation; done at its last step."""
  config, over = main_table.base(scale)
  over.update({"recipe": "dpo", "sampling.num_candidates": k_max,
               "rl.steps": steps, "rl.batch_size": prompts,
               "opt.learning_rate": 0.0, "data.eval_path": "",
               "rollout_store.enabled": True, **dict(extra)})
  return common.Cell(POOL, config, over, reference=main_table.REFERENCE,
                     done=os.path.join("rollouts", f"step_{steps:08d}",
                                       "meta.json"))


def cell_config(workdir: str) -> dict | None:
  """The cell's config.json (what main.py ran with), or None without one."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def store_path(workdir: str, cfg: Mapping[str, Any]) -> str:
  """The cell's rollout store: config `rollout_store.dir`, relative to the
  workdir (os.path.join keeps an absolute one as it is)."""
  return os.path.join(workdir, cfg.get("rollout_store", {}).get(
      "dir", "rollouts"))


def scoring_kwargs(cfg: Mapping[str, Any]) -> dict:
  """`self_scoring.score_group` keyword arguments from a cell's config.json:
  its ranking settings, so a re-scoring ranks as the cell did."""
  r = cfg["ranking"]
  return dict(yes_word=r["yes_word"], no_word=r["no_word"],
              aggregation=r["aggregation"], bt_iters=r["bt_iters"],
              bt_prior=r["bt_prior"], metric=r["metric"],
              pair_opponents=r.get("pair_opponents", 0),
              rows_per_call=r["rows_per_call"],
              pad_multiple=r["pad_multiple"],
              vocab_chunk=cfg["model"]["vocab_chunk"] or None)


def score_pool(workdir: str, schemes: Sequence[str], *,
               pairwise_steps: int) -> list[tuple[int, str]]:
  """Re-scores the pool's steps with every scheme (and oracle) by the
  reference, with the cell's ranking settings; resumable."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import rerank  # pylint: disable=g-import-not-at-top
  from purld_jax import models  # pylint: disable=g-import-not-at-top
  from purld_jax import rollout_store  # pylint: disable=g-import-not-at-top
  cfg = cell_config(workdir)
  store = rollout_store.RolloutStore.open(store_path(workdir, cfg))
  steps = store.steps()
  todo = {s: [x for x in list(schemes) + ["oracle"]
              if PREFIX + x not in store.schemes(s)] for s in steps}
  if not any(todo.values()):
    return []
  model, tok = models.load_pretrained(os.path.join(workdir, "reference"),
                                      dtype=jnp.float32)
  kwargs = scoring_kwargs(cfg)
  done = []
  for scheme in list(schemes) + ["oracle"]:
    use = steps[:pairwise_steps] if scheme == "pairwise_judge" else steps
    t0 = time.perf_counter()
    done += rerank.rerank(store, model, tok, [scheme], prefix=PREFIX,
                          steps=use, **kwargs)
    print(f"[ablation] {scheme}: scored in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
  return done


def agreement(workdir: str, schemes: Sequence[str], ks: Sequence[int],
              seeds: Sequence[int]) -> tuple[list[dict], list[dict]]:
  """(per-seed rows, per scheme x K rows: mean and sd over seeds)."""
  from experiments import rerank  # pylint: disable=g-import-not-at-top
  from purld_jax import rollout_store  # pylint: disable=g-import-not-at-top
  store = rollout_store.RolloutStore.open(
      store_path(workdir, cell_config(workdir)))
  names = [PREFIX + s for s in list(schemes) + ["oracle"]]
  per_seed = rerank.agreement_table(store, names, ks, seeds)
  for r in per_seed:
    r["scheme"] = r["scheme"].removeprefix(PREFIX)
  grid = []
  for scheme in list(schemes) + ["oracle"]:
    for k in ks:
      rs = [r for r in per_seed if r["scheme"] == scheme and r["k"] == k]
      if not rs:
        continue
      row = dict(scheme=scheme, k=k, seeds=len(rs), steps=rs[0]["steps"],
                 prompts=rs[0]["prompts"])
      for m in METRICS:
        v = np.array([r[m] for r in rs], np.float64)
        v = v[np.isfinite(v)]
        row[m] = float(v.mean()) if len(v) else float("nan")
        row[f"{m}_sd"] = float(v.std()) if len(v) > 1 else float("nan")
      grid.append(row)
  return per_seed, grid


def _f(x, fmt="{:.3f}") -> str:
  return "n/a" if x is None or not np.isfinite(x) else fmt.format(x)


def agreement_markdown(grid: Sequence[dict]) -> str:
  body = [[r["scheme"], r["k"], r["prompts"], r["steps"],
           _f(r["mixed_groups"]), _f(r["pair_accuracy"]), _f(r["top_right"]),
           f"{_f(r['kendall_tau'])} ± {_f(r['kendall_tau_sd'])}"]
          for r in grid]
  return common.markdown_table(body, [
      "scheme", "K", "prompts", "pool steps", "mixed share", "pair accuracy",
      "top-1 right", "Kendall tau (± sd over seeds)"])


def heatmap(grid: Sequence[dict], path: str, metric: str = "kendall_tau"):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  schemes = list(dict.fromkeys(r["scheme"] for r in grid))
  ks = sorted({r["k"] for r in grid})
  z = np.full((len(schemes), len(ks)), np.nan)
  for r in grid:
    z[schemes.index(r["scheme"]), ks.index(r["k"])] = r[metric]
  fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(ks), 1 + 0.5 * len(schemes)))
  im = ax.imshow(z, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
  for i in range(len(schemes)):
    for j in range(len(ks)):
      ax.text(j, i, _f(z[i, j], "{:.2f}"), ha="center", va="center",
              fontsize=8)
  ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
  ax.set_yticks(range(len(schemes)), schemes)
  ax.set_title(f"{metric} vs oracle (mixed prompts)")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------
# (b) Training grid


def train_name(k: int, scheme: str, loss: str, seed: int) -> str:
  return f"k{k}_{scheme}_{loss}_s{seed}"


def train_cells(scale: str, ks, schemes, losses, seeds, *, extra=(),
                paper=()) -> list[common.Cell]:
  return [main_table.method_cell(
      train_name(k, scheme, loss, seed), main_table.BY_KEY[f"purld_{loss}"],
      scale, seed, more={"sampling.num_candidates": k,
                         "ranking.scheme": scheme}, extra=extra, paper=paper)
          for k in ks for scheme in schemes for loss in losses
          for seed in seeds]


LOGGED = ("oracle_mixed_groups", "oracle_top_right", "oracle_pair_accuracy",
          "score_std", "label_sharpness", "label_anchor_share")


def anchor_share(rollouts) -> float:
  """Mean over valid prompts of d's mass on the anchor, the label
  distribution's last member when it has K + 1 (LDL with
  `pu.include_anchor`); NaN when no rollout has one.

  rollouts: `rollout_store.Rollout`s (`preferences["label_dist"]` f32[B,
  K + 1], `valid` bool[B], `k`)."""
  mass = []
  for r in rollouts:
    d = r.preferences.get("label_dist")
    if d is not None and d.shape[1] == r.k + 1:
      mass.append(np.asarray(d)[np.asarray(r.valid, bool), -1])
  return float(np.concatenate(mass).mean()) if mass else float("nan")


def _logged(workdir: str) -> dict:
  """Means over the run's steps (metrics.jsonl) of its own ranking's oracle
  agreement, its score spread, and for LDL the label sharpness
  1 - H(d) / log m (0: d uniform over the m members, 1: one member) and
  the mass d puts on the anchor (`anchor_share`, from the rollout store)."""
  from purld_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  out = {}
  recs = metrics_lib.read(workdir)
  mean = lambda v: (float(v[np.isfinite(v)].mean()) if np.isfinite(v).any()
                    else float("nan"))
  for m in LOGGED[:4]:
    out[m] = mean(np.array([float(r[m]) for r in recs if m in r], np.float64))
  h = np.array([float(r["entropy_label"]) for r in recs
                if "entropy_label" in r], np.float64)
  out["label_sharpness"] = out["label_anchor_share"] = float("nan")
  cfg = cell_config(workdir)
  if not len(h) or cfg is None:
    return out
  m = cfg["sampling"]["num_candidates"] + bool(cfg["pu"]["include_anchor"])
  out["label_sharpness"] = 1.0 - mean(h) / np.log(m)
  store = store_path(workdir, cfg)
  if os.path.isdir(store):
    from purld_jax import rollout_store  # pylint: disable=g-import-not-at-top
    out["label_anchor_share"] = anchor_share(
        rollout_store.RolloutStore.open(store).iter())
  return out


LOGGED_FILE = "logged.json"


def logged_of(runner: common.Runner, name: str) -> dict:
  """`_logged` of finished cell `name`, computed once from its folder and
  stored in it as logged.json, which is kept (common.keep): the rollout
  store it reads is too large to keep. A kept copy alone answers from it."""
  folder = runner.results(name)
  path = os.path.join(folder, LOGGED_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return {m: float(v) for m, v in json.load(f).items()}
  out = _logged(folder)
  if folder == runner.workdir(name):
    with open(path, "w", encoding="utf-8") as f:
      json.dump(out, f)  # NaN is written as NaN, which json.load reads
    runner.keep(name)
  return out


_TRAIN_NAME = re.compile(r"^k(\d+)_(.+)_(" + "|".join(LOSSES) + r")_s(\d+)$")


def finished_training(runner: common.Runner) -> list[tuple[int, str, str, int]]:
  """(K, scheme, loss, seed) of every finished training cell in the study's
  folder (cells/ or kept/), whichever call ran it."""
  names = set()
  for sub in (common.CELLS, common.KEPT):
    root = os.path.join(runner.study_dir, sub)
    names.update(os.listdir(root) if os.path.isdir(root) else ())
  out = []
  for name in sorted(names):
    m = _TRAIN_NAME.match(name)
    if m and runner.is_done(common.Cell(name, "")):
      out.append((int(m[1]), m[2], m[3], int(m[4])))
  return out


def grid_order(scheme: str, loss: str) -> tuple:
  """Sort key: schemes and losses in SCHEMES / LOSSES order, others after."""
  rank = lambda x, xs: (xs.index(x), x) if x in xs else (len(xs), x)
  return rank(scheme, SCHEMES), rank(loss, LOSSES)


def training_rows(runner, ks, schemes, losses, seeds) -> list[dict]:
  """The SFT reference, then one row per K x scheme x loss: the requested
  ones (a row 'not run' where no seed finished) and every other finished
  cell in the study's folder, so a call that runs a few more cells still
  reports the whole grid. Each row averages the seeds that finished."""
  groups: dict[tuple[int, str, str], set[int]] = {
      (k, s, l): set(seeds) for k in ks for s in schemes for l in losses}
  for k, s, l, seed in finished_training(runner):
    groups.setdefault((k, s, l), set()).add(seed)
  sft = main_table.cell_answers(runner, main_table.REFERENCE, "sft")
  rows = [dict(method="sft_only", k="", scheme="", loss="SFT reference",
               **main_table.accuracy_row(runner, [main_table.REFERENCE],
                                         model="sft"))]
  for (k, scheme, loss) in sorted(groups, key=lambda g: (g[0],
                                                         *grid_order(*g[1:]))):
    names = [train_name(k, scheme, loss, s) for s in sorted(groups[
        (k, scheme, loss)])]
    row = dict(method=f"K{k}/{scheme}/{loss}", k=k, scheme=scheme,
               loss=loss, **main_table.accuracy_row(runner, names, sft=sft))
    logged = [logged_of(runner, n) for n in names
              if runner.is_done(common.Cell(n, ""))]
    for m in LOGGED:
      v = [x[m] for x in logged if np.isfinite(x[m])]
      row[m] = float(np.mean(v)) if v else float("nan")
    rows.append(row)
  return rows


TRAIN_FIELDS = ("method", "k", "scheme", "loss", "status", "seeds",
                "prompts", "accuracy", "accuracy_lo", "accuracy_hi", "gain",
                "gain_lo", "gain_hi") + LOGGED + ("wall_s",)


def training_markdown(rows: Sequence[dict]) -> str:
  body = []
  for r in rows:
    if r["status"] != "done":
      body.append([r["k"], r["scheme"], r["loss"], r["status"]] + [""] * 8)
      continue
    pct = lambda x: _f(100 * x, "{:.1f}")
    gain = common.gain_text(r) if "gain" in r else "(reference)"
    body.append([r["k"], r["scheme"], r["loss"], r["seeds"],
                 f"{pct(r['accuracy'])} [{pct(r['accuracy_lo'])}, "
                 f"{pct(r['accuracy_hi'])}]", gain,
                 _f(r.get("oracle_top_right", np.nan)),
                 _f(r.get("oracle_pair_accuracy", np.nan)),
                 _f(r.get("score_std", np.nan)),
                 _f(r.get("label_sharpness", np.nan), "{:.2f}"),
                 _f(r.get("label_anchor_share", np.nan), "{:.2f}"),
                 _f(r["wall_s"], "{:.0f}")])
  return common.markdown_table(body, [
      "K", "scheme", "loss", "seeds", "accuracy % [95% CI]",
      "gain vs SFT, pt [paired 95% CI]", "logged top-1 right",
      "logged pair accuracy", "logged score sd", "LDL label sharpness",
      "LDL d on anchor", "wall time (s)"])


# ----------------------------------------------------------------------------
# Command line


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def _names(text: str) -> list[str]:
  return [x for x in text.split(",") if x]


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m experiments.ablation",
                              description=__doc__.split("\n")[0])
  p.add_argument("--scale", choices=("tiny", "small", "paper"),
                 default="small")
  p.add_argument("--part", choices=("all", "agreement", "training"),
                 default="all")
  p.add_argument("--out", default="")
  p.add_argument("--override", action="append", default=[],
                 help="KEY=VALUE for every cell (repeatable)")
  p.add_argument("--train_override", action="append", default=[],
                 help="KEY=VALUE for the training cells only (repeatable): "
                 "ablate a PU-RL knob from an unchanged SFT reference, e.g. "
                 "--train_override=pu.include_anchor=False; give it its own "
                 "--out, since a cell's name does not say it")
  p.add_argument("--dry_run", action="store_true")
  p.add_argument("--reference_from", default="",
                 help="a finished `sft` cell folder of another study")
  p.add_argument("--k_max", type=int, default=16, help="pool size")
  p.add_argument("--pool_prompts", type=int, default=16)
  p.add_argument("--pool_steps", type=int, default=2)
  p.add_argument("--pairwise_steps", type=int, default=1)
  p.add_argument("--ks", default="2,4,8,16", help="agreement: sub-sampled K")
  p.add_argument("--schemes", default=",".join(DEFAULT_AGREEMENT),
                 help="agreement: the schemes that re-score the pool; add "
                 "pairwise_judge by name (with --k_max=8 on a CPU)")
  p.add_argument("--subsample_seeds", default="0,1,2,3,4")
  p.add_argument("--full", action="store_true", help="the whole training "
                 "grid (else the documented default subset)")
  p.add_argument("--train_ks", default="")
  p.add_argument("--train_schemes", default="")
  p.add_argument("--losses", default="")
  p.add_argument("--seeds", default="0", help="training: config.seed")
  a = p.parse_args(argv)
  grid = FULL_TRAIN if a.full else DEFAULT_TRAIN
  a.train_ks = _ints(a.train_ks) or list(grid["ks"])
  a.train_schemes = _names(a.train_schemes) or list(grid["schemes"])
  a.losses = _names(a.losses) or list(grid["losses"])
  a.ks, a.seeds = _ints(a.ks), _ints(a.seeds)
  a.subsample_seeds = _ints(a.subsample_seeds)
  a.schemes = _names(a.schemes)
  if a.scale == "paper" and not a.dry_run:
    p.error("--scale=paper: only --dry_run here (GPU/TPU host)")
  if max(a.ks) > a.k_max:
    p.error(f"--ks {a.ks}: above --k_max {a.k_max}")
  a.out = a.out or os.path.join(_ROOT, "experiments", "ablation", a.scale)
  return a


def main(argv=None, *, runner: common.Runner | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  a = parse_args(argv)
  extra = common.parse_overrides(a.override)
  train_extra = {**extra, **common.parse_overrides(a.train_override)}
  runner = runner or common.Runner(a.out)
  ref = main_table.reference_cell(a.scale, extra=extra)
  study = [ref]
  if a.part in ("all", "agreement"):
    study.append(pool_cell(a.scale, k_max=a.k_max, prompts=a.pool_prompts,
                           steps=a.pool_steps, extra=extra))
  train = []
  if a.part in ("all", "training"):
    train = train_cells(a.scale, a.train_ks, a.train_schemes, a.losses,
                        a.seeds, extra=train_extra)
  if a.dry_run:
    runner.dry_run(study + train)
    if a.part != "training":
      print(f"# then: re-score cell {POOL}'s rollout store with "
            f"{a.schemes} + oracle (pairwise_judge on {a.pairwise_steps} "
            f"step(s)), agreement for K in {a.ks} x sub-sampling seeds "
            f"{a.subsample_seeds}")
    return {}
  if a.reference_from and not os.path.lexists(runner.workdir(ref.name)):
    os.makedirs(os.path.dirname(runner.workdir(ref.name)), exist_ok=True)
    os.symlink(os.path.abspath(a.reference_from), runner.workdir(ref.name))
  statuses = runner.run_all(study + train)
  os.makedirs(a.out, exist_ok=True)
  head = (f"`python -m experiments.ablation {' '.join(argv)}`\n\nCells: "
          f"{json.dumps(statuses)}.\n\n")
  lost = runner.lost()
  if lost:
    note = (f"Not in this table: {', '.join(lost)}: cells.jsonl records them "
            "as done, but neither their folder nor a kept copy is here.")
    print(f"[ablation] {note}", file=sys.stderr)
    head += f"{note}\n\n"
  out = {}
  if a.part in ("all", "agreement") and runner.is_done(study[1]):
    t0 = time.perf_counter()
    score_pool(runner.workdir(POOL), a.schemes,
               pairwise_steps=a.pairwise_steps)
    per_seed, grid = agreement(runner.workdir(POOL), a.schemes, a.ks,
                               a.subsample_seeds)
    common.write_csv(os.path.join(a.out, "agreement_rows.csv"), per_seed,
                     ("scheme", "k", "seed", "steps", "prompts") + METRICS)
    common.write_csv(os.path.join(a.out, "agreement.csv"), grid,
                     ("scheme", "k", "seeds", "steps", "prompts") + METRICS
                     + tuple(f"{m}_sd" for m in METRICS))
    heatmap(grid, os.path.join(a.out, "kendall_tau.png"))
    write_section(a.out, "agreement", head +
        f"## (a) Self-ranking vs oracle on one pool (K_max = {a.k_max})\n\n"
        f"{a.pool_prompts * a.pool_steps} prompts x {a.k_max} candidates "
        "sampled by the SFT reference, re-scored by it; K candidates "
        f"sub-sampled per prompt, mean over seeds {a.subsample_seeds}. Pair "
        "accuracy, top-1 and tau are over mixed prompts only (chance: 0.5, "
        "the share right, 0). Re-scoring took "
        f"{time.perf_counter() - t0:.0f} s in this call.\n\n"
        + agreement_markdown(grid))
    out["agreement"] = grid
  if train:
    rows = training_rows(runner, a.train_ks, a.train_schemes, a.losses,
                         a.seeds)
    common.write_csv(os.path.join(a.out, "training.csv"), rows, TRAIN_FIELDS)
    main_table.plot(rows, os.path.join(a.out, "training.png"))
    grid = out.get("agreement") or read_agreement(
        os.path.join(a.out, "agreement.csv"))
    k_trend(rows, grid, os.path.join(a.out, "k_trend.png"))
    write_section(a.out, "training", head +
                 "## (b) Training grid: K x scheme x loss\n\nHeld-out "
                 "accuracy after PU-RL from the shared SFT reference (mean "
                 "over the seeds that finished: `seeds`); every finished "
                 "cell in the study's folder is listed, not only this call's;"
                 " logged, means over the run's steps: the oracle agreement "
                 "of its own ranking (mixed prompts), the sd of its scores "
                 "within a group, and for LDL the label sharpness 1 - "
                 "H(d) / log(members) (0: a uniform target) and d's mass on "
                 "the anchor (uniform: 1 / (K + 1)).\n\n"
                 + training_markdown(rows))
    out["training"] = rows
  text = join_sections(a.out, a.scale)
  print(text)
  return out


def k_series(rows: Sequence[dict], key: str = "gain"
             ) -> dict[tuple[str, str], list[tuple[int, float, float, float]]]:
  """{(scheme, loss): [(K, value, lo, hi), ...] by K} of the finished rows.

  `rows`: training_rows (value = `key`, its CI `key`_lo/_hi) or the
  agreement grid (loss "", value = `key`, no CI: lo = hi = value). Only
  series with >= 1 finished K; NaN values are dropped.
  """
  out: dict[tuple[str, str], list] = {}
  for r in rows:
    if r.get("status", "done") != "done" or r.get("k") in ("", None):
      continue
    v = r.get(key)
    if v is None or not np.isfinite(v):
      continue
    lo, hi = r.get(f"{key}_lo", v), r.get(f"{key}_hi", v)
    out.setdefault((r["scheme"], r.get("loss", "")), []).append(
        (int(r["k"]), float(v), float(lo), float(hi)))
  return {g: sorted(pts) for g, pts in sorted(
      out.items(), key=lambda kv: grid_order(*kv[0]))}


def read_agreement(path: str) -> list[dict]:
  """agreement.csv back as rows (numbers as floats; K as int)."""
  import csv  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  num = lambda x: float(x) if x not in ("", None) else float("nan")
  return [dict(r, k=int(r["k"]), **{m: num(r[m]) for m in METRICS})
          for r in rows]


def k_trend(training: Sequence[dict], agreement_grid: Sequence[dict],
            path: str) -> None:
  """k_trend.png: gain over SFT vs K per scheme x loss (paired 95 % CIs),
  and beside it the pair accuracy vs K per scheme on the one pool."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  gain = k_series(training, "gain")
  agree = {g: p for g, p in k_series(agreement_grid, "pair_accuracy").items()
           if g[0] != "oracle"}
  panels = 1 + bool(agree)
  fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), squeeze=False)
  ax = axes[0][0]
  colors = {s: plt.cm.tab10(i) for i, s in enumerate(SCHEMES)}
  styles = {"dpo": "-o", "grpo": "--s", "ldl": ":^"}
  ks = sorted({k for pts in list(gain.values()) + list(agree.values())
               for k, *_ in pts})
  for n, ((scheme, loss), pts) in enumerate(gain.items()):
    k, v, lo, hi = (np.array(x, np.float64) for x in zip(*pts))
    shift = 1 + 0.03 * (n - len(gain) / 2)  # keep error bars apart (log x)
    ax.errorbar(k * shift, 100 * v, yerr=[100 * (v - lo), 100 * (hi - v)],
                fmt=styles.get(loss, "-o"), capsize=3, ms=5,
                color=colors.get(scheme, "k"), label=f"{scheme} {loss}")
  ax.axhline(0, lw=1, color="k")
  ax.set_xscale("log", base=2)
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel("K (candidates per prompt)")
  ax.set_ylabel("held-out gain over SFT (pt), paired 95% CI")
  ax.set_title("(b) training grid")
  ax.legend(fontsize=7)
  if agree:
    ax = axes[0][1]
    for (scheme, _), pts in agree.items():
      k, v, _, _ = (np.array(x, np.float64) for x in zip(*pts))
      ax.plot(k, v, "-o", color=colors.get(scheme, "k"), label=scheme)
    ax.axhline(0.5, ls="--", lw=1, color="k")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("K (sub-sampled from one pool)")
    ax.set_ylabel("pair accuracy vs oracle (mixed prompts)")
    ax.set_title("(a) ranking agreement (chance 0.5)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_section(out: str, part: str, text: str) -> None:
  """table_<part>.md: one part's section with the command that made it;
  table.md joins the sections there are, so running one part keeps the
  other's table."""
  with open(os.path.join(out, f"table_{part}.md"), "w",
            encoding="utf-8") as f:
    f.write(text.rstrip("\n") + "\n")


def join_sections(out: str, scale: str) -> str:
  """Writes and returns table.md: a title and the parts' sections there are."""
  texts = []
  for part in ("agreement", "training"):
    path = os.path.join(out, f"table_{part}.md")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        texts.append(f.read().rstrip("\n"))
  text = f"# Ablation ({scale} scale)\n\n" + "\n\n".join(texts) + "\n"
  with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  main()
