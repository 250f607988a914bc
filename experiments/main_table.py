r"""The main table (docs/METHOD.md, section 6) under the study protocol.

  python -m experiments.main_table                     # every method, eval split, 3 seeds
  python -m experiments.main_table --table_only        # rebuild from answers.json
  python -m experiments.main_table --methods=anchor_dpo,purld_dpo --seeds=0 --dry_run
  python -m experiments.main_table --scale=tiny --out=/tmp/mt   # seconds a cell

Every method is a rung of the learning ladder's study (experiments/ladder.py):
the same cells, named <method>_s<seed>, each trained from its seed's SFT
cell sft_s<seed>, in the same folder (default experiments/ladder/
<scale>_<split>), so a cell the ladder finished is not run again, and the
table is rebuilt from the study's one compact file (answers.json) alone.

Rows (METHODS, in the table's order): the initial student, SFT on anchors,
anchor-as-chosen DPO (SPIN-like), self-reward DPO (the student judges its
own candidates without the anchor), teacher-as-judge DPO (RLAIF: the
anchors stay recorded, the teacher served live scores each step's
candidates, K calls a drawn prompt; `ladder.py`'s docstring has the server
command), PU-RLD DPO / GRPO / LDL (self-ranking --scheme, the PU gate),
oracle-reward GRPO (the upper bound).

Columns: sampled pass@1 (the Protocol's metric) and greedy accuracy, each
the mean over seeds with a 95 % interval that resamples seeds and prompts;
the share of answers that ended; the gain over SFT paired by seed and
prompt, with its interval; teacher calls per drawn training prompt
(every row but the initial student learns from one anchor a prompt,
recorded once; teacher-as-judge adds K judgements each time a prompt is
drawn); wall time of a seed's cell (stage 2
and its evaluation; SFT's row: stage 1 and its evaluations).
Outputs beside the ladder's: main_table<tag>.md, .csv and .png.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from experiments import analysis  # noqa: E402
from experiments import common  # noqa: E402
from experiments import ladder  # noqa: E402

METHODS = ("untrained", "sft", "anchor_dpo", "self_reward_dpo",
           "teacher_judge_dpo", "purld_dpo", "purld_grpo", "purld_ldl",
           "oracle_grpo")
FIELDS = ("method", "label", "status", "seeds", "prompts", "sampled",
          "sampled_lo", "sampled_hi", "greedy", "greedy_lo", "greedy_hi",
          "ended", "gain", "gain_lo", "gain_hi", "greedy_gain",
          "greedy_gain_lo", "greedy_gain_hi", "teacher_calls_per_prompt",
          "wall_s")


def _wall(runner: common.Runner, method: str, seeds: Sequence[int],
          tag: str) -> float:
  """Mean seconds of a seed's cell (cells.jsonl), NaN without one."""
  if method == "untrained":
    return float("nan")
  walls = [runner.wall_s(analysis.cell_model(method, s, tag)[0])
           for s in seeds]
  walls = [w for w in walls if w is not None]
  return float(np.mean(walls)) if walls else float("nan")


def teacher_calls(method: str, k: int) -> float:
  """Teacher calls per drawn training prompt: none for the untrained
  student, the anchor for every other row, + K judgements for
  teacher-as-judge."""
  if method == "untrained":
    return 0.0
  return 1.0 + (k if method == "teacher_judge_dpo" else 0)


def rows(runner: common.Runner, data: dict, methods: Sequence[str],
         seeds: Sequence[int], tag: str = "", k: int = 4) -> list[dict]:
  """One row per method from the compact answers (`analysis.compact`): both
  metrics, the gains over SFT (ladder.rows, paired by seed and prompt),
  teacher calls (`k` candidates a prompt) and wall time."""
  by = {m: {r["rung"]: r for r in ladder.rows(data, methods, seeds, tag, m)}
        for m in analysis.METRICS}
  out = []
  for method in methods:
    s, g = by["sampled"][method], by["greedy"][method]
    row = dict(method=method, label=ladder.RUNGS[method][0],
               status="done" if "done" in (s["status"], g["status"])
               else "not run", seeds=max(s["seeds"], g["seeds"]))
    if row["status"] != "done":
      out.append(row)
      continue
    for name, r in (("sampled", s), ("greedy", g)):
      if r["status"] == "done":
        row.update({name: r["accuracy"], f"{name}_lo": r["accuracy_lo"],
                    f"{name}_hi": r["accuracy_hi"], "prompts": r["prompts"]})
      gain = "gain" if name == "sampled" else "greedy_gain"
      if "gain" in r and r["vs"] == "sft":
        row.update({gain: r["gain"], f"{gain}_lo": r["gain_lo"],
                    f"{gain}_hi": r["gain_hi"]})
    row["ended"] = (s if s["status"] == "done" else g)["ended"]
    row["teacher_calls_per_prompt"] = teacher_calls(method, k)
    row["wall_s"] = _wall(runner, method, seeds, tag)
    out.append(row)
  return out


def _pct(r: dict, key: str) -> str:
  if key not in r:
    return ""
  return (f"{100 * r[key]:.1f} [{100 * r[key + '_lo']:.1f}, "
          f"{100 * r[key + '_hi']:.1f}]")


def _gain(r: dict, key: str) -> str:
  if key not in r:
    return "(reference)" if r["method"] == "sft" else ""
  return analysis.gain_text(dict(gain=r[key], gain_lo=r[key + "_lo"],
                               gain_hi=r[key + "_hi"]), bold_significant=True)


def markdown(table: Sequence[dict], header: str) -> str:
  body = []
  for r in table:
    if r["status"] != "done":
      body.append([r["label"], "not run"] + [""] * 7)
      continue
    wall = "" if not np.isfinite(r["wall_s"]) else f"{r['wall_s'] / 60:.0f}"
    body.append([r["label"], _pct(r, "sampled"), _gain(r, "gain"),
                 _pct(r, "greedy"), _gain(r, "greedy_gain"),
                 f"{100 * r['ended']:.1f}", str(r["seeds"]),
                 f"{r['teacher_calls_per_prompt']:.0f}", wall])
  return header + analysis.markdown_table(body, [
      "method", "sampled pass@1 % [95 % CI]", "gain vs SFT, pt",
      "greedy % [95 % CI]", "greedy gain vs SFT, pt", "ended %", "seeds",
      "teacher calls / prompt", "min / seed"]) + "\n"


def write(runner: common.Runner, methods, seeds, out: str, header: str,
          tag: str = "", k: int = 4) -> list[dict]:
  """Adds the finished cells to answers.json (`analysis.compact`) and writes
  main_table<tag>.md/.csv/.png (`k`: candidates a prompt)."""
  data = analysis.compact(runner, out, methods, seeds, tag)
  table = rows(runner, data, methods, seeds, tag, k)
  name = os.path.join(out, f"main_table{tag}")
  with open(name + ".md", "w", encoding="utf-8") as f:
    f.write(markdown(table, header))
  analysis.write_csv(name + ".csv", table, FIELDS)
  analysis.plot(ladder.tables(data, methods, seeds, tag), name + ".png")
  return table


def parse_args(argv):
  p = ladder.study_parser("main_table", __doc__, tag="main_table")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma list of {', '.join(METHODS)}")
  p.add_argument("--table_only", action="store_true",
                 help="rebuild the table from answers.json; run nothing")
  a = ladder.study_args(p, argv)
  a.methods = [m for m in a.methods.split(",") if m]
  bad = [m for m in a.methods if m not in METHODS]
  if bad:
    p.error(f"--methods: unknown {bad} (known: {', '.join(METHODS)})")
  return a


def main(argv=None, *, runner: common.Runner | None = None):
  argv = sys.argv[1:] if argv is None else argv
  a = parse_args(argv)
  runner = runner or common.Runner(a.out)
  todo = ladder.cells(a.methods, a.seeds, scale=a.scale, split=a.split,
                      scheme=a.scheme, extra=a.extra, train=a.train,
                      tag=a.tag, config=a.config)
  if a.dry_run:
    runner.dry_run(todo)
    return 0
  os.makedirs(a.out, exist_ok=True)
  k = int(ladder.setting(ladder.config_file(a.scale, a.config),
                         "sampling.num_candidates", {**a.extra, **a.train}))
  header = (f"# Main table ({a.scale} scale, {a.split} split)\n\n"
            f"`python -m experiments.main_table {' '.join(argv)}`\n\n"
            f"PU-RLD self-ranking: {a.scheme}, PU gate. Intervals: 95 %, "
            "over seeds and prompts; gains paired by seed and prompt; "
            "**bold**: the interval excludes zero. A row with fewer than 3 "
            "seeds is progress, not a result (the Protocol publishes a row "
            "at 3 seeds or more).\n\n")
  rc = 0
  if not a.table_only:
    recorded = set(analysis.compact(runner, a.out, a.methods, a.seeds, a.tag))
    rc = ladder.run_cells(runner, todo, recorded, lambda: write(
        runner, a.methods, a.seeds, a.out, header, a.tag, k),
                          prog="main_table")
  table = write(runner, a.methods, a.seeds, a.out, header, a.tag, k)
  print(markdown(table, header))
  return rc


if __name__ == "__main__":
  sys.exit(main())
