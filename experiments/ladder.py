r"""The learning ladder (docs/METHOD.md, Protocol): can this setting show RL
learning at all, before any method table is published?

  python -m experiments.ladder                          # small scale, 3 seeds
  python -m experiments.ladder --rungs=sft,oracle_grpo --seeds=0,1,2
  python -m experiments.ladder --split=dev --seeds=0 --rungs=sft,oracle_grpo \
      --train_override=opt.learning_rate=2e-6 --tag=_lr2e-6   # a sweep point
  python -m experiments.ladder --scale=tiny --out=/tmp/ladder   # seconds a cell
  python -m experiments.ladder --dry_run                # the commands, nothing run

Rungs, each trained from the rung's own seed's SFT model (cell sft_s<seed>):
  untrained    the initial student (greedy answers: one model for all seeds)
  sft          stage 1 on the teacher's anchors
  oracle_grpo  GRPO with the verifier as the reward (the upper bound)
  anchor_dpo   DPO with the anchor as chosen, the worst candidate rejected
  self_reward_dpo  DPO on the student's own scores without the anchor
  teacher_judge_dpo  DPO on the teacher's 1-10 scores (RLAIF): needs the
               anchors' teacher served, e.g.
                 python -m purld_jax.tools.get_teacher --model=1.5b
                 python -m purld_jax.tools.llamacpp --model TEACHER.gguf --port 8080 \
                     --n_ctx 2048 --model_alias qwen2.5-coder-1.5b &
               (another endpoint: --train_override=ranking.judge_url=URL)
  purld_dpo / purld_grpo / purld_ldl   PU-RLD with --scheme, pu.mode gate
Each rung's gain over the one it is compared with ('vs') is paired by seed
and prompt: the per-seed differences on the same prompts, with a 95 %
interval that resamples both seeds and prompts (evaluate.seed_prompt_ci).
Rules (the Protocol): sft must not be significantly below untrained (the
interval's top >= 0); oracle_grpo must beat sft (the interval's bottom > 0).
A failed rule is a bug or a setting to fix before a method table.

Held-out set: --split=eval (data/arith/eval.jsonl, 500 prompts, the
reported one) or --split=dev (200 prompts: choose hyper-parameters there,
never on eval). Outputs in --out: ladder.md, ladder.csv, ladder.png and
answers.json (every finished cell's per-prompt correctness and ended flags
as 0/1 strings: the study's one compact file, committed as each cell
finishes; the table is rebuilt from it alone). cells/ (weights, logs) and
kept/ stay out of git. A re-run skips finished cells.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Mapping, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402

from experiments import analysis  # noqa: E402
from experiments import common  # noqa: E402

SPLITS = {"eval": "data/arith/eval.jsonl", "dev": "data/arith/dev.jsonl"}
# configs/arith.py draws 3 x rl.batch_size prompts a step and trains on the
# groups whose oracle rewards differ (rl.oversample = 3). A self-ranked
# group (anchor over worst, the PU gate with its fallback) nearly always
# carries a pair, so the rungs without a verifier draw only the groups they
# train on: the same 8 trained groups a step, a third of the sampling.
_ONE = {"rl.oversample": 1}
# rung -> (label, the rung it is compared with, overrides of configs/arith.py)
RUNGS: dict[str, tuple[str, str, dict]] = {
    "untrained": ("initial student", "", {}),
    "sft": ("SFT on anchors", "untrained", {"recipe": "sft"}),
    "oracle_grpo": ("oracle-reward GRPO", "sft", {
        "recipe": "grpo", "ranking.scheme": "oracle", "pu.mode": "shift",
        "pu.include_anchor": False, "loss.grpo.advantage": "std"}),
    "anchor_dpo": ("anchor-as-chosen DPO", "sft", {
        "recipe": "dpo", "preference.pairs": "anchor_as_chosen", **_ONE}),
    # The student judges its own candidates without the anchor ("Is it
    # good?"): best over worst of those scores (pu.mode shift: s_a unused).
    "self_reward_dpo": ("self-reward DPO (no anchor)", "sft", {
        "recipe": "dpo", "ranking.scheme": "self_reward", "pu.mode": "shift",
        **_ONE}),
    # RLAIF: the teacher scores each candidate 1-10 (K calls a prompt, live:
    # a llama.cpp server of the anchors' teacher at JUDGE_URL, ledgered);
    # best over worst of those scores.
    "teacher_judge_dpo": ("teacher-as-judge DPO (RLAIF)", "sft", {
        "recipe": "dpo", "ranking.scheme": "teacher_judge", "pu.mode": "shift",
        "ranking.judge_url": "http://127.0.0.1:8080/v1",
        "ranking.judge_model": "qwen2.5-coder-1.5b", **_ONE}),
    "purld_dpo": ("PU-RLD DPO", "sft", {"recipe": "dpo", **_ONE}),
    # std advantages (floor 0.1), as the oracle rung: the two GRPO rungs
    # differ only in where the reward comes from.
    "purld_grpo": ("PU-RLD GRPO", "sft", {
        "recipe": "grpo", "loss.grpo.advantage": "std", **_ONE}),
    "purld_ldl": ("PU-RLD LDL", "sft", {"recipe": "ldl", **_ONE}),
}
SELF_RANKING = ("purld_dpo", "purld_grpo", "purld_ldl")
# rung -> (rule text, passes(lo, hi))
RULES = {
    "sft": ("not significantly below untrained", lambda lo, hi: hi >= 0),
    "oracle_grpo": ("beats SFT, interval clear of zero",
                    lambda lo, hi: lo > 0),
}


ARITH = "configs/arith.py"  # the small scale's config (text, verified)


def config_file(scale: str, config: str = ARITH) -> str:
  return config + (":tiny" if scale == "tiny" else "")


def split_path(config: str, split: str) -> str:
  """The held-out file of `split` beside the config's training file
  (configs/arith.py: data/arith/<split>.jsonl; configs/vlm_shapes.py:
  data/shapes/<split>.jsonl, image prompts)."""
  if config == ARITH:
    return SPLITS[split]
  train = setting(config, "data.train_path")
  return os.path.join(os.path.dirname(train), f"{split}.jsonl")


def setting(config: str, key: str, overrides: Mapping[str, Any] = ()) -> Any:
  """`key` ("block.field") of `config` ("configs/NAME.py[:VARIANT]", as
  `config_file` gives it), or its value in `overrides` (a study's
  --train_override / --override)."""
  import importlib  # pylint: disable=g-import-not-at-top
  if key in dict(overrides):
    return dict(overrides)[key]
  path, _, variant = config.partition(":")
  module = importlib.import_module(path[:-len(".py")].replace("/", "."))
  block, field = key.split(".")
  return module.get_config(variant)[block][field]


def cells(rungs: Sequence[str], seeds: Sequence[int], *, scale: str,
          split: str, scheme: str = "anchor_recon",
          extra: Mapping[str, Any] = (), train: Mapping[str, Any] = (),
          tag: str = "", config: str = ARITH) -> list[common.Cell]:
  """sft_s<seed> for every seed (it also evaluates the untrained student),
  then every other trained rung x seed from that seed's SFT model, named
  <rung><tag>_s<seed>; `extra` overrides every cell, `train` the stage-2
  cells only (a sweep: --tag names its point). `config`: the cells' config
  file (another task, e.g. configs/vlm_shapes.py: image prompts)."""
  base = ({"data.eval_path": split_path(config, split)}
          if scale != "tiny" else {})
  base.update(extra)
  # The untrained student is evaluated once, by seed 0's SFT cell
  # (`_answers`: one model, seed-free draws; any SFT cell's copy serves).
  # Seed 0, not the first asked for: a cell's settings must not depend on
  # which seeds one invocation runs (a re-run checks them).
  out = [common.Cell(f"sft_s{s}", config_file(scale, config),
                     {**RUNGS["sft"][2], **base, "data.shuffle_seed": s,
                      **({"eval.models": "sft"} if s != 0 else {})},
                     seed=s) for s in seeds]
  for rung in rungs:
    if rung in ("untrained", "sft"):
      continue
    more = {"ranking.scheme": scheme} if rung in SELF_RANKING else {}
    # only its final model: before and sft are the SFT cell's
    out += [common.Cell(f"{rung}{tag}_s{s}", config_file(scale, config),
                        {**RUNGS[rung][2], **more, **base, **dict(train),
                         "eval.models": "final", "data.shuffle_seed": s},
                        seed=s, reference=f"sft_s{s}") for s in seeds]
  return out


def rows(data: dict, rungs: Sequence[str], seeds: Sequence[int],
         tag: str = "", metric: str = "greedy") -> list[dict]:
  """One row per rung from the compact answers (`analysis.compact`) under
  `metric`: accuracy (mean over its seeds, interval over seeds and prompts), share of
  answers that ended, gain over its 'vs' rung paired by seed and prompt, and
  the verdict of its rule. Raises naming the cells whose prompt sets
  differ."""
  from purld_jax import evaluate  # pylint: disable=g-import-not-at-top
  got = {r: {s: analysis.answers_of(data, r, s, tag, metric) for s in seeds}
         for r in set(rungs) | {RUNGS[r][1] for r in rungs if RUNGS[r][1]}}
  shas = {a[2] for per in got.values() for a in per.values() if a}
  if len(shas) > 1:
    raise ValueError("ladder: the cells were evaluated on different prompt "
                     "sets (data.eval_path): one study, one split")
  out = []
  for rung in rungs:
    label, vs, _ = RUNGS[rung]
    have = {s: a for s, a in got[rung].items() if a is not None}
    row = dict(metric=metric, rung=rung, label=label, vs=vs,
               seeds=len(have), verdict="")
    if not have:
      out.append(dict(row, status="not run"))
      continue
    correct = np.stack([a[0] for a in have.values()])
    lo, hi = evaluate.seed_prompt_ci(correct)
    row.update(status="done", prompts=correct.shape[1],
               accuracy=float(correct.mean()), accuracy_lo=lo,
               accuracy_hi=hi, ended=float(np.mean(
                   [a[1].mean() for a in have.values()])))
    below = {s: a for s, a in got.get(vs, {}).items() if a is not None}
    pair = [s for s in have if s in below]
    # Rows whose answers did not end (< evaluate.MIN_ENDED) score cut text:
    # no verdict rests on them (the Protocol's first rule).
    cut = [f"{name} {100 * e:.1f} %" for name, e in (
        (rung, row["ended"]),
        (vs, np.mean([below[s][1].mean() for s in pair]) if pair else 1.0))
           if e < evaluate.MIN_ENDED]
    if vs and pair:
      diff = np.stack([have[s][0] - below[s][0] for s in pair])
      glo, ghi = evaluate.seed_prompt_ci(diff)
      row.update(gain=float(diff.mean()), gain_lo=glo, gain_hi=ghi,
                 paired_seeds=len(pair))
      if rung in RULES:
        text, ok = RULES[rung]
        enough = len(pair) >= 3 and diff.shape[1] >= 500
        row["verdict"] = ("PASS" if ok(glo, ghi) else "FAIL") + f": {text}" \
            + ("" if enough else " (under the Protocol's 3 seeds x 500 "
               "prompts: not a verdict to publish)")
        if cut:
          row["verdict"] = (f"NO VERDICT: answers ended ({', '.join(cut)}) "
                            f"below {100 * evaluate.MIN_ENDED:.0f} %")
    out.append(row)
  return out


FIELDS = ("metric", "rung", "label", "status", "seeds", "prompts", "accuracy",
          "accuracy_lo", "accuracy_hi", "ended", "vs", "gain", "gain_lo",
          "gain_hi", "paired_seeds", "verdict")


def tables(data: dict, rungs, seeds, tag: str = "") -> dict[str, list]:
  """{metric: rows} for each metric some cell was evaluated with, the
  Protocol's (sampled) first."""
  out = {m: rows(data, rungs, seeds, tag, m) for m in analysis.METRICS}
  return {m: t for m, t in out.items()
          if any(r.get("status") == "done" for r in t)} or {
              "greedy": out["greedy"]}


def report(by_metric: dict[str, list], header: str) -> str:
  return header + "\n".join(
      analysis.markdown(t, f"## {analysis.METRICS[m][1][0].upper()}"
                        f"{analysis.METRICS[m][1][1:]}\n\n")
      for m, t in by_metric.items())


def write(runner, rungs, seeds, out: str, header: str,
          tag: str = "") -> dict[str, list]:
  """Adds the finished cells to answers.json and rewrites ladder<tag>.*
  with every rung and seed it holds for `tag` (`recorded`)."""
  data = analysis.compact(runner, out, rungs, seeds, tag)
  asked = (list(rungs), list(seeds))
  rungs, seeds = analysis.recorded(data, rungs, seeds, tag, names=RUNGS)
  if (rungs, seeds) != asked:
    header += (f"Rows: every cell of this study and tag in {analysis.ANSWERS} "
               f"(rungs {','.join(rungs)}; seeds "
               f"{','.join(map(str, seeds))}), some from earlier runs.\n\n")
  by_metric = tables(data, rungs, seeds, tag)
  name = f"ladder{tag}"
  with open(os.path.join(out, f"{name}.md"), "w", encoding="utf-8") as f:
    f.write(report(by_metric, header))
  analysis.write_csv(os.path.join(out, f"{name}.csv"),
                   sum(by_metric.values(), []), FIELDS)
  analysis.plot(by_metric, os.path.join(out, f"{name}.png"))
  if data := analysis.curves(out):
    with open(os.path.join(out, "curves.json"), "w", encoding="utf-8") as f:
      json.dump(data, f, separators=(",", ":"))
    analysis.plot_curves(data, os.path.join(out, "curves.png"))
  return by_metric


def skip(cell, todo, recorded: set, runner) -> bool:
  """A cell already in answers.json whose folder is gone (e.g. a fresh
  clone of a finished study) is not run again, unless a cell still to run
  needs its weights (an SFT reference). A cell whose folder (or kept copy)
  is here goes to `Runner.run`, which skips it only if its settings are
  the same (a changed override is an error, never an old result)."""
  if not any(k.startswith(cell.name + "/") for k in recorded):
    return False
  if runner.is_done(cell):
    return False
  return not any(c.reference == cell.name and not any(
      k.startswith(c.name + "/") for k in recorded) for c in todo)


def run_cells(runner, todo, recorded: set, after, *, prog: str) -> int:
  """Runs the cells of `todo` that `skip` leaves, calling after() once each
  has ended (the tables grow cell by cell). 0, or 1 when a cell failed or
  was blocked (the rest still run) or a finished cell's settings changed
  (the study stops); each said on stderr."""
  bad = []
  try:
    for cell in todo:
      if skip(cell, todo, recorded, runner):
        continue
      status = runner.run(cell)
      after()
      if status in ("failed", "blocked"):
        bad.append(f"{cell.name} ({status})")
  except common.CellError as e:
    print(f"{prog}: {e}", file=sys.stderr)
    return 1
  if bad:
    print(f"{prog}: not finished: {', '.join(bad)}; see each cell's "
          "log.txt", file=sys.stderr)
  return 1 if bad else 0


def study_parser(prog: str, doc: str, *, scheme: bool = True,
                 tag: str = "ladder") -> argparse.ArgumentParser:
  """The flags every study of the ladder's cells shares; `tag` names the
  table a --tag suffixes ('' = no --tag)."""
  p = argparse.ArgumentParser(
      prog=f"python -m experiments.{prog}", description=doc,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--scale", choices=("small", "tiny"), default="small")
  p.add_argument("--split", choices=tuple(SPLITS), default="eval")
  p.add_argument("--config", default=ARITH, help="the cells' config file: "
                 "configs/arith.py (text) or another task's, e.g. "
                 "configs/vlm_shapes.py (image prompts; give its "
                 "--override=model.path=YOUR_VLM, or --scale=tiny)")
  if scheme:
    p.add_argument("--scheme", default="anchor_recon",
                   help="self-ranking scheme of the purld_* rungs")
  p.add_argument("--out", default="", help="the study folder (default "
                 "experiments/ladder/<scale>_<split>: the ladder's cells)")
  p.add_argument("--override", action="append", default=[],
                 metavar="KEY=VALUE", help="config override of every cell")
  p.add_argument("--train_override", action="append", default=[],
                 metavar="KEY=VALUE", help="config override of the stage-2 "
                 "cells only" + (" (a sweep point; name it with --tag)"
                                 if tag else ""))
  if tag:
    p.add_argument("--tag", default="", help="suffix of the stage-2 cells' "
                   f"names and of {tag}<tag>.md (e.g. _lr2e-6)")
  p.add_argument("--dry_run", action="store_true")
  return p


def study_args(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
  """Parses `study_parser`'s flags: seeds as ints, the default --out, the
  overrides as dicts (a.extra, a.train); a bad one is a usage error."""
  a = p.parse_args(argv)
  try:
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
  except ValueError:
    p.error(f"--seeds={a.seeds!r}: a comma list of integers")
  try:
    a.extra = common.parse_overrides(a.override)
    a.train = common.parse_overrides(a.train_override)
  except ValueError as e:
    p.error(str(e))
  if not os.path.isfile(a.config):
    p.error(f"--config={a.config}: no such file")
  stem = ("" if a.config == ARITH else
          os.path.basename(a.config)[:-len(".py")] + "_")
  a.out = a.out or os.path.join("experiments", "ladder",
                                f"{stem}{a.scale}_{a.split}")
  return a


def parse_args(argv):
  p = study_parser("ladder", __doc__)
  p.add_argument("--rungs", default="untrained,sft,oracle_grpo",
                 help=f"comma list of {', '.join(RUNGS)}")
  a = study_args(p, argv)
  a.rungs = [r for r in a.rungs.split(",") if r]
  bad = [r for r in a.rungs if r not in RUNGS]
  if bad:
    p.error(f"--rungs: unknown {bad} (known: {', '.join(RUNGS)})")
  return a


def main(argv=None, *, runner: common.Runner | None = None) -> int:
  a = parse_args(sys.argv[1:] if argv is None else argv)
  runner = runner or common.Runner(a.out)
  todo = cells(a.rungs, a.seeds, scale=a.scale, split=a.split,
               scheme=a.scheme, extra=a.extra, train=a.train, tag=a.tag,
               config=a.config)
  if a.dry_run:
    runner.dry_run(todo)
    return 0
  os.makedirs(a.out, exist_ok=True)
  header = (f"# Learning ladder ({a.scale}, {a.split} split)\n\n"
            f"`python -m experiments.ladder {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n")
  recorded = set(analysis.compact(runner, a.out, a.rungs, a.seeds, a.tag))
  rc = run_cells(runner, todo, recorded, lambda: write(
      runner, a.rungs, a.seeds, a.out, header, a.tag), prog="ladder")
  write(runner, a.rungs, a.seeds, a.out, header, a.tag)
  with open(os.path.join(a.out, f"ladder{a.tag}.md"), encoding="utf-8") as f:
    print(f.read())
  return rc


if __name__ == "__main__":
  sys.exit(main())
