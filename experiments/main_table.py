r"""The main table: held-out accuracy of PU-RLD and every baseline, one command.

  python -m experiments.main_table --scale=small                 # ~1 h, 2-core CPU
  python -m experiments.main_table --scale=small --seeds=0,1 --dry_run
  python -m experiments.main_table --scale=tiny --out=/tmp/mt    # seconds per cell
  python -m experiments.main_table --scale=paper --dry_run \
      --student=/models/Qwen2.5-0.5B-Instruct \
      --train_path=runs/tasks/gsm8k/train.jsonl --eval_path=runs/tasks/gsm8k/eval.jsonl \
      --teacher_url=http://127.0.0.1:8080/v1 --teacher_model=NAME

Rows (METHODS): SFT on anchors, PU-RLD with DPO / GRPO / LDL (self-ranking
`--scheme`, default anchor_recon), anchor-as-chosen DPO, self-reward DPO,
teacher-as-judge DPO, oracle-reward GRPO; plus the initial student for
reference. Every method starts from ONE shared SFT reference (cell `sft`,
recipe sft), so the gains are paired against the same model; the SFT row is
that cell's `sft` model. Each other method x seed is one cell (the cell
runner, experiments/common.py) that runs PU-RL from that reference.

Scales:
  small  configs/demo.py (embedded SmolLM2-135M, arithmetic, SIMULATED
         dataset teacher: anchors are the reference answers; the teacher
         judge is simulated too: it scores by the reference answer, i.e. it
         is the oracle) with the method's overrides (METHODS).
         --teacher=endpoint asks a real OpenAI-compatible teacher instead
         (--teacher_url, --teacher_model, --teacher_key_env), e.g. the
         optional Qwen2.5-Coder-0.5B of `python -m purld_jax.tools.get_teacher`
         served by llama.cpp; the table then says how many of its anchors
         are right.
  tiny   the same on configs/demo.py:tiny (random tiny model): tests.
  paper  each method's own config file (configs/purld_*.py,
         configs/baselines/*.py) with --student, the task files and an
         OpenAI-compatible teacher endpoint: for a GPU/TPU host.
--override=KEY=VALUE (repeatable) changes every cell (e.g. rl.steps=2).

Outputs in --out (default experiments/main_table/<scale>): table.md,
table.csv, accuracy.png and cells/ + cells.jsonl (per-cell runs, wall time).
Accuracy is the mean over seeds; its 95 % CI a bootstrap over held-out
prompts of the per-prompt mean over seeds; the gain over SFT is paired on
the same prompts. Teacher calls per training prompt: 1 anchor (the ledger
asks once per prompt) plus, for teacher-as-judge, the judge requests per
prompt drawn (K per draw; `judge_calls` of metrics.jsonl). Wall time: the
method's cells (their PU-RL and `final` evaluation; the SFT row: the shared
stage 1 and the before/sft evaluations). Re-running the command skips
finished cells and rebuilds the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Mapping, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

REFERENCE = "sft"  # the shared stage-1 cell


@dataclasses.dataclass(frozen=True)
class Method:
  """A row: its own config file (paper scale) and the overrides that make
  configs/demo.py this method (small and tiny scales)."""

  key: str
  label: str
  config: str
  overrides: Mapping[str, Any]
  self_ranking: bool = False  # takes --scheme


METHODS = (
    Method("sft_only", "SFT on anchors", "configs/baselines/sft_only.py", {}),
    Method("purld_dpo", "PU-RLD DPO", "configs/purld_dpo.py",
           {"recipe": "dpo", "preference.kind": "pairwise",
            "preference.pairs": "best_vs_worst"}, self_ranking=True),
    Method("purld_grpo", "PU-RLD GRPO", "configs/purld_grpo.py",
           {"recipe": "grpo", "preference.kind": "listwise",
            "loss.grpo.inner_iterations": 2}, self_ranking=True),
    Method("purld_ldl", "PU-RLD LDL", "configs/purld_ldl.py",
           {"recipe": "ldl", "preference.kind": "listwise",
            "pu.include_anchor": True}, self_ranking=True),
    Method("anchor_as_chosen", "anchor-as-chosen DPO (SPIN-like)",
           "configs/baselines/anchor_as_chosen.py",
           {"recipe": "dpo", "preference.kind": "pairwise",
            "preference.pairs": "anchor_as_chosen"}),
    Method("self_reward", "self-reward DPO (no anchor)",
           "configs/baselines/self_reward.py",
           {"recipe": "dpo", "ranking.scheme": "self_reward",
            "preference.kind": "pairwise",
            "preference.pairs": "best_vs_worst"}),
    Method("teacher_judge", "teacher-as-judge DPO (RLAIF)",
           "configs/baselines/teacher_judge.py",
           {"recipe": "dpo", "ranking.scheme": "teacher_judge",
            "preference.kind": "pairwise",
            "preference.pairs": "best_vs_worst"}),
    Method("oracle_grpo", "oracle-reward GRPO (upper bound)",
           "configs/baselines/oracle_grpo.py",
           {"recipe": "grpo", "ranking.scheme": "oracle",
            "preference.kind": "listwise",
            "loss.grpo.inner_iterations": 2}),
)
BY_KEY = {m.key: m for m in METHODS}
# Keys of the method config files that set the scale, not the method.
SCALE_KEYS = ("sampling.num_candidates", "sft.steps", "rl.steps")
STUDY_OVERRIDES = {"export.dir": ""}  # no serving export per cell


def _teacher_overrides(a) -> dict:
  """The OpenAI-compatible endpoint of --teacher_url/_model/_key_env."""
  return {"teacher.backend": "openai", "teacher.base_url": a.teacher_url,
          "teacher.model": a.teacher_model,
          "teacher.api_key_env": a.teacher_key_env}


def _paper_overrides(a) -> dict:
  return {"model.path": a.student, "model.dtype": "bfloat16",
          "data.train_path": a.train_path, "data.eval_path": a.eval_path,
          **_teacher_overrides(a), **STUDY_OVERRIDES}


def base(scale: str, paper: Mapping[str, Any] = ()) -> tuple[str, dict]:
  """(config file, overrides) every small/tiny cell starts from; at paper
  scale the overrides alone (each method has its own config file)."""
  if scale == "paper":
    return "configs/purld_dpo.py", dict(paper)
  tiny = {"mesh.data": 1, "log.tensorboard": False} if scale == "tiny" else {}
  return ("configs/demo.py" + (":tiny" if scale == "tiny" else ""),
          {**STUDY_OVERRIDES, **tiny})


def reference_cell(scale: str, *, extra: Mapping[str, Any] = (),
                   paper: Mapping[str, Any] = ()) -> common.Cell:
  """The shared stage-1 cell (recipe sft): the same in every study, so one
  study's finished cell can serve another (--reference_from)."""
  config, over = base(scale, paper)
  return common.Cell(REFERENCE, config, {**over, "recipe": "sft",
                                         **dict(extra)})


def method_cell(name: str, method: Method, scale: str, seed: int, *,
                more: Mapping[str, Any] = (), extra: Mapping[str, Any] = (),
                paper: Mapping[str, Any] = ()) -> common.Cell:
  """`method` from the shared reference; `more` (e.g. ranking.scheme) after
  the method's overrides, `extra` (the command line's) last."""
  config, over = base(scale, paper)
  if scale == "paper":
    config = method.config
  else:
    over.update(method.overrides)
  over.update(more)
  return common.Cell(name, config, {**over, **dict(extra)}, seed=seed,
                     reference=REFERENCE)


def cells(scale: str, methods: Sequence[str], seeds: Sequence[int], *,
          scheme: str = "anchor_recon", extra: Mapping[str, Any] = (),
          paper: Mapping[str, Any] = ()) -> list[common.Cell]:
  """The study's cells: the shared SFT reference, then method x seed (the
  SFT row is the reference cell's `sft` model)."""
  out = [reference_cell(scale, extra=extra, paper=paper)]
  for key in methods:
    m = BY_KEY[key]
    if key == "sft_only":
      continue
    more = {"ranking.scheme": scheme} if m.self_ranking else {}
    out += [method_cell(f"{key}_s{seed}", m, scale, seed, more=more,
                        extra=extra, paper=paper) for seed in seeds]
  return out


# ----------------------------------------------------------------------------
# The table


def folder_answers(workdir: str, model: str):
  """`model`'s held-out answers (evaluate.Answers) in the cell folder
  `workdir` (eval/<model>.jsonl), or None when it has none."""
  from purld_jax import evaluate  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "eval", f"{model}.jsonl")
  return evaluate.read_answers(path, model) if os.path.exists(path) else None


def cell_answers(runner, cell_name: str, model: str):
  """`folder_answers` of the runner's cell `cell_name` (or its kept copy)."""
  return folder_answers(runner.results(cell_name), model)


def pooled(answers: Sequence, where: Sequence[str]) -> tuple[tuple, np.ndarray]:
  """(prompt ids, f64[N] per-prompt correctness averaged over `answers`, one
  evaluate.Answers per seed). Raises naming `where` when prompt sets differ."""
  ids = answers[0].ids
  for a, w in zip(answers, where):
    if a.ids != ids:
      raise ValueError(f"{w}: held-out prompts differ from {where[0]}")
  return ids, np.mean([a.correct for a in answers], axis=0)


def seed_columns(answers: Sequence, seeds: Sequence[int], sft) -> dict:
  """For two seeds or more (evaluate.Answers of one method, one per seed, on
  `sft`'s prompts): `seed_gains` {seed: gain over `sft`} and the interval of
  the mean gain that resamples seeds as well as prompts (`gain_lo_seeds`,
  `gain_hi_seeds`; `evaluate.seed_prompt_ci`). {} for fewer seeds."""
  from purld_jax import evaluate  # pylint: disable=g-import-not-at-top
  if len(answers) < 2:
    return {}
  correct = np.stack([a.correct for a in answers]).astype(np.float64)
  lo, hi = evaluate.seed_prompt_ci(correct, baseline=sft.correct)
  gains = (correct - np.asarray(sft.correct, np.float64)[None]).mean(axis=1)
  return dict(seed_gains={int(s): float(g) for s, g in zip(seeds, gains)},
              gain_lo_seeds=lo, gain_hi_seeds=hi)


def _seed_of(name: str) -> int:
  return int(name.rsplit("_s", 1)[1])


def _teacher_calls(workdir: str) -> float:
  """1 anchor per training prompt + judge requests per prompt drawn."""
  from purld_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  recs = [r for r in metrics_lib.read(workdir) if "judge_calls" in r]
  if not recs:
    return 1.0
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  drawn = max(1, recs[-1]["step"] * cfg["rl"]["batch_size"])
  return 1.0 + recs[-1]["judge_calls"] / drawn


def accuracy_row(runner: common.Runner, names: Sequence[str], *,
                 model: str = "final", sft=None) -> dict:
  """Held-out accuracy of `model` in the finished cells `names` (one per
  seed, named ..._s<seed>): mean over seeds, bootstrap CI over prompts of
  the per-prompt mean, gain over `sft` (Answers) with its paired CI (and,
  with two seeds or more, `seed_columns`), teacher calls per training
  prompt, wall time of the cells (s). status 'not run' without any."""
  from purld_jax import evaluate  # pylint: disable=g-import-not-at-top
  done = [n for n in names if runner.is_done(common.Cell(n, ""))]
  found = [(n, cell_answers(runner, n, model)) for n in done]
  found = [(n, a) for n, a in found if a is not None]
  if not found:
    return dict(status="not run", seeds=0)
  ids, correct = pooled([a for _, a in found], [n for n, _ in found])
  if sft is not None and sft.ids != ids:
    raise ValueError(f"{names}: held-out prompts differ from {REFERENCE}")
  lo, hi = evaluate.bootstrap_ci(correct)
  walls = [runner.wall_s(n) for n in done]
  r = dict(status="done", seeds=len(found), prompts=len(ids),
           accuracy=float(correct.mean()), accuracy_lo=lo, accuracy_hi=hi,
           teacher_calls_per_prompt=float(np.mean(
               [_teacher_calls(runner.results(n)) for n in done])),
           wall_s=(sum(walls) if None not in walls else float("nan")))
  if sft is not None and model != "sft":
    glo, ghi = evaluate.paired_ci(sft.correct, correct)
    r.update(gain=float((correct - sft.correct).mean()), gain_lo=glo,
             gain_hi=ghi)
    if len(found) > 1:  # one cell per seed, named ..._s<seed>
      r.update(seed_columns([a for _, a in found],
                            [_seed_of(n) for n, _ in found], sft))
  return r


def rows(runner: common.Runner, methods: Sequence[str],
         seeds: Sequence[int]) -> list[dict]:
  """One row per method (and the initial student) from the finished cells;
  a method with no finished cell has status 'not run'."""
  sft = cell_answers(runner, REFERENCE, "sft")
  out = [dict(method="before", label="initial student (no training)",
              **accuracy_row(runner, [REFERENCE], model="before", sft=sft),
              )]
  out[0].update(teacher_calls_per_prompt=0.0, wall_s=float("nan"))
  for key in methods:
    label = BY_KEY[key].label
    if key == "sft_only":  # the shared reference cell (stage 1, 2 evals)
      out.append(dict(method=key, label=label,
                      **accuracy_row(runner, [REFERENCE], model="sft")))
    else:
      out.append(dict(method=key, label=label, **accuracy_row(
          runner, [f"{key}_s{s}" for s in seeds], sft=sft)))
  return out


FIELDS = ("method", "label", "status", "seeds", "prompts", "accuracy",
          "accuracy_lo", "accuracy_hi", "gain", "gain_lo", "gain_hi",
          "seed_gains", "gain_lo_seeds", "gain_hi_seeds",
          "teacher_calls_per_prompt", "wall_s")


def _pct(x) -> str:
  return "" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def seed_text(row: Mapping[str, Any]) -> tuple[str, str]:
  """('s0 +7.8, s1 +7.0', '+7.4 [-0.8, +15.6]'): each seed's gain and the
  gain's interval over seeds and prompts, in points; ('', '') without."""
  if "seed_gains" not in row:
    return "", ""
  each = ", ".join(f"s{s} {100 * g:+.1f}" for s, g in row["seed_gains"].items())
  return each, common.gain_text(dict(gain=row["gain"],
                                     gain_lo=row["gain_lo_seeds"],
                                     gain_hi=row["gain_hi_seeds"]))


def markdown(table: Sequence[dict], header: str) -> str:
  body = []
  for r in table:
    if r["status"] != "done":
      body.append([r["label"], r["status"], "", "", "", "", "", "", ""])
      continue
    acc = f"{_pct(r['accuracy'])} [{_pct(r['accuracy_lo'])}, " \
          f"{_pct(r['accuracy_hi'])}]"
    gain = (common.gain_text(r) if "gain" in r else "(reference)"
            if r["method"] == "sft_only" else "")
    wall = "" if not np.isfinite(r["wall_s"]) else f"{r['wall_s']:.0f}"
    body.append([r["label"], r["seeds"], r["prompts"], acc, gain,
                 *seed_text(r), f"{r['teacher_calls_per_prompt']:.2f}", wall])
  return header + "\n\n" + common.markdown_table(
      body, ["method", "seeds", "held-out prompts", "accuracy % [95% CI]",
             "gain vs SFT, pt [paired 95% CI]", "each seed's gain, pt",
             "gain, 95% CI over seeds and prompts", "teacher calls / prompt",
             "wall time (s)"]) + "\n"


def plot(table: Sequence[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  done = [r for r in table if r["status"] == "done"]
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(1, len(done)), 4))
  x = np.arange(len(done))
  acc = np.array([100 * r["accuracy"] for r in done])
  err = np.array([[100 * (r["accuracy"] - r["accuracy_lo"]) for r in done],
                  [100 * (r["accuracy_hi"] - r["accuracy"]) for r in done]])
  ax.bar(x, acc, yerr=err.reshape(2, -1), capsize=4,
         color=["#999999" if r["method"] in ("before", "sft_only")
                else "#3b75af" for r in done])
  sft = [r for r in done if r["method"] == "sft_only"]
  if sft:
    ax.axhline(100 * sft[0]["accuracy"], ls="--", lw=1, color="k")
  ax.set_xticks(x)
  ax.set_xticklabels([r["method"] for r in done], rotation=35, ha="right")
  ax.set_ylabel("held-out accuracy (%), 95% CI")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(runner: common.Runner, methods, seeds, out: str,
          header: str) -> list[dict]:
  table = rows(runner, methods, seeds)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
    f.write(markdown(table, header))
  common.write_csv(os.path.join(out, "table.csv"), [
      {**r, "seed_gains": ";".join(f"{s}:{g:.6f}" for s, g in
                                   r["seed_gains"].items())}
      if "seed_gains" in r else r for r in table], FIELDS)
  plot(table, os.path.join(out, "accuracy.png"))
  return table


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m experiments.main_table",
                              description=__doc__.split("\n")[0])
  p.add_argument("--scale", choices=("tiny", "small", "paper"),
                 default="small")
  p.add_argument("--seeds", default="0", help="comma list of config.seed")
  p.add_argument("--methods", default=",".join(m.key for m in METHODS))
  p.add_argument("--scheme", default="anchor_recon",
                 help="self-ranking of the PU-RLD rows")
  p.add_argument("--out", default="", help="default experiments/main_table/"
                 "<scale>")
  p.add_argument("--override", action="append", default=[],
                 help="KEY=VALUE for every cell (repeatable)")
  p.add_argument("--dry_run", action="store_true",
                 help="list the cells and their commands; run nothing")
  p.add_argument("--teacher", choices=("simulated", "endpoint"),
                 default="simulated",
                 help="small/tiny scale: the dataset backend (reference "
                 "answers as anchors, SIMULATED) or the OpenAI-compatible "
                 "endpoint of --teacher_url/--teacher_model/--teacher_key_env "
                 "(e.g. a llama.cpp server); paper scale: always the endpoint")
  for name, default in (("student", "/path/to/Qwen2.5-0.5B-Instruct"),
                        ("train_path", "runs/tasks/gsm8k/train.jsonl"),
                        ("eval_path", "runs/tasks/gsm8k/eval.jsonl"),
                        ("teacher_url", "http://127.0.0.1:8080/v1"),
                        ("teacher_model", "default"),
                        ("teacher_key_env", "OPENAI_API_KEY")):
    p.add_argument(f"--{name}", default=default,
                   help="paper scale" + (", or --teacher=endpoint" if
                                         name.startswith("teacher") else ""))
  a = p.parse_args(argv)
  a.seeds = [int(s) for s in a.seeds.split(",") if s]
  a.methods = [m for m in a.methods.split(",") if m]
  unknown = [m for m in a.methods if m not in BY_KEY]
  if unknown:
    p.error(f"unknown methods {unknown}; known: {list(BY_KEY)}")
  a.out = a.out or os.path.join(_ROOT, "experiments", "main_table", a.scale)
  if a.scale == "paper":
    a.teacher = "endpoint"
  return a


def teacher_line(a, runner: common.Runner) -> str:
  """What taught the cells, and how good its stored anchors are."""
  if a.teacher == "simulated":
    return ("Teacher: SIMULATED (dataset backend: anchors are reference "
            "answers; teacher_judge scores by the reference answer = oracle).")
  line = (f"Teacher: the endpoint {a.teacher_url} (model "
          f"`{a.teacher_model}`); teacher_judge, if run, asks it too.")
  ref = runner.results(REFERENCE)
  try:
    with open(os.path.join(ref, "config.json"), encoding="utf-8") as f:
      train_path = json.load(f)["data"]["train_path"]
  except (OSError, KeyError, ValueError):
    return line
  if not os.path.isabs(train_path):
    train_path = os.path.join(_ROOT, train_path)
  q = common.anchor_quality(ref, train_path)
  if q is None or not q["with_answer"]:
    return line
  return line + (
      f" Its anchors ({', '.join(q['teacher'])}): {q['right']} of "
      f"{q['with_answer']} training prompts right by the reference answer, "
      f"{100 * q['accuracy']:.1f} % [{100 * q['accuracy_lo']:.1f}, "
      f"{100 * q['accuracy_hi']:.1f}]; {q['truncated']} truncated; "
      f"{q['mean_completion_tokens']:.1f} completion tokens and "
      f"{q['mean_latency_s']:.2f} s per anchor on average.")


def main(argv=None, *, runner: common.Runner | None = None):
  a = parse_args(sys.argv[1:] if argv is None else argv)
  extra = common.parse_overrides(a.override)
  if a.scale != "paper" and a.teacher == "endpoint":
    extra = {**_teacher_overrides(a), **extra}
  study = cells(a.scale, a.methods, a.seeds, scheme=a.scheme, extra=extra,
                paper=_paper_overrides(a) if a.scale == "paper" else {})
  runner = runner or common.Runner(a.out)
  if a.dry_run:
    runner.dry_run(study)
    return None
  statuses = runner.run_all(study)
  header = (f"# Main table ({a.scale} scale)\n\n"
            f"`python -m experiments.main_table {' '.join(argv or sys.argv[1:])}`"
            f"\n\nCells: {json.dumps(statuses)}. PU-RLD self-ranking: "
            f"{a.scheme}. Accuracy: mean over seeds {a.seeds}, 95% bootstrap "
            "CI over held-out prompts; gain: paired against the shared SFT "
            "reference. " + teacher_line(a, runner))
  table = write(runner, a.methods, a.seeds, a.out, header)
  print(markdown(table, header))
  return table


if __name__ == "__main__":
  main()
