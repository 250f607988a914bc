r"""Paired comparison of finished cells: B minus A on the same held-out prompts.

  python -m experiments.compare \
      --a=experiments/ladder/small_eval/cells/anchor_dpo_s0 \
      --b=experiments/ladder/small_eval/cells/purld_dpo_s0

Each side is one cell folder or several (comma-separated: seeds, averaged per
prompt first, as the study tables do); a folder's answers are
eval/<--model>.jsonl (`final` by default; `sft` or `before` for a reference
cell). Prints each side's accuracy with its 95 % bootstrap CI over prompts and
the paired difference mean(b - a) with its paired 95 % bootstrap CI
(`evaluate.paired_ci`), and the prompts only one side gets right. With
several seeds on a side it also prints the difference's interval over seeds
and prompts (`evaluate.seed_prompt_ci`: each side's seeds resampled too),
which a result that hangs on one seed widens. Refuses sides whose held-out
prompts differ.

Two studies cell by cell (say a study and the same cells re-run with a
`--train_override` into another folder):

  python -m experiments.compare --study_a=experiments/ladder/small_dev \
      --study_b=/tmp/small_dev_gate --out=/tmp/small_dev_gate/vs

pairs every cell name (`k8_judge_dpo`, seeds `_s0`, `_s1`, ... pooled) that
has finished seeds in both studies (in cells/ or kept/), and writes
compare.md, compare.csv and compare.png (B - A per cell with both
intervals) to --out. The two studies' SFT references are checked: their
held-out answers should be the same (the table says so, or says which
prompts differ). Each row names the config overrides that differ between
the two sides' cells (their cell.json), e.g. `ranking.gate: - -> number`.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from typing import Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from experiments import analysis  # noqa: E402
from experiments import common  # noqa: E402
from purld_jax import evaluate  # noqa: E402


def side(folders: Sequence[str], model: str) -> tuple[tuple, np.ndarray]:
  """(prompt ids, f64[S, N] per-prompt correctness of each of the S
  `folders`)."""
  answers = [analysis.folder_answers(d, model) for d in folders]
  for d, a in zip(folders, answers):
    if a is None:
      raise FileNotFoundError(
          f"{os.path.join(d, 'eval', model + '.jsonl')}: no answers (is the "
          f"cell finished? try --model=sft or before)")
  ids, _ = analysis.pooled(answers, list(folders))
  return ids, np.stack([a.correct for a in answers])


def compare(a: Sequence[str], b: Sequence[str], *, model: str = "final",
            model_a: str | None = None) -> dict:
  """Accuracies of the two sides (and of each folder: `a_per_seed`,
  `b_per_seed`), mean(b - a) and its paired CI over
  prompts (seeds averaged per prompt first) and, `diff_lo_seeds` /
  `diff_hi_seeds`, over seeds and prompts (`evaluate.seed_prompt_ci`; the
  same interval when each side is one folder)."""
  ids_a, sa = side(a, model_a or model)
  ids_b, sb = side(b, model)
  if ids_a != ids_b:
    raise ValueError(f"{a[0]} and {b[0]}: held-out prompts differ")
  ca, cb = sa.mean(axis=0), sb.mean(axis=0)
  lo_a, hi_a = evaluate.bootstrap_ci(ca)
  lo_b, hi_b = evaluate.bootstrap_ci(cb)
  lo, hi = evaluate.paired_ci(ca, cb)
  slo, shi = evaluate.seed_prompt_ci(sb, baseline=sa)
  return dict(prompts=len(ids_a), seeds_a=len(sa), seeds_b=len(sb),
              a_per_seed=sa.mean(axis=1).tolist(),
              b_per_seed=sb.mean(axis=1).tolist(),
              a=float(ca.mean()), a_lo=lo_a, a_hi=hi_a,
              b=float(cb.mean()), b_lo=lo_b, b_hi=hi_b,
              diff=float((cb - ca).mean()), diff_lo=lo, diff_hi=hi,
              diff_lo_seeds=slo, diff_hi_seeds=shi,
              only_a=int(np.sum(ca > cb)), only_b=int(np.sum(cb > ca)))


_SEEDED = re.compile(r"^(?P<name>.+)_s(?P<seed>\d+)$")


def study_cells(study: str, model: str = "final") -> dict[str, dict[int, str]]:
  """{cell name: {seed: folder}} of the study's finished cells (eval/
  <model>.jsonl present), from cells/ and kept/ (a seed in both read from
  cells/); folders not named NAME_sSEED (sft, pool) are left out."""
  found = collections.defaultdict(dict)
  for sub in ("kept", "cells"):  # cells/ last: it wins
    root = os.path.join(study, sub)
    if not os.path.isdir(root):
      continue
    for entry in sorted(os.listdir(root)):
      m = _SEEDED.match(entry)
      folder = os.path.join(root, entry)
      if m and os.path.exists(os.path.join(folder, "eval", f"{model}.jsonl")):
        found[m["name"]][int(m["seed"])] = folder
  return {k: dict(sorted(v.items())) for k, v in sorted(found.items())}


def sft_check(study_a: str, study_b: str) -> str:
  """One line on whether the studies' SFT references answered alike."""
  answers = []
  for study in (study_a, study_b):
    folders = [os.path.join(study, sub, "sft") for sub in ("cells", "kept")]
    found = [analysis.folder_answers(d, "sft") for d in folders]
    answers.append(next((a for a in found if a is not None), None))
  a, b = answers
  if a is None or b is None:
    return "SFT references: not both on disk, not checked."
  if a.ids != b.ids:
    return "SFT references: **held-out prompts differ**."
  x, y = (np.asarray(v.correct, np.float64) for v in (a, b))
  differ = int(np.sum(~((x == y) | (np.isnan(x) & np.isnan(y)))))
  strip = lambda answers: [t.strip() for t in answers.texts]
  if differ or strip(a) != strip(b):
    return (f"SFT references: **answers differ** ({differ} prompts scored "
            "differently): the two studies do not start from one model.")
  return "SFT references: the same held-out answers in both studies."


def override_diff(folders_a: Sequence[str], folders_b: Sequence[str]) -> str:
  """What separates two sides' cells: 'KEY: A's value -> B's value' for
  every config override that differs ('-' = not set), '; '-joined; 'none';
  or 'n/a' where a cell.json is missing or a side's seeds disagree."""
  sides = []
  for folders in (folders_a, folders_b):
    found = [common.cell_overrides(f) for f in folders]
    if any(o is None for o in found) or any(o != found[0] for o in found):
      return "n/a"
    sides.append(found[0])
  a, b = sides
  diffs = [f"{k}: {a.get(k, '-')} -> {b.get(k, '-')}"
           for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  return "; ".join(diffs) or "none"


def compare_studies(study_a: str, study_b: str) -> tuple[list[dict], dict]:
  """`compare` for every cell name with finished seeds in both studies
  (seeds pooled per side) -> (rows, {"only_a": names, "only_b": names});
  each row's `overrides` says which config overrides separate the sides
  (`override_diff`)."""
  ca, cb = study_cells(study_a), study_cells(study_b)
  rows = []
  for name in sorted(set(ca) & set(cb)):
    r = compare(list(ca[name].values()), list(cb[name].values()))
    rows.append(dict(r, cell=name,
                     overrides=override_diff(list(ca[name].values()),
                                             list(cb[name].values())),
                     acc_a_seeds=dict(zip(ca[name], r["a_per_seed"])),
                     acc_b_seeds=dict(zip(cb[name], r["b_per_seed"]))))
  return rows, dict(only_a=sorted(set(ca) - set(cb)),
                    only_b=sorted(set(cb) - set(ca)))


def _seeds_text(accs: dict) -> str:
  return ", ".join(f"s{s} {100 * v:.1f}" for s, v in accs.items())


def studies_markdown(rows, rest, study_a, study_b, sft_line, command) -> str:
  pt = lambda x: f"{100 * x:+.1f}"
  body = [[r["cell"], _seeds_text(r["acc_a_seeds"]),
           _seeds_text(r["acc_b_seeds"]),
           f"{pt(r['diff'])} [{pt(r['diff_lo'])}, {pt(r['diff_hi'])}]",
           f"[{pt(r['diff_lo_seeds'])}, {pt(r['diff_hi_seeds'])}]",
           f"{r['only_a']} / {r['only_b']}", r["overrides"]] for r in rows]
  head = ["cell", "A: accuracy % per seed", "B: accuracy % per seed",
          "B - A, pt [paired 95% CI]", "B - A, 95% CI over seeds and prompts",
          "prompts right only in A / only in B",
          "overrides that differ (A -> B)"]
  lines = [f"# {os.path.basename(study_b.rstrip('/'))} (B) against "
           f"{os.path.basename(study_a.rstrip('/'))} (A), cell by cell", "",
           f"`{command}`", "", f"A = `{study_a}`, B = `{study_b}`. "
           "Seeds of a cell are averaged per prompt before the paired "
           "interval; the last interval resamples seeds too "
           "(`evaluate.seed_prompt_ci`). " + sft_line, "",
           analysis.markdown_table(body, head) if rows else "No cell in both.",
           ""]
  for key, label in (("only_a", "Only in A"), ("only_b", "Only in B")):
    if rest[key]:
      lines += [f"{label} ({len(rest[key])}): {', '.join(rest[key])}.", ""]
  lines += ["![B - A per cell](compare.png)", ""]
  return "\n".join(lines)


def studies_plot(rows, path: str) -> None:
  """compare.png: per cell B - A (dot) with its paired CI (line) and the
  interval over seeds and prompts (grey bar)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1.2))
  for y, r in enumerate(rows):
    ax.plot([100 * r["diff_lo_seeds"], 100 * r["diff_hi_seeds"]], [y, y],
            color="0.8", lw=8, solid_capstyle="butt", zorder=1)
    ax.plot([100 * r["diff_lo"], 100 * r["diff_hi"]], [y, y], color="C0",
            lw=1.5, zorder=2)
    ax.plot(100 * r["diff"], y, "o", color="C0", zorder=3)
  ax.axvline(0, color="k", lw=0.6)
  ax.set_yticks(range(len(rows)), [r["cell"] for r in rows], fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("B - A, held-out accuracy (pt): paired 95% CI (blue), "
                "over seeds and prompts (grey)", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def write_studies(study_a: str, study_b: str, out: str, command: str
                  ) -> list[dict]:
  rows, rest = compare_studies(study_a, study_b)
  os.makedirs(out, exist_ok=True)
  md = studies_markdown(rows, rest, study_a, study_b,
                        sft_check(study_a, study_b), command)
  with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
    f.write(md)
  flat = [dict(r, acc_a_seeds=_seeds_text(r["acc_a_seeds"]),
               acc_b_seeds=_seeds_text(r["acc_b_seeds"])) for r in rows]
  analysis.write_csv(os.path.join(out, "compare.csv"), flat, [
      "cell", "seeds_a", "seeds_b", "acc_a_seeds", "acc_b_seeds", "a", "b",
      "diff", "diff_lo", "diff_hi", "diff_lo_seeds", "diff_hi_seeds",
      "only_a", "only_b", "prompts", "overrides"])
  if rows:
    studies_plot(rows, os.path.join(out, "compare.png"))
  print(md)
  return rows


def main(argv=None) -> dict | list[dict]:
  p = argparse.ArgumentParser(prog="python -m experiments.compare",
                              description=__doc__.split("\n")[0])
  p.add_argument("--a", help="cell folder(s), comma-separated")
  p.add_argument("--b", help="cell folder(s), comma-separated")
  p.add_argument("--study_a", help="a study folder: compare cell by cell "
                 "with --study_b (needs --out)")
  p.add_argument("--study_b", help="the other study folder")
  p.add_argument("--out", help="with --study_a/--study_b: where compare.md, "
                 ".csv and .png go")
  p.add_argument("--model", default="final",
                 help="eval/<model>.jsonl of each cell (final | sft | before)")
  p.add_argument("--model_a", default=None,
                 help="side A's model when it differs (e.g. sft)")
  argv = sys.argv[1:] if argv is None else argv
  a = p.parse_args(argv)
  if a.study_a or a.study_b:
    if not (a.study_a and a.study_b and a.out) or a.a or a.b:
      p.error("--study_a needs --study_b and --out, and neither --a nor --b")
    command = " ".join(["python -m experiments.compare", *argv])
    return write_studies(a.study_a, a.study_b, a.out, command)
  if not (a.a and a.b):
    p.error("give --a and --b (cells), or --study_a and --study_b")
  split = lambda s: [x for x in s.split(",") if x]
  r = compare(split(a.a), split(a.b), model=a.model, model_a=a.model_a)
  pct = lambda x: f"{100 * x:.1f}"
  print(f"A {a.a}: {pct(r['a'])} % [{pct(r['a_lo'])}, {pct(r['a_hi'])}]")
  print(f"B {a.b}: {pct(r['b'])} % [{pct(r['b_lo'])}, {pct(r['b_hi'])}]")
  print(f"B - A over {r['prompts']} prompts: {100 * r['diff']:+.1f} pt "
        f"[{100 * r['diff_lo']:+.1f}, {100 * r['diff_hi']:+.1f}] (paired 95 % "
        f"CI); better on A only: {r['only_a']}, on B only: {r['only_b']}")
  if max(r["seeds_a"], r["seeds_b"]) > 1:
    print(f"  over seeds ({r['seeds_a']} A, {r['seeds_b']} B) and prompts: "
          f"[{100 * r['diff_lo_seeds']:+.1f}, {100 * r['diff_hi_seeds']:+.1f}]"
          " (evaluate.seed_prompt_ci)")
  return r


if __name__ == "__main__":
  main()
