r"""Paired comparison of finished cells: B minus A on the same held-out prompts.

  python -m experiments.compare \
      --a=experiments/ablation/small_b/cells/k4_pmi_grpo_s0 \
      --b=experiments/ablation/small_b/cells/k4_pmi_ldl_s0

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
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from experiments import main_table  # noqa: E402
from purld_jax import evaluate  # noqa: E402


def side(folders: Sequence[str], model: str) -> tuple[tuple, np.ndarray]:
  """(prompt ids, f64[S, N] per-prompt correctness of each of the S
  `folders`)."""
  answers = [main_table.folder_answers(d, model) for d in folders]
  for d, a in zip(folders, answers):
    if a is None:
      raise FileNotFoundError(
          f"{os.path.join(d, 'eval', model + '.jsonl')}: no answers (is the "
          f"cell finished? try --model=sft or before)")
  ids, _ = main_table.pooled(answers, list(folders))
  return ids, np.stack([a.correct for a in answers])


def compare(a: Sequence[str], b: Sequence[str], *, model: str = "final",
            model_a: str | None = None) -> dict:
  """Accuracies of the two sides, mean(b - a) and its paired CI over
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
              a=float(ca.mean()), a_lo=lo_a, a_hi=hi_a,
              b=float(cb.mean()), b_lo=lo_b, b_hi=hi_b,
              diff=float((cb - ca).mean()), diff_lo=lo, diff_hi=hi,
              diff_lo_seeds=slo, diff_hi_seeds=shi,
              only_a=int(np.sum(ca > cb)), only_b=int(np.sum(cb > ca)))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m experiments.compare",
                              description=__doc__.split("\n")[0])
  p.add_argument("--a", required=True, help="cell folder(s), comma-separated")
  p.add_argument("--b", required=True, help="cell folder(s), comma-separated")
  p.add_argument("--model", default="final",
                 help="eval/<model>.jsonl of each cell (final | sft | before)")
  p.add_argument("--model_a", default=None,
                 help="side A's model when it differs (e.g. sft)")
  a = p.parse_args(sys.argv[1:] if argv is None else argv)
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
