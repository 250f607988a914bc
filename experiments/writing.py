r"""Writing: PU-RLD on open-ended prompts, judged by pairwise win rate.

  # a teacher/judge endpoint first, e.g. the optional Qwen2.5-Coder-0.5B:
  python -m purld_jax.tools.get_teacher
  python -m purld_jax.tools.llamacpp --model ~/.cache/purld_jax/teacher/qwen2.5-coder-0.5b-instruct-q4.gguf \
      --host 127.0.0.1 --port 8080 --n_ctx 4096 --model_alias qwen2.5-coder-0.5b &
  python -m experiments.writing --teacher_model=qwen2.5-coder-0.5b --teacher_key_env=
  python -m experiments.writing --dry_run

The prompts are data/writing/ (64 train, 32 held-out, written for the
project; no reference answers). A verifier cannot score them, so every
model is compared with a reference answer by a judge through the teacher
client (`purld_jax/winrate.py`, its verdicts in `purld_jax/verdicts.py`:
both orders, a disagreement is a tie; raw and length-controlled win rates,
95 % bootstrap CIs over prompts; every judgement cached in a ledger, never
paid twice).

Cells (the cell runner of experiments/common.py; configs/demo.py with the
WRITING overrides and the teacher endpoint): the shared stage-1 reference
`sft` (SFT on the teacher's anchors for the 64 train prompts, plus the
held-out answers of the `before` and `sft` models), then one PU-RL cell per
--methods entry and seed (METHODS: the ladder's rungs that need no
verifier; default purld_dpo, with the self-ranking --scheme). Every model answers the held-out prompts greedily
(`eval.max_new_tokens`).

Comparisons (model vs reference, on the 32 held-out prompts):
  sft    vs before     what stage 1 did
  METHOD vs sft        what PU-RL added (the paper's claim)
  sft    vs teacher    how far from the teacher (its own held-out answers,
  METHOD vs teacher    asked once each and kept in OUT/teacher_eval/)
  sft    vs shuffled   a check of the judge: SFT's answers against the same
                       words in a random order, which must lose
--compare picks among them (default before, sft, teacher; shuffled only
when named): each costs two judge calls per held-out prompt. The judge is the teacher endpoint
unless --judge_url/--judge_model say otherwise; judging with the teacher
itself favours answers like its own, which is the point of distillation
but not a neutral judge: the table says which judge it was.

Outputs in --out (default experiments/writing/<scale>): table.md,
table.csv, winrate.png, judgements.jsonl (every pair: both verdicts, the
outcome, the word counts), cells/ and cells.jsonl. Re-running skips
finished cells and stored judgements; only the table is rebuilt.
Scales: small (embedded SmolLM2-135M, CPU) and tiny (a random tiny model:
tests; the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
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

# configs/demo.py (arithmetic) made to fit writing prompts and answers.
WRITING = {
    "data.train_path": "data/writing/train.jsonl",
    "data.eval_path": "data/writing/eval.jsonl",
    "data.buckets": "(128,256)",
    "data.max_prompt_len": 256,
    "teacher.max_tokens": 256,     # anchors: most answers fit; longer are cut
    "sft.max_response_len": 256,
    "sampling.max_new_tokens": 96,  # K candidates per prompt
    "eval.max_new_tokens": 160,
    "rl.steps": 8,
    # A llama.cpp server answers one request at a time: with 4 in flight the
    # last waits for three 256-token answers and timed out at 120 s here
    # (2-core CPU). A hosted endpoint can take --override=teacher.max_concurrency=4.
    "teacher.max_concurrency": 1,
    "teacher.timeout_s": 600.0,
}
TEACHER_EVAL = "teacher_eval"  # the teacher's own held-out answers (a ledger)
REFERENCE = "sft"  # the shared stage-1 cell
# The stage-2 methods a writing cell can run: the ladder's rungs that need
# no verifier (a writing prompt has no reference answer), with its
# overrides (experiments/ladder.py RUNGS).
METHODS = ("anchor_dpo", "self_reward_dpo", "purld_dpo", "purld_grpo",
           "purld_ldl")


def cells(scale: str, methods: Sequence[str], seeds: Sequence[int], *,
          scheme: str, extra) -> list[common.Cell]:
  """The shared SFT reference on configs/demo.py(+:tiny) with `extra`
  (WRITING and the teacher), then method x seed from it."""
  config = "configs/demo.py" + (":tiny" if scale == "tiny" else "")
  base = {"export.dir": ""}
  if scale == "tiny":
    base.update({"mesh.data": 1, "log.tensorboard": False})
  out = [common.Cell(REFERENCE, config, {**base, "recipe": "sft",
                                         **dict(extra)})]
  for m in methods:
    more = {"ranking.scheme": scheme} if m in ladder.SELF_RANKING else {}
    out += [common.Cell(f"{m}_s{s}", config,
                        {**base, **ladder.RUNGS[m][2], **more, **dict(extra)},
                        seed=s, reference=REFERENCE) for s in seeds]
  return out


@dataclasses.dataclass(frozen=True)
class Comparison:
  model: str       # cell:model, e.g. "sft:sft" or "purld_dpo_s0:final"
  reference: str   # the same form, or "teacher"
  label: str


# What the models are compared with; `shuffled` is a check of the judge,
# not of a model, so it is asked for by name only.
KINDS = ("before", "sft", "teacher", "shuffled")
DEFAULT_KINDS = KINDS[:3]
SHUFFLED = "shuffled:"  # a reference spec: 'shuffled:cell:model'


def comparisons(methods: Sequence[str], seeds: Sequence[int],
                kinds: Sequence[str] = DEFAULT_KINDS) -> list[Comparison]:
  """kinds: before (SFT vs the initial student), sft (each method vs SFT),
  teacher (SFT and each method vs the teacher's answers), shuffled (SFT vs
  its own answers with their words shuffled: same words, same length, no
  sense; a judge that reads the answers must prefer the originals)."""
  ref = REFERENCE
  runs = [(m, s) for m in methods for s in seeds]
  out = []
  if "before" in kinds:
    out.append(Comparison(f"{ref}:sft", f"{ref}:before",
                          "SFT vs initial student"))
  if "sft" in kinds:
    out += [Comparison(f"{m}_s{s}:final", f"{ref}:sft",
                       f"{ladder.RUNGS[m][0]} (seed {s}) vs SFT")
            for m, s in runs]
  if "teacher" in kinds:
    out.append(Comparison(f"{ref}:sft", "teacher", "SFT vs teacher"))
    out += [Comparison(f"{m}_s{s}:final", "teacher",
                       f"{ladder.RUNGS[m][0]} (seed {s}) vs teacher")
            for m, s in runs]
  if "shuffled" in kinds:
    out.append(Comparison(f"{ref}:sft", f"{SHUFFLED}{ref}:sft",
                          "SFT vs SFT words shuffled (judge check)"))
  return out


def shuffle_words(text: str, key: str) -> str:
  """`text`'s words (whitespace-split) in an order fixed by `key`."""
  words = text.split()
  seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
  order = np.random.default_rng(seed).permutation(len(words))
  return " ".join(words[i] for i in order)


JUDGE_TOP_LOGPROBS = 10  # probability scoring: alternatives per position


def _teacher_cfg(url: str, model: str, key_env: str, max_tokens: int,
                 extra: dict, top_logprobs: int = 0):
  """The endpoint's TeacherConfig, with the cells' concurrency and timeout."""
  from purld_jax import teacher  # pylint: disable=g-import-not-at-top
  return teacher.TeacherConfig.from_mapping(dict(
      backend="openai", base_url=url, model=model, api_key_env=key_env,
      max_tokens=max_tokens, top_logprobs=top_logprobs,
      max_concurrency=int(extra["teacher.max_concurrency"]),
      timeout_s=float(extra["teacher.timeout_s"])))


def teacher_answers(out: str, teacher, prompts) -> dict[str, str]:
  """id -> the teacher's answer to each held-out prompt, asked once (the
  ledger OUT/teacher_eval/anchors.sqlite)."""
  from purld_jax import anchors  # pylint: disable=g-import-not-at-top
  store = anchors.AnchorStore(os.path.join(out, TEACHER_EVAL), teacher)
  try:
    got = store.get_or_query(prompts)
  finally:
    store.close()
  return {p.id: a.text for p, a in zip(prompts, got)}


def _answers(runner: common.Runner, spec: str, teacher_texts):
  """(ids, texts) of 'cell:model', or of the teacher; None if not there."""
  if spec == "teacher":
    return teacher_texts
  if spec.startswith(SHUFFLED):
    got = _answers(runner, spec[len(SHUFFLED):], teacher_texts)
    return None if got is None else {i: shuffle_words(t, i)
                                     for i, t in got.items()}
  cell, model = spec.split(":")
  got = analysis.cell_answers(runner, cell, model)
  return None if got is None else dict(zip(got.ids, got.texts))


def judge_all(runner: common.Runner, comps: Sequence[Comparison], prompts,
              judge, teacher_texts, *, scoring: str = "verdict", seed: int = 0,
              samples: int = 2000) -> list[dict]:
  """One row per comparison whose two sides exist: the `winrate.WinRate`
  summary (`samples` bootstrap resamples), plus per-pair records under
  "pairs_detail"."""
  from purld_jax import winrate  # pylint: disable=g-import-not-at-top
  store = winrate.open_store(runner.study_dir, judge)
  rows = []
  try:
    for c in comps:
      model = _answers(runner, c.model, teacher_texts)
      ref = _answers(runner, c.reference, teacher_texts)
      if model is None or ref is None:
        rows.append(dict(model=c.model, reference=c.reference, label=c.label,
                         status="not run"))
        continue
      ps = [p for p in prompts if p.id in model and p.id in ref]
      w = winrate.winrate(store, ps, [model[p.id] for p in ps],
                          [ref[p.id] for p in ps], scoring=scoring,
                          seed=seed, samples=samples)
      pairs = [dict(comparison=c.label, id=i, verdicts=list(v),
                    outcome=None if np.isnan(o) else float(o),
                    words_model=float(a), words_reference=float(b))
               for i, v, o, a, b in zip(w.ids, w.verdicts, w.outcomes,
                                        w.len_model, w.len_reference)]
      rows.append(dict(model=c.model, reference=c.reference, label=c.label,
                       status="done", **w.summary(),
                       mean_words_model=float(w.len_model.mean()),
                       mean_words_reference=float(w.len_reference.mean()),
                       pairs_detail=pairs))
  finally:
    store.close()
  return rows


FIELDS = ("label", "model", "reference", "status", "pairs", "judged", "wins",
          "ties", "losses", "disagreements", "unparseable", "failed",
          "win_rate", "win_rate_ci", "lc_win_rate", "lc_win_rate_ci",
          "mean_words_model", "mean_words_reference", "judgements",
          "judge_calls")


def markdown(rows: Sequence[dict], header: str) -> str:
  pct = lambda x: f"{100 * x:.1f}"
  ci = lambda c: f"[{pct(c[0])}, {pct(c[1])}]"
  body = []
  for r in rows:
    if r["status"] != "done":
      body.append([r["label"], r["status"]] + [""] * 5)
      continue
    body.append([r["label"], f"{r['judged']} / {r['pairs']}",
                 f"{r['wins']}/{r['ties']}/{r['losses']}",
                 f"{pct(r['win_rate'])} {ci(r['win_rate_ci'])}",
                 f"{pct(r['lc_win_rate'])} {ci(r['lc_win_rate_ci'])}",
                 f"{r['mean_words_model']:.0f} / {r['mean_words_reference']:.0f}",
                 f"{r['disagreements']} / {r['unparseable']}"])
  return header + "\n\n" + analysis.markdown_table(
      body, ["comparison", "judged / pairs", "W/T/L", "win % [95% CI]",
             "LC win % [95% CI]", "words (model / ref)",
             "order disagreements / unreadable verdicts"]) + "\n"


def plot(rows: Sequence[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  done = [r for r in rows if r["status"] == "done"]
  fig, ax = plt.subplots(figsize=(2 + 1.4 * max(1, len(done)), 4))
  x = np.arange(len(done))
  for off, key, color in ((-0.18, "win_rate", "#3b75af"),
                          (0.18, "lc_win_rate", "#e1812c")):
    val = np.array([100 * r[key] for r in done])
    lo = np.array([100 * r[key + "_ci"][0] for r in done])
    hi = np.array([100 * r[key + "_ci"][1] for r in done])
    ax.bar(x + off, val, width=0.36, color=color,
           yerr=np.stack([val - lo, hi - val]), capsize=3,
           label="raw" if key == "win_rate" else "length-controlled")
  ax.axhline(50, ls="--", lw=1, color="k")
  ax.set_xticks(x)
  ax.set_xticklabels([r["label"] for r in done], rotation=30, ha="right",
                     fontsize=8)
  ax.set_ylabel("win rate vs reference (%), 95% CI")
  ax.set_ylim(0, 100)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(rows: Sequence[dict], out: str, header: str) -> str:
  os.makedirs(out, exist_ok=True)
  text = markdown(rows, header)
  with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
    f.write(text)
  flat = [{k: (json.dumps([round(v, 4) for v in r[k]]) if k.endswith("_ci")
               and k in r else r.get(k, "")) for k in FIELDS} for r in rows]
  analysis.write_csv(os.path.join(out, "table.csv"), flat, FIELDS)
  with open(os.path.join(out, "judgements.jsonl"), "w", encoding="utf-8") as f:
    for r in rows:
      for p in r.get("pairs_detail", ()):
        f.write(json.dumps(p) + "\n")
  plot(rows, os.path.join(out, "winrate.png"))
  return text


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m experiments.writing",
                              description=__doc__.split("\n")[0])
  p.add_argument("--scale", choices=("tiny", "small"), default="small")
  p.add_argument("--seeds", default="0", help="comma list of config.seed")
  p.add_argument("--methods", default="purld_dpo",
                 help=f"comma list of {list(METHODS)}")
  p.add_argument("--scheme", default="anchor_recon",
                 help="self-ranking of the PU-RLD rows")
  p.add_argument("--out", default="", help="default experiments/writing/<scale>")
  p.add_argument("--override", action="append", default=[],
                 help="KEY=VALUE for every cell (repeatable), after WRITING")
  p.add_argument("--dry_run", action="store_true",
                 help="list the cells and their commands; run nothing")
  p.add_argument("--teacher_url", default="http://127.0.0.1:8080/v1")
  p.add_argument("--teacher_model", default="default")
  p.add_argument("--teacher_key_env", default="OPENAI_API_KEY",
                 help="NAME of the env var holding the key ('' = none)")
  p.add_argument("--compare", default=",".join(DEFAULT_KINDS),
                 help="comma list of what the models are compared with: "
                 "before (SFT vs the initial student), sft (each method vs "
                 "SFT), teacher (SFT and each method vs the teacher's own "
                 "held-out answers; asks the teacher once per prompt), "
                 "shuffled (SFT vs its own answers, words shuffled: a check "
                 "that the judge reads; not in the default). Each costs 2 "
                 "judge calls per held-out prompt and comparison")
  p.add_argument("--judge_url", default="", help="default: --teacher_url")
  p.add_argument("--judge_model", default="", help="default: --teacher_model")
  p.add_argument("--judge_key_env", default=None,
                 help="default: --teacher_key_env")
  p.add_argument("--judge_scoring", choices=("verdict", "probability"),
                 default="verdict",
                 help="verdict: the judge's one-line verdict per order; "
                 "probability: the verdict tokens' probabilities (the judge "
                 f"is asked for its top {JUDGE_TOP_LOGPROBS} logprobs), "
                 "P(model better) averaged over both orders; for small "
                 "judges that answer the same letter in both orders "
                 "(purld_jax/verdicts.py)")
  a = p.parse_args(argv)
  a.seeds = [int(s) for s in a.seeds.split(",") if s]
  a.methods = [m for m in a.methods.split(",") if m]
  a.compare = [k for k in a.compare.split(",") if k]
  if set(a.compare) - set(KINDS):
    p.error(f"--compare: unknown {sorted(set(a.compare) - set(KINDS))}; "
            f"known: {list(KINDS)}")
  unknown = [m for m in a.methods if m not in METHODS]
  if unknown:
    p.error(f"unknown methods {unknown}; known: {list(METHODS)}")
  a.out = a.out or os.path.join(_ROOT, "experiments", "writing", a.scale)
  a.judge_url = a.judge_url or a.teacher_url
  a.judge_model = a.judge_model or a.teacher_model
  if a.judge_key_env is None:
    a.judge_key_env = a.teacher_key_env
  return a


def main(argv=None, *, runner: common.Runner | None = None):
  from purld_jax import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  from purld_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else argv
  a = parse_args(argv)
  extra = {**WRITING, "teacher.backend": "openai",
           "teacher.base_url": a.teacher_url,
           "teacher.model": a.teacher_model,
           "teacher.api_key_env": a.teacher_key_env,
           **common.parse_overrides(a.override)}
  study = cells(a.scale, a.methods, a.seeds, scheme=a.scheme,
                           extra=extra)
  runner = runner or common.Runner(a.out)
  if a.dry_run:
    runner.dry_run(study)
    return None
  statuses = runner.run_all(study)
  eval_path = os.path.join(_ROOT, extra["data.eval_path"])
  prompts = prompts_lib.read_jsonl(eval_path)
  teacher = teacher_lib.make(_teacher_cfg(
      a.teacher_url, a.teacher_model, a.teacher_key_env,
      int(extra["teacher.max_tokens"]), extra))
  prob = a.judge_scoring == "probability"
  # Probability scoring reads the token after "Verdict:": 8 tokens suffice.
  judge = teacher_lib.make(_teacher_cfg(
      a.judge_url, a.judge_model, a.judge_key_env, 8 if prob else 48, extra,
      top_logprobs=JUDGE_TOP_LOGPROBS if prob else 0))
  teacher_texts = None
  if "teacher" in a.compare:
    print(f"[writing] the teacher's held-out answers ({len(prompts)} "
          f"prompts; asked once, then read from {TEACHER_EVAL}/)", flush=True)
    teacher_texts = teacher_answers(a.out, teacher, prompts)
  print(f"[writing] judging with {judge.label} (both orders; cached in "
        "winrate/)", flush=True)
  rows = judge_all(runner, comparisons(a.methods, a.seeds, a.compare),
                   prompts, judge, teacher_texts, scoring=a.judge_scoring)
  header = (
      f"# Writing: win rates ({a.scale} scale)\n\n"
      f"`python -m experiments.writing {' '.join(argv)}`\n\n"
      f"Cells: {json.dumps(statuses)}. Teacher (anchors and the `teacher` "
      f"reference answers): {teacher.label}. Judge: {judge.label}, both "
      + ("orders (a disagreement is a tie); W/T/L of the first-named model; "
         "win rate = mean outcome (tie = 0.5) over judged pairs; "
         if not prob else
         "orders, PROBABILITY scoring: a pair's outcome is P(model better) "
         "from the verdict token's probabilities, averaged over the two "
         "orders; W/T/L = outcomes above / at / below 0.5; win rate = mean "
         "outcome over judged pairs; ")
      + "LC = the "
      "length-controlled win rate (winrate.py: the win probability at the "
      "reference's length); 95 % bootstrap CIs over prompts. PU-RLD "
      f"self-ranking: {a.scheme}; seeds {a.seeds}.")
  text = write(rows, a.out, header)
  print(text)
  return rows


if __name__ == "__main__":
  main()
