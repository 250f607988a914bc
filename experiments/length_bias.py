r"""Does a ranking scheme prefer short candidates? Read from stored rollouts.

  python -m experiments.length_bias \
      experiments/ablation/small/cells/pool \
      experiments/ablation/small_b/cells/k2_pmi_grpo_s0 \
      --out=experiments/ablation/length_bias

For each cell (a run's workdir; its rollouts/ store, purld_jax/
rollout_store.py) and each scheme scored in it (the run's own scores, and a
re-ranking study's ref_* ones), over every stored step's real prompts:

  shorter_pref   mean over prompts of `diagnostics.shorter_preferred`: of a
                 prompt's candidate pairs of unequal length (tokens before
                 the stop), the share whose shorter member scores higher
                 (ties 1/2; 0.5 = blind to length), with a 95 % bootstrap CI
                 over prompts;
  oracle_pref    the same question put to correctness: of the (right,
                 wrong) pairs of unequal length, the share whose right one is
                 the shorter (ties="skip"): the length preference a perfect
                 ranking would show on these candidates;
  empty          candidates that stopped at once (no token), and in how many
                 of the prompts that have both an empty and a non-empty
                 candidate an empty one is scored highest;
  tokens         mean candidate length at the first and the last stored step
                 (the policy's drift over training).

And for each cell with held-out answers (eval/final.jsonl, as kept/ folders
hold them): how many greedy answers have at most one token before the stop
(a one-digit number, or nothing), their mean length, how many distinct
answers there are and how often the commonest one is given (a policy that
collapsed onto one answer shows here), and the accuracy, for
the trained model and for SFT (eval/sft.jsonl) on the same prompts.

Needs no model: it reads what is already on disk. Writes length_bias.md,
length_bias.csv (the rollout rows), heldout_lengths.csv, and both as
pictures (length_preference.png, heldout_lengths.png) to --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from typing import Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from experiments import main_table  # noqa: E402
from purld_jax import diagnostics  # noqa: E402
from purld_jax import evaluate  # noqa: E402
from purld_jax import rollout_store  # noqa: E402
from purld_jax import sampling  # noqa: E402

COLUMNS = ("cell", "scheme", "steps", "prompts", "candidates", "tokens_first",
           "tokens_last", "empty", "empty_top", "empty_groups",
           "shorter_pref", "shorter_pref_lo", "shorter_pref_hi",
           "oracle_pref", "oracle_prompts")
HELDOUT_COLUMNS = ("cell", "scheme", "loss", "k", "prompts", "short", "tokens",
                   "accuracy", "top_answer", "top_count", "distinct",
                   "sft_short", "sft_tokens", "sft_accuracy", "sft_top_answer",
                   "sft_top_count", "sft_distinct")


def label(workdir: str) -> str:
  """The cell's name in the tables: its path without a leading
  experiments/ and cells/ (two studies' `pool` cells stay apart)."""
  rel = os.path.relpath(workdir)
  path = workdir if rel.startswith("..") else rel
  parts = os.path.normpath(path).split(os.sep)
  if parts[0] == "experiments":
    parts = parts[1:]
  return "/".join(x for x in parts if x not in ("cells", "kept")) or "."


def read_rollouts(workdir: str) -> list[rollout_store.Rollout]:
  """Every stored step of `workdir`/rollouts; errors name the folder."""
  path = os.path.join(workdir, "rollouts")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no rollout store (is {workdir} a "
                            f"PU-RL cell's workdir?)")
  rollouts = list(rollout_store.RolloutStore.open(path).iter())
  if not rollouts:
    raise ValueError(f"{path}: no stored step")
  return rollouts


def cell_rows(workdir: str, schemes: Sequence[str] | None = None
              ) -> list[dict]:
  """One row per scheme scored in `workdir`/rollouts (COLUMNS)."""
  rollouts = read_rollouts(workdir)
  path = os.path.join(workdir, "rollouts")
  names = sorted({s for r in rollouts for s in r.scores})
  if schemes:
    missing = sorted(set(schemes) - set(names))
    if missing:
      raise ValueError(f"{path}: no scores for {missing} (stored: {names})")
    names = list(schemes)
  rows = []
  for name in names:
    pref, oracle, n_cands, empty, empty_top, empty_groups = [], [], 0, 0, 0, 0
    steps = [r for r in rollouts if name in r.scores]
    mean_len = []
    for r in steps:
      keep = np.asarray(r.valid, bool)
      s = np.asarray(r.scores[name], np.float64)[keep]
      n = rollout_store.candidate_lengths(r)[keep]
      mean_len.append(float(n.mean()))
      pref.append(diagnostics.shorter_preferred(s, n))
      if r.correct is not None:
        oracle.append(diagnostics.shorter_preferred(
            np.asarray(r.correct)[keep], n, ties="skip"))
      n_cands += n.size
      empty += int((n == 0).sum())
      both = (n == 0).any(-1) & (n > 0).any(-1)
      empty_groups += int(both.sum())
      top = np.take_along_axis(n, s.argmax(-1)[:, None], -1)[:, 0]
      empty_top += int((both & (top == 0)).sum())
    p = np.concatenate(pref)
    p = p[~np.isnan(p)]
    o = np.concatenate(oracle) if oracle else np.zeros(0)
    o = o[~np.isnan(o)]
    lo, hi = evaluate.bootstrap_ci(p) if len(p) else (np.nan, np.nan)
    rows.append(dict(
        cell=label(workdir), scheme=name,
        steps=len(steps), prompts=len(p), candidates=n_cands,
        tokens_first=mean_len[0], tokens_last=mean_len[-1], empty=empty,
        empty_top=empty_top, empty_groups=empty_groups,
        shorter_pref=float(p.mean()) if len(p) else np.nan,
        shorter_pref_lo=lo, shorter_pref_hi=hi,
        oracle_pref=float(o.mean()) if len(o) else np.nan,
        oracle_prompts=len(o)))
  return rows


def cell_setting(workdir: str) -> dict:
  """scheme, loss and K from the cell's cell.json overrides ('' where it
  has none: a plain run's workdir)."""
  o = common.cell_overrides(workdir) or {}
  return dict(scheme=o.get("ranking.scheme", ""), loss=o.get("recipe", ""),
              k=o.get("sampling.num_candidates", ""))


def heldout_row(workdir: str) -> dict | None:
  """The cell's held-out answers by length (HELDOUT_COLUMNS; `short`: answers
  of at most one token), or None when it has no eval/final.jsonl."""
  final = main_table.folder_answers(workdir, "final")
  if final is None:
    return None
  row = dict(cell=label(workdir), prompts=len(final.ids),
             **cell_setting(workdir))
  sft = main_table.folder_answers(workdir, "sft")
  if sft is not None and sft.ids != final.ids:
    raise ValueError(f"{workdir}: eval/sft.jsonl and eval/final.jsonl hold "
                     f"different prompts")
  for prefix, a in (("", final), ("sft_", sft)):
    if a is None:
      row.update({f"{prefix}short": None, f"{prefix}tokens": np.nan,
                  f"{prefix}accuracy": np.nan, f"{prefix}top_answer": None,
                  f"{prefix}top_count": None, f"{prefix}distinct": None})
      continue
    # a.lengths count the stop token
    n = sampling.tokens_before_stop(a.lengths, a.finished)
    counts = collections.Counter(t.strip() for t in a.texts)
    top, top_count = counts.most_common(1)[0]
    row.update({f"{prefix}short": int((n <= 1).sum()),
                f"{prefix}tokens": float(n.mean()),
                f"{prefix}accuracy": float(np.nanmean(a.correct)),
                f"{prefix}top_answer": top, f"{prefix}top_count": top_count,
                f"{prefix}distinct": len(counts)})
  return row


def heldout_table(rows: Sequence[dict]) -> str:
  """The markdown table of `heldout_row`s."""
  f = lambda x, d=2: "-" if x is None or np.isnan(x) else f"{x:.{d}f}"
  sft = lambda r, key: "-" if r[key] is None else r[key]
  said = lambda r, p: ("-" if r[p + "top_answer"] is None else
                       f"{json.dumps(r[p + 'top_answer'], ensure_ascii=False)}"
                       f" x {r[p + 'top_count']}")
  body = [[r["cell"], str(r["prompts"]),
           f"{r['short']} (SFT {sft(r, 'sft_short')})",
           f"{f(r['tokens'])} (SFT {f(r['sft_tokens'])})",
           f"{r['distinct']} (SFT {sft(r, 'sft_distinct')})",
           f"{said(r, '')} (SFT {said(r, 'sft_')})",
           f"{f(100 * r['accuracy'], 1)} (SFT {f(100 * r['sft_accuracy'], 1)})"]
          for r in rows]
  return common.markdown_table(
      body, ["cell", "prompts", "answers of <= 1 token", "mean tokens",
             "distinct answers", "commonest answer", "accuracy %"])


def summary_table(held: Sequence[dict]) -> str:
  """`heldout_row`s grouped by loss x scheme: cells, and the range over
  them of short answers, distinct answers and accuracy, with the most
  repeated answer of any of them. A cell run in two studies (the same
  name: the same setting and seed) counts once."""
  seen, groups = set(), {}
  for r in held:
    name = r["cell"].rsplit("/", 1)[-1]
    if name in seen:
      continue
    seen.add(name)
    groups.setdefault((r["loss"], r["scheme"]), []).append(r)
  span = lambda v, fmt="{}": (fmt.format(min(v)) if min(v) == max(v) else
                              f"{fmt.format(min(v))}-{fmt.format(max(v))}")
  body = []
  for (loss, scheme), rs in sorted(groups.items()):
    top = max(rs, key=lambda r: r["top_count"])
    body.append([loss.upper() or "-", scheme or "-", str(len(rs)),
                 span([r["short"] for r in rs]),
                 span([r["distinct"] for r in rs]),
                 f"{json.dumps(top['top_answer'], ensure_ascii=False)} x "
                 f"{top['top_count']}",
                 span([100 * r["accuracy"] for r in rs], "{:.1f}")])
  sft = next((r for r in held if r["sft_short"] is not None), None)
  if sft is not None:
    body.append(["SFT", "", "", str(sft["sft_short"]),
                 str(sft["sft_distinct"]),
                 f"{json.dumps(sft['sft_top_answer'], ensure_ascii=False)}"
                 f" x {sft['sft_top_count']}",
                 f"{100 * sft['sft_accuracy']:.1f}"])
  return common.markdown_table(
      body, ["loss", "scheme", "cells", "answers of <= 1 token",
             "distinct answers", "most repeated answer", "accuracy %"])


def table(rows: Sequence[dict]) -> str:
  """The markdown table of `rows`."""
  f = lambda x: "-" if x is None or np.isnan(x) else f"{x:.2f}"
  body = [[r["cell"], r["scheme"], str(r["steps"]), str(r["prompts"]),
           f"{r['tokens_first']:.1f} → {r['tokens_last']:.1f}",
           f"{r['empty']} / {r['candidates']}",
           f"{r['empty_top']} of {r['empty_groups']}",
           f"{f(r['shorter_pref'])} [{f(r['shorter_pref_lo'])}, "
           f"{f(r['shorter_pref_hi'])}]",
           f"{f(r['oracle_pref'])} ({r['oracle_prompts']})"] for r in rows]
  return common.markdown_table(
      body, ["cell", "scheme", "steps", "prompts", "tokens first → last",
             "empty", "empty top", "shorter preferred [95 % CI]",
             "right is shorter (prompts)"])


def plot(rows: Sequence[dict], held: Sequence[dict], out: str) -> list[str]:
  """Pictures into folder `out`: length_preference.png, each stored (cell,
  scheme)'s shorter-preferred share with its CI against correctness's; and
  heldout_lengths.png, each cell's held-out answers of <= 1 token against
  its accuracy (colour: scheme, marker: loss; stars: SFT). Returns the
  paths written."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  if rows:
    fig, ax = plt.subplots(figsize=(7.5, 1.0 + 0.24 * len(rows)))
    y = np.arange(len(rows))[::-1]
    m = np.array([r["shorter_pref"] for r in rows])
    lo = np.array([r["shorter_pref_lo"] for r in rows])
    hi = np.array([r["shorter_pref_hi"] for r in rows])
    ax.errorbar(m, y, xerr=[m - lo, hi - m], fmt="o", ms=4, capsize=2,
                label="scheme: shorter scored higher (95 % CI)")
    ax.plot([r["oracle_pref"] for r in rows], y, "x", color="C3",
            label="correctness: right one shorter")
    ax.axvline(0.5, color="0.5", ls="--", lw=0.8)
    ax.set_yticks(y, [f"{r['cell']}: {r['scheme']}" for r in rows],
                  fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of unequal-length pairs (0.5: blind to length)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("which of two candidates the ranking prefers", fontsize=9)
    paths.append(os.path.join(out, "length_preference.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
  if held:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    schemes = sorted({r["scheme"] for r in held})
    markers = dict(dpo="s", grpo="^", ldl="o")
    for r in held:
      ax.scatter(r["short"] / r["prompts"], 100 * r["accuracy"],
                 marker=markers.get(r["loss"], "D"), s=28, alpha=0.8,
                 color=f"C{schemes.index(r['scheme']) % 10}")
    sft = [r for r in held if r["sft_short"] is not None]
    if sft:
      ax.scatter([r["sft_short"] / r["prompts"] for r in sft],
                 [100 * r["sft_accuracy"] for r in sft], marker="*", s=120,
                 color="k", label="SFT")
    for i, sc in enumerate(schemes):
      ax.scatter([], [], color=f"C{i % 10}", label=sc or "(none)")
    for loss, mk in markers.items():
      if any(r["loss"] == loss for r in held):
        ax.scatter([], [], marker=mk, color="0.4", label=loss.upper())
    ax.set_xlabel("held-out answers of <= 1 token (share)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(fontsize=7)
    ax.set_title("trained cells: short answers and accuracy", fontsize=9)
    paths.append(os.path.join(out, "heldout_lengths.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
  return paths


def reglob(args: Sequence[str]) -> list[str]:
  """ARGS with each run of paths in one folder that is exactly what a shell
  glob DIR/PREFIX* matches (PREFIX their longest common start) written as
  that glob: the command a reader can re-type, not its expansion.

  ["d/k2_a", "d/k4_b", "--out=o"] -> ["d/k*", "--out=o"] when d holds no
  other k* entry; a path that is not a folder is left as it is."""
  import glob  # pylint: disable=g-import-not-at-top
  out, i = [], 0
  while i < len(args):
    head = os.path.dirname(args[i])
    j = i
    while (j < len(args) and not args[j].startswith("-") and
           os.path.dirname(args[j]) == head and os.path.isdir(args[j])):
      j += 1
    if j - i >= 2:
      names = [os.path.basename(x) for x in args[i:j]]
      pattern = os.path.join(head, os.path.commonprefix(names) + "*")
      if sorted(glob.glob(pattern)) == sorted(args[i:j]):
        out.append(pattern)
        i = j
        continue
    out.append(args[i])
    i += 1
  return out


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(
      prog="python -m experiments.length_bias",
      description=__doc__.split("\n")[0],
      epilog="See the module docstring for each column.")
  p.add_argument("cells", nargs="+",
                 help="run workdirs holding rollouts/ or eval/final.jsonl "
                      "(kept/ folders hold the latter)")
  p.add_argument("--schemes", default="",
                 help="comma-separated score names (default: all stored)")
  p.add_argument("--out", default=None,
                 help="folder for length_bias.md and length_bias.csv")
  a = p.parse_args(sys.argv[1:] if argv is None else argv)
  schemes = [x for x in a.schemes.split(",") if x]
  rows, held = [], []
  for cell in a.cells:
    has_store = os.path.isdir(os.path.join(cell, "rollouts"))
    if has_store:
      rows += cell_rows(cell, schemes)
    h = heldout_row(cell)
    if h is not None:
      held.append(h)
    elif not has_store:
      raise FileNotFoundError(f"{cell}: neither rollouts/ nor "
                              f"eval/final.jsonl")
  md = "\n\n".join(t for t in (
      table(rows) if rows else "", summary_table(held) if held else "",
      heldout_table(held) if held else "") if t)
  print(md)
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    command = "python -m experiments.length_bias " + " ".join(
        reglob(sys.argv[1:] if argv is None else argv))
    with open(os.path.join(a.out, "length_bias.md"), "w",
              encoding="utf-8") as fh:
      fh.write(f"# Length preference of the ranking schemes\n\n`{command}`\n\n"
               f"{md}\n\nshorter preferred: of a prompt's candidate pairs of "
               f"unequal length, the share whose shorter member scores "
               f"higher (0.5: blind to length), mean over prompts. right is "
               f"shorter: of the (right, wrong) pairs of unequal length, the "
               f"share whose right member is the shorter (what a perfect "
               f"ranking would show). empty top: prompts where an empty "
               f"candidate scores highest, of those with both an empty and "
               f"a non-empty one. answers of <= 1 token: held-out greedy "
               f"answers with at most one token before the stop.\n")
      for path in plot(rows, held, a.out):
        name = os.path.basename(path)
        fh.write(f"\n![{name[:-4].replace('_', ' ')}]({name})\n")
    common.write_csv(os.path.join(a.out, "length_bias.csv"), rows, COLUMNS)
    common.write_csv(os.path.join(a.out, "heldout_lengths.csv"), held,
                     HELDOUT_COLUMNS)
  return rows + held


if __name__ == "__main__":
  main()
