"""What the studies report: finished cells' held-out answers, the study's
compact answers file (answers.json) and the tables and plots built from it.

The cell folders (weights, logs) stay out of git; answers.json keeps, per
cell and model, each held-out prompt's correctness and whether the answer
ended, so every table is rebuilt from it alone (a fresh clone included).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import common


def write_csv(path: str, rows: Sequence[Mapping[str, Any]],
              fields: Sequence[str]) -> None:
  import csv  # pylint: disable=g-import-not-at-top
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)


def gain_text(row: Mapping[str, Any], *, bold_significant: bool = False) -> str:
  """'+7.8 [+0.0, +15.6]': a row's gain and paired CI (fractions) in points;
  with bold_significant, the number in **bold** where the CI excludes 0."""
  g, lo, hi = (100 * row[k] for k in ("gain", "gain_lo", "gain_hi"))
  star = "**" if bold_significant and (lo > 0 or hi < 0) else ""
  return f"{star}{g:+.1f}{star} [{lo:+.1f}, {hi:+.1f}]"


def markdown_table(rows: Sequence[Sequence[str]], head: Sequence[str]) -> str:
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join("---" for _ in head) + "|"]
  lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
  return "\n".join(lines)


def folder_answers(workdir: str, model: str):
  """`model`'s held-out answers (evaluate.Answers) in the cell folder
  `workdir` (eval/<model>.jsonl), or None when it has none."""
  from purld_jax import evaluate  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "eval", f"{model}.jsonl")
  return evaluate.read_answers(path, model) if os.path.exists(path) else None


def cell_answers(runner: common.Runner, cell_name: str, model: str):
  """`folder_answers` of the runner's cell `cell_name` (or its kept copy)."""
  return folder_answers(runner.results(cell_name), model)


def pooled(answers: Sequence, where: Sequence[str]):
  """(prompt ids, f64[N] per-prompt correctness averaged over `answers`, one
  evaluate.Answers per seed). Raises naming `where` when prompt sets differ."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ids = answers[0].ids
  for a, w in zip(answers, where):
    if a.ids != ids:
      raise ValueError(f"{w}: held-out prompts differ from {where[0]}")
  return ids, np.mean([a.correct for a in answers], axis=0)


ANSWERS = "answers.json"  # the study's one compact per-prompt file


def cell_model(rung: str, seed: int, tag: str = "") -> tuple[str, str]:
  return {"untrained": (f"sft_s{seed}", "before"),
          "sft": (f"sft_s{seed}", "sft")}.get(rung, (f"{rung}{tag}_s{seed}",
                                                     "final"))


def _sha(a) -> str:
  return hashlib.sha256("\n".join(a.ids).encode()).hexdigest()


def _shares(x) -> str:
  """Per-prompt shares as one space-separated string (one line a record)."""
  return " ".join(f"{float(v):.4g}" for v in x)


def _bits(x) -> str:
  return "".join("1" if v else "0" for v in np.asarray(x, bool))


def compact(runner: common.Runner, out: str, rungs, seeds,
            tag: str = "") -> dict:
  """Adds every finished cell's answers to out/answers.json: per cell and
  model the prompt ids' order (a sha256), correct and ended as 0/1 strings
  and the mean answer length; the file keeps what was there (a cell whose
  folder is gone stays in the table). Returns the file's content."""
  from purld_jax import evaluate  # pylint: disable=g-import-not-at-top
  from purld_jax.train import heldout  # pylint: disable=g-import-not-at-top
  path = os.path.join(out, ANSWERS)
  data = {}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  for rung in rungs:
    for seed in seeds:
      cell, model = cell_model(rung, seed, tag)
      if not runner.is_done(common.Cell(cell, "")):
        continue
      src = os.path.join(runner.results(cell), "eval", f"{model}.jsonl")
      if not os.path.exists(src):
        continue
      a = evaluate.read_answers(src, model)
      data[f"{cell}/{model}"] = dict(
          ids_sha256=_sha(a), prompts=len(a.ids),
          correct=_bits(a.correct == 1), ended=_bits(a.finished),
          mean_tokens=round(float(np.mean(a.lengths)), 2))
      src = src[:-len(".jsonl")] + heldout.SAMPLED + ".jsonl"
      if os.path.exists(src):  # shares over eval.samples answers a prompt
        a = evaluate.read_answers(src, model)
        data[f"{cell}/{model}{SAMPLED}"] = dict(
            ids_sha256=_sha(a), prompts=len(a.ids),
            correct=_shares(a.correct), ended=_shares(a.finished),
            mean_tokens=round(float(np.mean(a.lengths)), 2))
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=0, sort_keys=True)
  return data


# The two accuracies (docs/METHOD.md, Protocol): key suffix in answers.json
# and the table's heading. Sampled pass@1 decides the rules.
SAMPLED = "@sampled"
METRICS = {
    "sampled": (SAMPLED, "sampled pass@1 (the share right of eval.samples "
                "answers a prompt at eval.temperature): the Protocol's "
                "metric, the rules' verdicts"),
    "greedy": ("", "greedy accuracy (one answer a prompt), beside it"),
}


def answers_of(data: dict, rung: str, seed: int, tag: str = "",
             metric: str = "greedy"):
  """(correct f64[N], ended f64[N], ids sha) of `rung` x `seed` under
  `metric` from the compact file's content, or None (not run yet)."""
  suffix = METRICS[metric][0]
  rec = data.get("/".join(cell_model(rung, seed, tag)) + suffix)
  if rec is None and rung == "untrained":
    # One model whatever the seed (model.path), decoded with the same draws
    # (the evaluation's key is not the run's seed): any SFT cell's copy.
    rec = next((v for k, v in sorted(data.items())
                if k.startswith("sft_s") and k.endswith("/before" + suffix)),
               None)
  if rec is None:
    return None
  if metric == "greedy":
    return (np.array([c == "1" for c in rec["correct"]], np.float64),
            np.array([c == "1" for c in rec["ended"]], np.float64),
            rec["ids_sha256"])
  return (np.array(rec["correct"].split(), np.float64),
          np.array(rec["ended"].split(), np.float64), rec["ids_sha256"])


def _pct(x) -> str:
  return "" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def markdown(table: Sequence[dict], header: str) -> str:
  body = []
  for r in table:
    if r.get("status") != "done":
      body.append([r["label"], "not run", "", "", "", "", ""])
      continue
    acc = (f"{_pct(r['accuracy'])} [{_pct(r['accuracy_lo'])}, "
           f"{_pct(r['accuracy_hi'])}]")
    gain = (f"{100 * r['gain']:+.1f} [{100 * r['gain_lo']:+.1f}, "
            f"{100 * r['gain_hi']:+.1f}]" if "gain" in r else "")
    body.append([r["label"], acc, _pct(r["ended"]), str(r["seeds"]),
                 r["vs"] or "", gain, r["verdict"]])
  return header + markdown_table(
      body, ["rung", "accuracy % [95 % CI]", "ended %", "seeds", "vs",
             "gain pt [95 % CI, seeds x prompts]", "verdict"]) + "\n"


def plot(by_metric: dict[str, list], path: str) -> None:
  """Bars per rung, one colour per metric, 95 % intervals."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  done = {m: [r for r in t if r.get("status") == "done"]
          for m, t in by_metric.items()}
  rungs = list(dict.fromkeys(r["rung"] for t in done.values() for r in t))
  if not rungs:
    return
  fig, ax = plt.subplots(figsize=(1.6 * len(rungs) + 2, 3.4))
  width = 0.8 / len(done)
  for j, (m, t) in enumerate(done.items()):
    x = np.array([rungs.index(r["rung"]) for r in t]) + (j - 0.5 *
                                                          (len(done) - 1)) * width
    acc = np.array([100 * r["accuracy"] for r in t])
    err = np.array([[100 * (r["accuracy"] - r["accuracy_lo"]) for r in t],
                    [100 * (r["accuracy_hi"] - r["accuracy"]) for r in t]])
    ax.bar(x, acc, width, yerr=err, capsize=3, label=m)
  ax.set_xticks(np.arange(len(rungs)), rungs, rotation=20)
  ax.set_ylabel("held-out accuracy %")
  ax.legend(fontsize=8)
  ax.set_title("learning ladder (95 % CI over seeds and prompts)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


CURVES = ("oracle_sample_accuracy", "kl", "entropy")


def curves(out: str) -> dict:
  """{stage-2 cell: {"step": [...], metric: [...]}} for CURVES, read from
  each kept cell's metrics.jsonl (kept/<cell>/; the cells' own folders are
  not in git): the training curves behind a rung's verdict, written to
  curves.json (small: one row per step) and plotted to curves.png."""
  got = {}
  kept = os.path.join(out, "kept")
  for name in sorted(os.listdir(kept)) if os.path.isdir(kept) else ():
    path = os.path.join(kept, name, "metrics.jsonl")
    if name.startswith("sft_") or not os.path.isfile(path):
      continue
    with open(path, encoding="utf-8") as f:
      recs = [json.loads(line) for line in f if line.strip()]
    recs = [r for r in recs if r.get("stage") != "sft"]
    if recs:
      got[name] = {"step": [r["step"] for r in recs], **{
          k: [r.get(k) for r in recs] for k in CURVES}}
  return got


def plot_curves(data: dict, path: str, smooth: float = 0.8) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from purld_jax import plot as plot_lib  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
  for name, c in data.items():
    for ax, k in zip(axes, CURVES):
      ys = [np.nan if v is None else v for v in c[k]]
      ax.plot(c["step"], plot_lib.ema(ys, smooth), label=name)
  for ax, k in zip(axes, CURVES):
    ax.set_title(f"{k} (EMA {smooth})")
    ax.set_xlabel("step")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def recorded(data: dict, rungs: Sequence[str], seeds: Sequence[int],
             tag: str = "", *, names: Sequence[str]
             ) -> tuple[list[str], list[int]]:
  """The rungs (in `names`' order: every rung a study knows) and seeds of
  `tag`'s table: those asked
  for and every one the compact file already holds for that tag, so that
  running one rung more (or one seed more) keeps the table's other rows."""
  have_r, have_s = set(rungs), set(seeds)
  for key in data:
    cell, _, model = key.partition("/")
    for rung in names:
      name = "sft" if rung in ("untrained", "sft") else rung + tag
      m = re.fullmatch(re.escape(name) + r"_s(\d+)", cell)
      if m and cell_model(rung, int(m[1]), tag)[1] == model.split("@")[0]:
        have_r.add(rung)
        have_s.add(int(m[1]))
  return [r for r in names if r in have_r], sorted(have_s)


