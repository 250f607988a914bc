r"""Do a run's scores reward candidates that begin with given words?

  python -m experiments.answer_words experiments/ablation/small_b/cells/k* \
      --schemes=judge,pairwise_judge --words=No,Yes \
      --out=experiments/ablation/answer_words

The judge schemes read the policy's candidates inside a template that ends
"... Answer Yes or No." and score the log-probs of those two words; a
candidate that itself says one of them may sway the judge, and a policy
trained on the scores can learn to say what the judge rewards (here:
"No", whatever the judge's answer words; experiments/README.md). For each
cell (a run's
workdir with its rollouts/ store, purld_jax/rollout_store.py), each score
stored in it and each word, over every stored step's real prompts:

  share_first, share_last  the share of candidates that begin with the word
                 (case-insensitive, the word whole: "No," and "no" count,
                 "None" does not) at the first and the last stored step:
                 the policy's drift towards it;
  word_pref      of a prompt's (with the word, without) candidate pairs,
                 the share whose candidate with the word scores higher
                 (ties 1/2; 0.5 = blind to the word), mean over the prompts
                 that have both kinds, with a 95 % bootstrap CI over them
                 (`diagnostics.shorter_preferred` with "has the word" as the
                 shorter);
  top_share      of those prompts, the share whose top-scored candidate
                 begins with the word, beside `top_chance`, what a ranking
                 blind to the word would give (mean share of such
                 candidates in those prompts);
  heldout, sft_heldout  greedy held-out answers (eval/final.jsonl,
                 eval/sft.jsonl) that begin with the word.

Needs no model. Writes answer_words.md and answer_words.csv to --out.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from experiments import length_bias  # noqa: E402
from experiments import main_table  # noqa: E402
from purld_jax import diagnostics  # noqa: E402
from purld_jax import evaluate  # noqa: E402

COLUMNS = ("cell", "scheme", "word", "steps", "candidates", "share_first",
           "share_last", "prompts", "word_pref", "word_pref_lo",
           "word_pref_hi", "top_share", "top_chance", "heldout",
           "sft_heldout", "heldout_prompts")


def begins_with(text: str, word: str) -> bool:
  """`text` (stripped) begins with `word`, case-insensitive, as a whole
  word: "No, no" and "no." do for "No", "None" and "Nothing" do not."""
  return re.match(rf"\s*{re.escape(word)}\b", text, re.IGNORECASE) is not None


def cell_rows(workdir: str, words: Sequence[str],
              schemes: Sequence[str] | None = None) -> list[dict]:
  """One row per (score stored in `workdir`/rollouts, word): COLUMNS; only
  the scores named in `schemes` when given (none: no row)."""
  rollouts = length_bias.read_rollouts(workdir)
  held = {m: main_table.folder_answers(workdir, m) for m in ("final", "sft")}
  rows = []
  names = sorted({s for r in rollouts for s in r.scores})
  if schemes:
    names = [n for n in names if n in schemes]
  for name in names:
    steps = [r for r in rollouts if name in r.scores]
    for word in words:
      shares, pref, top, chance, n_cands = [], [], [], [], 0
      for r in steps:
        keep = np.asarray(r.valid, bool)
        has = np.array([[begins_with(t, word) for t in group]
                        for group in r.texts], bool)[keep]
        s = np.asarray(r.scores[name], np.float64)[keep]
        shares.append(float(has.mean()) if has.size else np.nan)
        n_cands += has.size
        # "has the word" as the shorter of a pair: shorter_preferred's
        # share of (with, without) pairs whose first member scores higher.
        p = diagnostics.shorter_preferred(s, (~has).astype(np.int32))
        both = ~np.isnan(p)
        pref.append(p[both])
        hb = has[both]
        top.append(hb[np.arange(len(hb)), s[both].argmax(-1)])
        chance.append(has[both].mean(-1))
      p = np.concatenate(pref)
      lo, hi = evaluate.bootstrap_ci(p) if len(p) else (np.nan, np.nan)
      count = lambda a: (sum(begins_with(t, word) for t in a.texts)
                         if a is not None else np.nan)
      rows.append(dict(
          cell=length_bias.label(workdir), scheme=name, word=word,
          steps=len(steps), candidates=n_cands, share_first=shares[0],
          share_last=shares[-1], prompts=len(p),
          word_pref=float(p.mean()) if len(p) else np.nan,
          word_pref_lo=lo, word_pref_hi=hi,
          top_share=float(np.concatenate(top).mean()) if len(p) else np.nan,
          top_chance=float(np.concatenate(chance).mean()) if len(p)
          else np.nan,
          heldout=count(held["final"]), sft_heldout=count(held["sft"]),
          heldout_prompts=(len(held["final"].texts) if held["final"]
                           is not None else 0)))
  return rows


def table(rows: Sequence[dict]) -> str:
  f2 = lambda x: "n/a" if not np.isfinite(x) else f"{x:.2f}"
  num = lambda x: "n/a" if not np.isfinite(x) else f"{int(x)}"
  body = [[r["cell"], r["scheme"], r["word"], str(r["steps"]),
           f"{f2(r['share_first'])} -> {f2(r['share_last'])}",
           f"{f2(r['word_pref'])} [{f2(r['word_pref_lo'])}, "
           f"{f2(r['word_pref_hi'])}]", str(r["prompts"]),
           f"{f2(r['top_share'])} ({f2(r['top_chance'])})",
           f"{num(r['heldout'])} / {num(r['sft_heldout'])}"]
          for r in rows]
  return common.markdown_table(body, [
      "cell", "scores", "word", "steps", "candidates with it, first -> last "
      "step", "preferred [95% CI]", "prompts with both",
      "top-scored has it (blind)", "held-out answers with it: final / SFT"])


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(
      prog="python -m experiments.answer_words",
      description=__doc__.split("\n")[0],
      epilog="See the module docstring for each column.")
  p.add_argument("cells", nargs="+", help="run workdirs holding rollouts/")
  p.add_argument("--words", default="Yes,No",
                 help="comma-separated words (the judge's answers)")
  p.add_argument("--schemes", default="",
                 help="comma-separated score names to report (default: all "
                      "stored); a cell holding none of them adds no row")
  p.add_argument("--out", default=None,
                 help="folder for answer_words.md and answer_words.csv")
  a = p.parse_args(sys.argv[1:] if argv is None else argv)
  words = [w for w in a.words.split(",") if w]
  if not words:
    p.error("--words: give at least one word")
  schemes = [x for x in a.schemes.split(",") if x]
  rows = []
  for cell in a.cells:
    try:
      rows += cell_rows(cell, words, schemes)
    except (FileNotFoundError, ValueError) as e:
      p.error(str(e))
  if not rows:
    p.error(f"no cell holds scores named {schemes}")
  md = table(rows)
  print(md)
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    command = "python -m experiments.answer_words " + " ".join(
        length_bias.reglob(sys.argv[1:] if argv is None else argv))
    with open(os.path.join(a.out, "answer_words.md"), "w",
              encoding="utf-8") as fh:
      fh.write(f"# Do the scores reward candidates that begin with these "
               f"words?\n\n"
               f"`{command}`\n\n{md}\n\npreferred: of a prompt's (begins "
               f"with the word, does not) candidate pairs, the share whose "
               f"candidate with the word scores higher (0.5: blind to it), "
               f"mean over the prompts with both kinds. top-scored has it: "
               f"of those prompts, the share whose best-scored candidate "
               f"begins with the word (in brackets what a ranking blind to "
               f"it would give). Candidates and answers count when they "
               f"begin with the word, case-insensitive, as a whole word.\n")
    common.write_csv(os.path.join(a.out, "answer_words.csv"), rows, COLUMNS)
  return rows


if __name__ == "__main__":
  main()
