"""The main job's last stage: the before/after table on held-out prompts.

Evaluates, with the same greedy decoding (`eval.*`), the models a run made:
  before  the initial student (`model.path`),
  sft     stage 1's reference (skipped when `sft.steps = 0`: it is `before`),
  final   stage 2's result (recipes other than sft),
and prints `evaluate.format_table` with gains over the SFT reference (the
baseline METHOD.md compares PU-RL with). With `eval.samples` = n > 0 each
model is also sampled n times per prompt at `eval.temperature` and a
second table gives sampled pass@1 (the share of a prompt's samples that
are right, averaged over prompts: what RL optimises; METHOD.md,
Protocol). Results land in WORKDIR/eval/; a model already evaluated with
the same settings (its weights' content hash included) is not evaluated
again, so a resumed run only pays for what is new and a retrained one is
evaluated afresh. The sampler runs on the mesh of
`config.mesh` (every process decodes the same global batches); process 0
writes the files. A SIGTERM (`preemption`) stops the run before the next
model that is not on disk yet.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

from purld_jax import data as data_lib
from purld_jax import evaluate
from purld_jax import hostmem
from purld_jax import preemption
from purld_jax import prompts as prompts_lib
from purld_jax import sharded
from purld_jax.models import hf
from purld_jax.train import loop as loop_lib
from purld_jax.train import student as student_lib

EVAL_DIR = "eval"


def _settings(config, source: str) -> dict:
  """What an evaluation depends on: a stored one with equal settings is
  reused. `model` is the weights' content hash (`hf.weights_digest`), so a
  model retrained at the same path (a run extended with more steps) is
  evaluated again; the initial student is named by `model.path`."""
  model = (f"init:{config.model.path}" if source == "init"
           else hf.weights_digest(source))
  return dict(source=source, model=model,
              eval_path=os.path.abspath(config.data.eval_path),
              num_prompts=config.eval.num_prompts,
              max_new_tokens=config.eval.max_new_tokens,
              buckets=list(config.data.buckets),
              max_prompt_len=config.data.max_prompt_len)


def _progress(config, name: str, total: int, *, compiles: bool):
  """A progress bar over the batches of model `name`; with `compiles` (the
  first model evaluated: the sampler is compiled on its first batch) it says
  so until that batch is done."""
  if not config.log.progress:
    return None
  import tqdm  # pylint: disable=g-import-not-at-top

  def show(batches):
    bar = tqdm.tqdm(batches, total=total, desc=f"[eval] {name}",
                    unit="batch", file=sys.stderr, leave=False)
    if compiles:
      bar.set_postfix_str("compiling the first batch ...", refresh=True)
    for i, batch in enumerate(bar):
      yield batch
      if i == 0 and compiles:
        bar.set_postfix_str("", refresh=False)
  return show


def _kinds(config, tok) -> list[tuple[str, object, int, int]]:
  """(file suffix, decoding, samples per prompt, prompts per call) of each
  evaluation: greedy, and sampled pass@1 when `eval.samples` > 0."""
  e = config.eval
  out = [("", evaluate.greedy_params(tok, e.max_new_tokens), 1,
          e.batch_size)]
  if e.get("samples", 0) > 0:
    out.append((SAMPLED, evaluate.sampled_params(
        tok, e.max_new_tokens, e.temperature), e.samples,
                e.get("sample_batch_size", 0) or e.batch_size))
  return out


SAMPLED = ".sampled"  # <model>.sampled.jsonl: sampled pass@1's answers


def run(config, workdir: str, models: dict[str, str]) -> list[dict] | None:
  """Evaluates `models` (name -> HF directory, or "init" for the initial
  student) on `data.eval_path`; prints and returns the greedy summary rows
  (None when the config has no eval set). With `eval.samples` = n > 0 each
  model is also sampled n times per prompt at `eval.temperature`: its
  sampled pass@1 table follows (summary.sampled.json)."""
  if not config.data.eval_path:
    print("[eval] no data.eval_path: held-out evaluation skipped",
          file=sys.stderr)
    return None
  workdir = os.path.abspath(workdir)
  out_dir = os.path.join(workdir, EVAL_DIR)
  # HF directories: merged models, no adapters (LoRA runs included)
  student = student_lib.from_config(config.model, workdir).base()
  tok = student.tokenizer
  graphdef, _ = student.abstract()
  # image prompts (a vision-language student): tile tokens and pixels
  source = data_lib.encode(prompts_lib.read_jsonl(config.data.eval_path), tok,
                           max_len=config.data.max_prompt_len,
                           processor=student.processor)
  limit = config.eval.num_prompts
  n = min(limit, len(source.ids)) if limit > 0 else len(source.ids)
  kinds = _kinds(config, tok)
  mesh, param_sh = loop_lib.mesh_setup(
      config, student.cfg, batch_sizes={
          "eval.batch_size": config.eval.batch_size,
          **({"eval.sample_batch_size": kinds[1][3]} if len(kinds) > 1
             else {})})
  samplers = {suffix: sharded.on_host(sharded.jit_sampler(
      graphdef, param_sh, mesh=mesh, num_candidates=k, sampling=sp,
      pad_id=tok.pad_id)) for suffix, sp, k, _ in kinds}
  first = jax.process_index() == 0
  results = {suffix: [] for suffix, *_ in kinds}
  compiled = set()  # samplers run by this process
  for i, (name, src) in enumerate(models.items()):
    preemption.stop_before(
        "eval", f"evaluating {name} ({i} of {len(models)} models done)",
        out_dir)
    params = None
    for suffix, sp, k, size in kinds:
      settings = dict(_settings(config, src), **(
          {"samples": k, "temperature": sp.temperature} if suffix else {}))
      meta_path = os.path.join(out_dir, f"{name}{suffix}.settings.json")
      answers_path = os.path.join(out_dir, f"{name}{suffix}.jsonl")
      if os.path.exists(meta_path) and os.path.exists(answers_path):
        with open(meta_path, encoding="utf-8") as f:
          if json.load(f) == settings:
            print(f"[eval] {name}{suffix}: already evaluated "
                  f"({answers_path})", file=sys.stderr)
            results[suffix].append(evaluate.read_answers(answers_path, name))
            continue
      if params is None:
        params = sharded.put(
            jax.tree.map(np.asarray, student.init_params() if src == "init"
                         else student.load_params(src)), param_sh)
      label = name + (f" ({k} samples, T={sp.temperature:g})" if suffix
                      else "")
      results[suffix].append(evaluate.model_answers(
          graphdef, params, tok, source, name=name, sampling=sp, samples=k,
          batch_size=size, buckets=config.data.buckets,
          limit=limit, sampler=samplers[suffix],
          progress=(_progress(config, label, -(-n // size),
                              compiles=suffix not in compiled)
                    if first else None)))
      compiled.add(suffix)
      if first:
        evaluate.write(out_dir, results[suffix][-1:], suffix=suffix)
        with open(meta_path, "w", encoding="utf-8") as f:
          json.dump(settings, f)
    del params
    hostmem.release()  # the sampler's buffers of this model
  baseline = "sft" if "sft" in models else "before"
  tables = {suffix: evaluate.summarize(
      results[suffix], baseline=baseline, seed=config.seed,
      max_new_tokens=config.eval.max_new_tokens, where=out_dir)
            for suffix, *_ in kinds}
  if first:
    for suffix, rows in tables.items():
      evaluate.write(out_dir, [], rows, suffix=suffix)
  sharded.barrier("heldout")
  if not first:
    return tables[""]
  final = list(models)[-1]
  for suffix, sp, k, _ in kinds:
    how = (f"greedy, {config.eval.max_new_tokens} new tokens; accuracy = "
           "last number of the answer equals the reference" if not suffix
           else f"{k} samples per prompt at temperature {sp.temperature:g}, "
           f"{config.eval.max_new_tokens} new tokens; sampled pass@1 = the "
           "share of a prompt's samples that are right; 'ended' = the share "
           "of samples that ended")
    print(f"\n[eval] held-out prompts: {config.data.eval_path} ({n}); {how}; "
          "95% percentile bootstrap over prompts (gain: paired)",
          file=sys.stderr)
    print(evaluate.format_table(tables[suffix], baseline=baseline))
    if final != baseline and baseline in models:
      print(evaluate.verdict(tables[suffix], baseline=baseline, final=final))
  print(f"[eval] per-prompt answers and summary.json: {out_dir}",
        file=sys.stderr)
  return tables[""]
