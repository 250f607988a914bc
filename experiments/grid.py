r"""The ablation grid at a glance: several studies' part (b) merged into one
K x scheme matrix per loss.

  python -m experiments.grid experiments/ablation/small_a experiments/ablation/small_b \
      --out=experiments/ablation/grid_small

Each STUDY is a folder that `python -m experiments.ablation --part=training`
wrote (its training.csv). Training grids are run in batches, one folder per
batch, and each folder's table lists only its own cells; this command reads
the tables back (no weights needed, so it works on a fresh clone), keeps,
for every K x scheme x loss, the row with the most seeds (a tie: the study
named last), and writes into --out:
  grid.md   per loss, a K x scheme table of the gain over SFT (paired 95 %
            CI, seeds, the study it comes from), then what is not run yet;
  grid.csv  the chosen rows, with a `study` column;
  grid.png  one heatmap per loss (gain in points; '*' where the CI excludes 0);
  seeds.md, seeds.csv, seeds.png
            every chosen row with two seeds or more whose per-seed held-out
            answers are on disk (the study's cells/ or kept/): each seed's
            gain, the gain's interval over prompts and seeds together
            (`evaluate.seed_prompt_ci`; the grid's CI is over prompts only),
            and the paired difference between the seeds (`seed_rows`).

The gains are only comparable when every study trained from the same SFT
reference (`--reference_from`), so the command refuses studies whose SFT
rows differ. It cannot see a `--train_override` in the STUDY arguments:
name only studies of the plain grid there (not, e.g.,
ablation/small_anchor_out). A study run with an override that makes a
missing cell affordable (K = 16 pairwise_judge on a sparse pair design,
`ranking.pair_opponents`) goes in `--fill=STUDY`: its rows fill only the
cells no plain study has, marked with a dagger, and grid.md names the
override (read from the study's table.md command line).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
from typing import Sequence

import numpy as np

from experiments import ablation
from experiments import common
from experiments import main_table
from purld_jax import evaluate

GRID_FIELDS = ("k", "scheme", "loss", "seeds", "gain", "gain_lo", "gain_hi",
               "accuracy", "oracle_pair_accuracy", "wall_s", "study",
               "variant")
VARIANT = "\u2020"  # the dagger on a --fill row


class GridError(ValueError):
  pass


def _num(x: str) -> float:
  return float(x) if x not in ("", None) else float("nan")


def read_training(study: str) -> tuple[dict, list[dict]]:
  """(SFT row, finished grid rows) of STUDY/training.csv, numbers parsed."""
  path = os.path.join(study, "training.csv")
  if not os.path.exists(path):
    raise GridError(f"{path}: no such file (is {study!r} a study folder "
                    "written by `experiments.ablation --part=training`?)")
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  sft = [r for r in rows if r["method"] == "sft_only"]
  if len(sft) != 1:
    raise GridError(f"{path}: expected one sft_only row, found {len(sft)}")
  out = []
  for line, r in enumerate(rows, start=2):
    if r["method"] == "sft_only" or r["status"] != "done":
      continue
    try:
      out.append(dict(k=int(r["k"]), scheme=r["scheme"], loss=r["loss"],
                      seeds=int(r["seeds"]), study=study,
                      **{m: _num(r[m]) for m in (
                          "gain", "gain_lo", "gain_hi", "accuracy",
                          "oracle_pair_accuracy", "wall_s")}))
    except (KeyError, ValueError) as e:
      raise GridError(f"{path}, line {line}: {e!r}") from e
  return sft[0], out


def study_overrides(study: str) -> list[str]:
  """The `--train_override=` values of the command line near the top of the
  study's table_training.md or table.md (what `experiments.ablation` ran
  last there)."""
  for name in ("table_training.md", "table.md"):
    path = os.path.join(study, name)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        head = [f.readline() for _ in range(5)]
      for line in head:
        if "python -m experiments.ablation" in line:
          return re.findall(r"--train_override[= ](\S+?)`?(?=\s|`|$)", line)
  return []


def merge(studies: Sequence[str], fill: Sequence[str] = ()) -> list[dict]:
  """The chosen row per (K, scheme, loss) over STUDIES: most seeds, then the
  study named last; then the rows of the `fill` studies (same rule among
  them) for the cells still empty, with `variant` True. Raises GridError if
  two studies' SFT rows differ."""
  chosen: dict[tuple[int, str, str], dict] = {}
  filled: dict[tuple[int, str, str], dict] = {}
  first = None
  for study in list(studies) + list(fill):
    sft, rows = read_training(study)
    key = (sft["prompts"], sft["accuracy"])
    if first is None:
      first = (study, key)
    elif key != first[1]:
      raise GridError(
          f"{study}: its SFT reference (prompts, accuracy) = {key} differs "
          f"from {first[0]}'s {first[1]}; the gains are not comparable")
    target = filled if study in fill else chosen
    for r in rows:
      g = (r["k"], r["scheme"], r["loss"])
      r["variant"] = study in fill
      if g not in target or r["seeds"] >= target[g]["seeds"]:
        target[g] = r
  chosen.update({g: r for g, r in filled.items() if g not in chosen})
  return [chosen[g] for g in sorted(
      chosen, key=lambda g: (g[0], *ablation.grid_order(g[1], g[2])))]


def markdown(rows: Sequence[dict], studies: Sequence[str],
             grid=ablation.FULL_TRAIN, fill: Sequence[str] = ()) -> str:
  """Per loss a table, schemes down and K across; then the count and the
  cells of `grid` not run yet (`fill` studies' rows marked VARIANT)."""
  by = {(r["k"], r["scheme"], r["loss"]): r for r in rows}
  ks = sorted(set(grid["ks"]) | {r["k"] for r in rows})
  schemes = list(grid["schemes"]) + sorted(
      {r["scheme"] for r in rows} - set(grid["schemes"]))
  tag = {s: chr(ord("a") + i) for i, s in enumerate(list(studies) + list(fill))}
  tag.update({s: tag[s] + VARIANT for s in fill})
  lines = [f"- ({tag[s]}) `{s}`" for s in studies]
  for s in fill:
    over = ", ".join(f"`{o}`" for o in study_overrides(s)) or "not recorded"
    lines.append(f"- ({tag[s]}) `{s}`: a variant that fills cells no plain "
                 f"study has; run with {over}")
  parts = ["Gain of held-out accuracy over the shared SFT reference, points "
           "[paired 95 % CI]; bold where the CI excludes 0; `xN`: N seeds "
           "averaged; (a), (b), ...: the study the row comes from:",
           "\n".join(lines)]
  for loss in grid["losses"]:
    body = []
    for s in schemes:
      cells = []
      for k in ks:
        r = by.get((k, s, loss))
        cells.append("" if r is None else
                     f"{common.gain_text(r, bold_significant=True)} x{r['seeds']} ({tag[r['study']]})")
      if any(cells):
        body.append([s] + cells)
    parts.append(f"### {loss.upper()}\n\n" + (common.markdown_table(
        body, ["scheme"] + [f"K = {k}" for k in ks]) if body else "none run"))
  full = [(k, s, l) for k in grid["ks"] for s in grid["schemes"]
          for l in grid["losses"]]
  missing = [g for g in full if g not in by]
  two = sum(1 for g in full if g in by and by[g]["seeds"] >= 2)
  variants = [g for g in full if g in by and by[g].get("variant")]
  parts.append(
      f"{len(full) - len(missing)} of the {len(full)} cells of the full grid "
      f"run, {two} of them with two seeds or more" +
      (f"; {len(variants)} only as a variant ({VARIANT}: " +
       ", ".join(f"K{k} {s} {l}" for k, s, l in variants) + ")"
       if variants else "") + ". Not run: " +
      (", ".join(f"K{k} {s} {l}" for k, s, l in missing) or "none") + ".")
  return "\n\n".join(parts) + "\n"


SEED_FIELDS = ("k", "scheme", "loss", "seeds", "seed_gains", "gain", "gain_lo",
               "gain_hi", "gain_lo_seeds", "gain_hi_seeds", "seed_spread",
               "spread_lo", "spread_hi", "study")


def seed_rows(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
  """(one dict per chosen row with >= 2 seeds whose per-seed answers are
  on disk, the multi-seed rows whose are not).

  From the row's study folder: each seed's final held-out answers and the
  study's SFT answers give `seed_gains` (in seed order), the two-stage
  interval `gain_lo_seeds`/`gain_hi_seeds` (prompts and seeds resampled,
  `evaluate.seed_prompt_ci`) and `seed_spread` = largest minus smallest
  seed gain with the paired CI of those two seeds over the same prompts
  (`spread_lo`, `spread_hi`): an interval that excludes 0 says the seeds
  differ by more than prompt sampling explains. With S > 2 seeds the pair is
  picked after looking, so that interval is optimistic.

  Raises GridError when a study's training.csv counts other seeds than its
  folder holds (the table is stale: re-run the study's command).
  """
  done, missing = [], []
  runners: dict[str, common.Runner] = {}
  for r in rows:
    if r["seeds"] < 2:
      continue
    runner = runners.setdefault(r["study"],
                                common.Runner(r["study"], echo=False))
    seeds = sorted(seed for k, s, l, seed in ablation.finished_training(
        runner) if (k, s, l) == (r["k"], r["scheme"], r["loss"]))
    names = [ablation.train_name(r["k"], r["scheme"], r["loss"], x)
             for x in seeds]
    answers = [main_table.cell_answers(runner, n, "final") for n in names]
    sft = main_table.cell_answers(runner, main_table.REFERENCE, "sft")
    if not names or sft is None or any(a is None for a in answers):
      missing.append(r)
      continue
    if len(seeds) != r["seeds"]:
      raise GridError(
          f"{os.path.join(r['study'], 'training.csv')}: K{r['k']} "
          f"{r['scheme']} {r['loss']} has {r['seeds']} seeds, but the "
          f"folder holds {len(seeds)} finished ({', '.join(names)}); re-run "
          "the study's command to rebuild its tables")
    main_table.pooled([sft] + answers, [main_table.REFERENCE] + names)
    cols = main_table.seed_columns(answers, seeds, sft)
    lo, hi = cols["gain_lo_seeds"], cols["gain_hi_seeds"]
    gains = np.array([cols["seed_gains"][x] for x in seeds])
    correct = np.stack([a.correct for a in answers])  # [S, N]
    a, b = int(np.argmin(gains)), int(np.argmax(gains))
    slo, shi = evaluate.paired_ci(correct[a], correct[b])
    done.append(dict(
        k=r["k"], scheme=r["scheme"], loss=r["loss"], seeds=len(seeds),
        seed_list=seeds, seed_gains=[float(g) for g in gains],
        gain=float(gains.mean()), gain_lo=r["gain_lo"], gain_hi=r["gain_hi"],
        gain_lo_seeds=lo, gain_hi_seeds=hi,
        seed_spread=float(gains[b] - gains[a]), spread_lo=slo, spread_hi=shi,
        study=r["study"], variant=bool(r.get("variant"))))
  return done, missing


def _excludes_zero(lo: float, hi: float) -> bool:
  return lo > 0 or hi < 0


def seed_markdown(seeds: Sequence[dict], missing: Sequence[dict]) -> str:
  """seeds.md's body: the table of `seed_rows`, then the counts."""
  pt = lambda x: f"{100 * x:+.1f}"
  ci = lambda lo, hi: f"[{pt(lo)}, {pt(hi)}]"
  body = []
  for r in seeds:
    sig_p = _excludes_zero(r["gain_lo"], r["gain_hi"])
    sig_s = _excludes_zero(r["gain_lo_seeds"], r["gain_hi_seeds"])
    apart = _excludes_zero(r["spread_lo"], r["spread_hi"])
    bold = lambda text, on: f"**{text}**" if on else text
    spread = f"{100 * r['seed_spread']:.1f}"
    body.append([
        str(r["k"]), r["scheme"] + (VARIANT if r.get("variant") else ""),
        r["loss"],
        ", ".join(f"s{x} {pt(g)}" for x, g in zip(r["seed_list"],
                                                   r["seed_gains"])),
        f"{bold(pt(r['gain']), sig_p)} {ci(r['gain_lo'], r['gain_hi'])}",
        f"{bold(pt(r['gain']), sig_s)} "
        f"{ci(r['gain_lo_seeds'], r['gain_hi_seeds'])}",
        f"{bold(spread, apart)} {ci(r['spread_lo'], r['spread_hi'])}"])
  parts = [
      "Every grid cell with two seeds or more whose per-seed answers are on "
      "disk. Gains over SFT in points, bold where the interval excludes 0. "
      "*over prompts*: the grid's paired CI of the seed-averaged answers "
      "(prompts resampled); *over seeds and prompts*: prompts and seeds both "
      "resampled (`evaluate.seed_prompt_ci`); *seeds apart*: largest minus "
      "smallest seed gain, paired 95 % CI over the same prompts (bold: the "
      "seeds differ by more than prompt sampling explains). "
      f"{VARIANT}: a variant (grid.md names it).",
      common.markdown_table(body, [
          "K", "scheme", "loss", "gain per seed", "gain [CI over prompts]",
          "gain [CI over seeds and prompts]", "seeds apart, pt [paired CI]"])
      if body else "No cell with two seeds has its per-seed answers here."]
  if seeds:
    sig_p = [r for r in seeds if _excludes_zero(r["gain_lo"], r["gain_hi"])]
    kept = [r for r in sig_p
            if _excludes_zero(r["gain_lo_seeds"], r["gain_hi_seeds"])]
    apart = [r for r in seeds
             if _excludes_zero(r["spread_lo"], r["spread_hi"])]
    name = lambda r: f"K{r['k']} {r['scheme']} {r['loss']}"
    parts.append(
        f"{len(seeds)} cells. Seeds apart beyond prompt noise: "
        f"{len(apart)} ({', '.join(map(name, apart)) or 'none'}). "
        f"Significant over prompts: {len(sig_p)}; of these, still "
        f"significant over seeds and prompts: {len(kept)}"
        + (f" (not: {', '.join(name(r) for r in sig_p if r not in kept)})"
           if len(kept) < len(sig_p) else "") + ".")
  if missing:
    parts.append(
        "Per-seed answers not on disk (the grid's prompt-only CI stands): " +
        ", ".join(f"K{r['k']} {r['scheme']} {r['loss']} x{r['seeds']} "
                  f"(`{r['study']}`)" for r in missing) + ".")
  return "\n\n".join(parts) + "\n"


def seed_plot(seeds: Sequence[dict], path: str,
              grid=ablation.FULL_TRAIN) -> None:
  """seeds.png: one panel per loss; per cell its seeds' gains (dots joined
  by a line, red where the seeds' paired CI excludes 0) and the interval
  over seeds and prompts (grey bar)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  losses = [l for l in grid["losses"] if any(r["loss"] == l for r in seeds)]
  if not losses:
    return
  fig, axes = plt.subplots(len(losses), 1, figsize=(9, 2.6 * len(losses)),
                           squeeze=False)
  for ax, loss in zip(axes[:, 0], losses):
    rs = [r for r in seeds if r["loss"] == loss]
    for x, r in enumerate(rs):
      ax.plot([x, x], [100 * r["gain_lo_seeds"], 100 * r["gain_hi_seeds"]],
              color="0.8", lw=6, solid_capstyle="butt", zorder=1)
      g = [100 * v for v in r["seed_gains"]]
      apart = _excludes_zero(r["spread_lo"], r["spread_hi"])
      ax.plot([x] * len(g), g, "-o", color="C3" if apart else "C0", ms=4,
              zorder=2)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(rs)),
                  [f"K{r['k']}\n{r['scheme']}" for r in rs], fontsize=6)
    ax.set_ylabel(f"{loss.upper()}: gain (pt)")
  fig.suptitle("held-out gain over SFT per training seed (dots; red: the "
               "seeds differ beyond prompt noise); grey: 95% CI over seeds "
               "and prompts", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def heatmap(rows: Sequence[dict], path: str, grid=ablation.FULL_TRAIN) -> None:
  """grid.png: one panel per loss, schemes x K, colour = gain (pt)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  by = {(r["k"], r["scheme"], r["loss"]): r for r in rows}
  ks, schemes, losses = list(grid["ks"]), list(grid["schemes"]), grid["losses"]
  lim = max([abs(100 * r["gain"]) for r in rows if math.isfinite(r["gain"])]
            + [1.0])
  fig, axes = plt.subplots(1, len(losses), figsize=(3.6 * len(losses) + 1.6,
                                                    3.6), squeeze=False)
  for n, (ax, loss) in enumerate(zip(axes[0], losses)):
    v = np.full((len(schemes), len(ks)), np.nan)
    for i, s in enumerate(schemes):
      for j, k in enumerate(ks):
        r = by.get((k, s, loss))
        if r is None:
          ax.text(j, i, "not run", ha="center", va="center", fontsize=6,
                  color="0.5")
          continue
        v[i, j] = 100 * r["gain"]
        sig = "*" if r["gain_lo"] > 0 or r["gain_hi"] < 0 else ""
        dag = VARIANT if r.get("variant") else ""
        ax.text(j, i, f"{v[i, j]:+.1f}{sig}{dag}\nx{r['seeds']}", ha="center",
                va="center", fontsize=7,
                color="w" if abs(v[i, j]) > 0.6 * lim else "k")
    im = ax.imshow(v, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(schemes)), schemes if n == 0 else [])
    ax.set_xlabel("K (candidates per prompt)")
    ax.set_title(loss.upper())
  fig.colorbar(im, ax=axes[0].tolist(), label="gain over SFT (pt)")
  fig.suptitle("held-out gain over SFT; * paired 95% CI excludes 0; "
               f"xN: seeds; {VARIANT}: a variant (see grid.md)", fontsize=9)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def main(argv=None) -> str:
  p = argparse.ArgumentParser(prog="python -m experiments.grid",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("studies", nargs="+", help="study folders (training.csv)")
  p.add_argument("--out", required=True, help="folder for grid.md/csv/png")
  p.add_argument("--fill", action="append", default=[],
                 help="a study run with a --train_override whose rows fill "
                 "only cells no plain study has (marked as a variant); "
                 "repeatable")
  a = p.parse_args(argv)
  try:
    rows = merge(a.studies, a.fill)
  except GridError as e:
    p.error(str(e))
  os.makedirs(a.out, exist_ok=True)
  text = (f"# The ablation grid, merged\n\n`python -m experiments.grid "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
          + markdown(rows, a.studies, fill=a.fill))
  with open(os.path.join(a.out, "grid.md"), "w", encoding="utf-8") as f:
    f.write(text)
  common.write_csv(os.path.join(a.out, "grid.csv"), rows, GRID_FIELDS)
  heatmap(rows, os.path.join(a.out, "grid.png"))
  try:
    seeds, missing = seed_rows(rows)
  except GridError as e:
    p.error(str(e))
  with open(os.path.join(a.out, "seeds.md"), "w", encoding="utf-8") as f:
    f.write("# The grid's seeds\n\n`python -m experiments.grid "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
            + seed_markdown(seeds, missing))
  common.write_csv(os.path.join(a.out, "seeds.csv"),
                   [dict(r, seed_gains=";".join(f"{g:.6f}" for g in
                                                r["seed_gains"]))
                    for r in seeds], SEED_FIELDS)
  seed_plot(seeds, os.path.join(a.out, "seeds.png"))
  print(text)
  return text


if __name__ == "__main__":
  main()
