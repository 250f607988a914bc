r"""How does each self-ranking scheme score fixed answers against the anchor?

  python -m experiments.probes \
      --model=experiments/main_table/small/cells/sft/reference \
      --schemes=judge,pairwise_judge,pmi,anchor_recon,similarity \
      --out=experiments/ablation/probes

The grid's judge cells learned to answer "No" (experiments/README.md). This
study asks the scorer directly, with no training and no sampling: for each
prompt of --prompts (with its reference answer as the anchor, as the
simulated teacher gives it) it builds one group of probe candidates,

  anchor      the anchor itself (right),
  off_by_one  the anchor's integer + 1 (wrong, well-formed; only when every
              anchor is an integer),
  other       the next prompt's anchor that differs from this one (wrong,
              well-formed),
  No, Yes, I don't know   fixed non-answers,
  empty       no token at all,

scores the group with each scheme (`ranking.score_group`, --model as the
scorer, the anchor not appended) and reports per scheme and probe, over
prompts (95 % bootstrap CI over prompts):

  top         the share of prompts where the probe scores highest in its
              group (ties split evenly);
  over_anchor the share where it scores above the anchor (ties 1/2);
  over_other  the share where it scores above `other`, a wrong number
              (ties 1/2): a sound scorer puts every non-answer below it;
  rank        its mean rank in the group (1 = best, ties averaged).

A scheme that ranks `No` above a wrong number gives a policy a reason to
answer "No". --template swaps the scheme's template (one scheme at a
time), to test whether a judge question of one's own fixes what the
default one rewards. Writes probes.md, probes.csv (one row per scheme x probe) and
probes.png (top share per scheme and probe) to --out.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from purld_jax import evaluate  # noqa: E402
from purld_jax import prompts as prompts_lib  # noqa: E402

FIXED = ("No", "Yes", "I don't know", "empty")
COLUMNS = ("scheme", "probe", "prompts", "top", "top_lo", "top_hi",
           "over_anchor", "over_anchor_lo", "over_anchor_hi", "over_other",
           "over_other_lo", "over_other_hi", "rank")


def _integer(text: str) -> int | None:
  try:
    return int(text.strip())
  except ValueError:
    return None


def probe_texts(anchors: Sequence[str]) -> dict[str, list[str]]:
  """Probe name -> one text per prompt (module docstring); `empty` is "".

  `other` is the next anchor (cyclically) that differs from the prompt's
  own; a set whose anchors are all equal has no `other`, an error.
  """
  n = len(anchors)
  if n < 2:
    raise ValueError(f"{n} prompt(s): probes need at least 2")
  out = {"anchor": list(anchors)}
  numbers = [_integer(a) for a in anchors]
  if all(x is not None for x in numbers):
    out["off_by_one"] = [str(x + 1) for x in numbers]
  other = []
  for i, a in enumerate(anchors):
    for step in range(1, n):
      b = anchors[(i + step) % n]
      if b.strip() != a.strip():
        other.append(b)
        break
    else:
      raise ValueError("every anchor is the same: no wrong answer to probe")
  out["other"] = other
  for name in FIXED:
    out[name] = [("" if name == "empty" else name)] * n
  return out


def compare(scores: np.ndarray, j: int, i: int) -> np.ndarray:
  """f[B]: 1 where column j scores above column i, 1/2 on a tie, else 0."""
  return ((scores[:, j] > scores[:, i]).astype(np.float64)
          + 0.5 * (scores[:, j] == scores[:, i]))


def top_share(scores: np.ndarray, j: int) -> np.ndarray:
  """f[B]: 1/(number tied at the maximum) where column j is among them."""
  best = scores.max(axis=1, keepdims=True)
  at = scores == best
  return at[:, j] / at.sum(axis=1)


def mean_rank(scores: np.ndarray, j: int) -> np.ndarray:
  """f[B]: 1 + (members above j) + (other members tied with j) / 2."""
  above = (scores > scores[:, j:j + 1]).sum(axis=1)
  tied = (scores == scores[:, j:j + 1]).sum(axis=1) - 1
  return 1.0 + above + tied / 2.0


def rows_for(scheme: str, names: Sequence[str], scores: np.ndarray
             ) -> list[dict]:
  """One row per probe of `scores` f[B, P] (columns named by `names`)."""
  scores = np.asarray(scores, np.float64)
  if scores.shape[1] != len(names):
    raise ValueError(f"scores {scores.shape} for {len(names)} probes")
  a, o = names.index("anchor"), names.index("other")
  rows = []
  for j, name in enumerate(names):
    row = dict(scheme=scheme, probe=name, prompts=len(scores),
               rank=float(mean_rank(scores, j).mean()))
    for key, v in (("top", top_share(scores, j)),
                   ("over_anchor", None if j == a else compare(scores, j, a)),
                   ("over_other", None if j == o else compare(scores, j, o))):
      if v is None:
        row.update({key: np.nan, f"{key}_lo": np.nan, f"{key}_hi": np.nan})
      else:
        lo, hi = evaluate.bootstrap_ci(v)
        row.update({key: float(v.mean()), f"{key}_lo": lo, f"{key}_hi": hi})
    rows.append(row)
  return rows


def score_probes(model, tok, prompts: Sequence[prompts_lib.Prompt],
                 schemes: Sequence[str], **score_kwargs
                 ) -> tuple[list[str], dict[str, np.ndarray]]:
  """(probe names, scheme -> scores f[B, P]) of every prompt's probe group,
  scored by `model` (`ranking.score_group`; `score_kwargs` go to it)."""
  from purld_jax import ranking  # pylint: disable=g-import-not-at-top
  anchors = [p.answer for p in prompts]
  if any(a is None for a in anchors):
    missing = next(p.id for p in prompts if p.answer is None)
    raise ValueError(f"prompt {missing!r} has no answer to use as the anchor")
  texts = probe_texts(anchors)
  names = list(texts)
  groups = [[tok.encode(texts[n][b]) for n in names]
            for b in range(len(prompts))]
  convs = [p.as_dicts() for p in prompts]
  out = {}
  for scheme in schemes:
    t0 = time.perf_counter()
    scores, _ = ranking.score_group(model, tok, convs, anchors, groups,
                                    scheme=scheme, score_anchor=False,
                                    **score_kwargs)
    out[scheme] = np.asarray(scores)
    print(f"[probes] {scheme}: {len(groups)} groups of {len(names)} scored "
          f"in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
  return names, out


def shell_quote(arg: str) -> str:
  """`arg` as one bash word on one line (a template's newlines as $'\\n')."""
  if "\n" not in arg:
    return shlex.quote(arg)
  return "$'" + arg.replace("\\", "\\\\").replace("'", "\\'").replace(
      "\n", "\\n") + "'"


def table(rows: Sequence[dict], value: str) -> str:
  """Scheme x probe markdown of `value` ('top', 'over_anchor',
  'over_other' with CIs; 'rank' without)."""
  schemes = list(dict.fromkeys(r["scheme"] for r in rows))
  probes = list(dict.fromkeys(r["probe"] for r in rows))
  by = {(r["scheme"], r["probe"]): r for r in rows}

  def cell(r):
    if r is None or not np.isfinite(r[value]):
      return ""
    if value == "rank":
      return f"{r[value]:.2f}"
    return f"{r[value]:.2f} [{r[value + '_lo']:.2f}, {r[value + '_hi']:.2f}]"

  body = [[s] + [cell(by.get((s, p))) for p in probes] for s in schemes]
  return common.markdown_table(body, ["scheme"] + probes)


def plot(rows: Sequence[dict], path: str) -> None:
  """Grouped bars: per scheme, each probe's top share with its CI."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  schemes = list(dict.fromkeys(r["scheme"] for r in rows))
  probes = list(dict.fromkeys(r["probe"] for r in rows))
  by = {(r["scheme"], r["probe"]): r for r in rows}
  width = 0.8 / len(probes)
  fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(schemes), 3.6))
  for j, p in enumerate(probes):
    xs = np.arange(len(schemes)) + (j - (len(probes) - 1) / 2) * width
    v = np.array([by[(s, p)]["top"] for s in schemes])
    err = np.array([[v[i] - by[(s, p)]["top_lo"], by[(s, p)]["top_hi"] - v[i]]
                    for i, s in enumerate(schemes)]).T
    ax.bar(xs, v, width, yerr=err, capsize=2, label=p)
  ax.set_xticks(np.arange(len(schemes)), schemes)
  ax.set_ylabel("share of prompts where it tops the group")
  ax.set_ylim(0, 1.22)  # headroom: the legend sits above the 1.0 bars
  ax.set_yticks(np.linspace(0, 1, 6))
  ax.legend(fontsize=7, ncol=len(probes), loc="upper center")
  ax.set_title("Which probe does each scheme score highest?", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(
      prog="python -m experiments.probes",
      description=__doc__.split("\n")[0],
      epilog="See the module docstring for the probes and the columns.")
  p.add_argument("--model", default="embedded",
                 help="the scorer: an HF directory (e.g. a run's "
                      "WORKDIR/reference), or 'embedded' (SmolLM2-135M-"
                      "Instruct, the untrained student)")
  p.add_argument("--prompts", default="data/demo/eval.jsonl",
                 help="JSONL prompts whose `answer` is the anchor")
  p.add_argument("--num_prompts", type=int, default=0,
                 help="the first N prompts (0 = all)")
  p.add_argument("--schemes", default="judge,pmi,anchor_recon,similarity",
                 help="comma-separated ranking schemes")
  p.add_argument("--yes_word", default="Yes")
  p.add_argument("--no_word", default="No")
  p.add_argument("--template", default=None,
                 help="the scheme's template instead of its default "
                      "(purld_jax/templates.py; one scheme only)")
  p.add_argument("--out", default=None,
                 help="folder for probes.md, probes.csv and probes.png")
  a = p.parse_args(sys.argv[1:] if argv is None else argv)
  schemes = [s for s in a.schemes.split(",") if s]
  from purld_jax import ranking  # pylint: disable=g-import-not-at-top
  bad = [s for s in schemes if s not in ranking.SCHEMES
         or s in ("oracle", "teacher_judge")]
  if bad or not schemes:
    p.error(f"--schemes: {bad or 'none'}; choose from "
            f"{[s for s in ranking.SCHEMES if s not in ('oracle', 'teacher_judge')]}")
  if a.template is not None and len(schemes) != 1:
    p.error(f"--template applies to one scheme; --schemes has {schemes}")
  if a.template is not None:
    from purld_jax import templates  # pylint: disable=g-import-not-at-top
    problems = templates.template_problems(schemes[0], a.template)
    if problems:
      p.error("--template: " + "; ".join(problems))
  try:
    prompts = prompts_lib.read_jsonl(a.prompts)
  except (OSError, prompts_lib.PromptFileError) as e:
    p.error(f"--prompts: {e}")
  if a.num_prompts:
    prompts = prompts[:a.num_prompts]
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from purld_jax import models  # pylint: disable=g-import-not-at-top
  from purld_jax.train import student  # pylint: disable=g-import-not-at-top
  path = student.resolve_path(a.model)
  if not os.path.isfile(os.path.join(path, "config.json")):
    p.error(f"--model: no config.json in {path}")
  model, tok = models.load_pretrained(path, dtype=jnp.float32)
  try:
    names, scores = score_probes(model, tok, prompts, schemes,
                                 yes_word=a.yes_word, no_word=a.no_word,
                                 template=a.template)
  except ValueError as e:
    p.error(f"--prompts {a.prompts}: {e}")
  rows = [r for s in schemes for r in rows_for(s, names, scores[s])]
  parts = [("Tops its group", "top"),
           ("Scores above the anchor (the right answer)", "over_anchor"),
           ("Scores above another prompt's anchor (a wrong number)",
            "over_other"),
           ("Mean rank in the group (1 = best)", "rank")]
  md = "\n\n".join(f"### {title}\n\n{table(rows, key)}"
                   for title, key in parts)
  print(md)
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    args = sys.argv[1:] if argv is None else argv
    with open(os.path.join(a.out, "probes.md"), "w", encoding="utf-8") as fh:
      fh.write(f"# Probe candidates: how each scheme scores fixed answers\n\n"
               f"`python -m experiments.probes "
               f"{' '.join(shell_quote(x) for x in args)}`\n\n"
               f"{len(prompts)} prompts of {a.prompts}, scorer "
               f"{a.model}; each prompt's group holds the probes "
               f"{', '.join(names)} (experiments/probes.py). Shares over "
               f"prompts with 95 % bootstrap CIs; ties count 1/2.\n\n{md}\n")
    common.write_csv(os.path.join(a.out, "probes.csv"), rows, COLUMNS)
    plot(rows, os.path.join(a.out, "probes.png"))
  return rows


if __name__ == "__main__":
  main()
