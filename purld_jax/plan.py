"""What a run would do, said before anything runs (`main --dry_run`).

The config is validated first (config_check.validate: files, budgets,
choices); then `describe` writes the plan: the student's architecture
(its config.json only: no weights are read), the devices the mesh needs,
the data, the teacher (never its key), each stage's steps, rows and
optimizer updates, the held-out evaluation, and the per-device memory
estimate of the train step (tools/memory.py's arithmetic). Nothing is
compiled, downloaded, asked or written.
"""

from __future__ import annotations

import math
import os

from purld_jax.train import state as state_lib


def _count(path: str) -> str:
  """'N prompts' of a JSONL file (non-blank lines), or why there is none."""
  if not path:
    return "none"
  if not os.path.isfile(path):
    return f"{path}: MISSING (build it first, e.g. purld_jax.tasks.build)"
  with open(path, encoding="utf-8", errors="replace") as f:
    n = sum(1 for line in f if line.strip())
  return f"{path}: {n} prompts"


def _updates(steps: int, *, per_step: int, grad_accum: int,
             warmup_frac: float) -> str:
  n = state_lib.stage_updates(steps, updates_per_step=per_step,
                              grad_accum=grad_accum)
  return (f"{n} optimizer updates "
          f"(warmup {state_lib.warmup_updates(n, warmup_frac)}, then cosine)")


def _teacher(t) -> str:
  if t.backend == "openai":
    key = (f"key from ${t.api_key_env}" if t.api_key_env
           else "no key")
    return (f"openai-compatible {t.base_url} model {t.model!r} ({key}), "
            f"max_tokens {t.max_tokens}, temperature {t.temperature}, "
            f"{t.max_concurrency} at a time")
  if t.backend == "recorded":
    return f"recorded answers {t.recorded_path}"
  return f"{t.backend} (the prompts' reference answers)"


def _memory(config) -> list[str]:
  """The tools/memory.py estimate's lines, or why there is none."""
  # pylint: disable=g-import-not-at-top
  from purld_jax.tools import memory
  from purld_jax.train import student as student_lib
  try:
    cfg = student_lib.config_architecture(config.model)
  except Exception as e:  # pylint: disable=broad-except
    return [f"  (no estimate: {type(e).__name__}: {e})"]
  est = memory.estimate_from_config(
      config, cfg, memory.abstract_mesh(config.mesh, _devices(config.mesh)))
  return ["  " + line for line in memory.table(est).splitlines()[:-1]]


def _devices(m) -> int:
  """The devices the mesh (data, fsdp, tensor) needs; a -1 size takes all
  the devices JAX sees (`sharding.mesh_from_config`)."""
  sizes = [int(m.data), int(m.fsdp), int(m.tensor)]
  if -1 in sizes:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.device_count()
  return math.prod(sizes)


def describe(config, workdir: str) -> str:
  """The plan of `python -m purld_jax.main --config=... --workdir=...`."""
  c = config
  m = c.mesh
  devices = _devices(m)
  inferred = -1 in (int(m.data), int(m.fsdp), int(m.tensor))
  lines = [
      f"dry run: recipe {c.recipe}, workdir {workdir} ("
      + ("exists: a checkpoint there is resumed" if os.path.isdir(workdir)
         else "new") + ")",
      f"student  {c.model.path}: compute {c.model.dtype}, params "
      f"{c.model.param_dtype}, remat {c.model.remat}, scan_layers "
      f"{c.model.scan_layers}"
      + (f", LoRA rank {c.model.lora.rank}" if c.model.lora.rank else ""),
      f"mesh     data {m.data} x fsdp {m.fsdp} x tensor {m.tensor} = "
      f"{devices} device(s)" + (" (-1: every device JAX sees)" if inferred
                                else ""),
      f"train    {_count(c.data.train_path)}",
      f"eval     {_count(c.data.eval_path)}",
      f"teacher  {_teacher(c.teacher)}: one anchor a train prompt, "
      "ledgered in the workdir (never asked twice)",
  ]
  if c.recipe != "sft" and c.ranking.scheme == "teacher_judge":
    from purld_jax import teacher_judge  # pylint: disable=g-import-not-at-top
    judge = teacher_judge.judge_config(c)
    over = c.rl.get("oversample", 1)
    lines.append(
        f"judge    {_teacher(judge) if judge else 'the teacher above'}: "
        f"K = {c.sampling.num_candidates} calls a drawn prompt, "
        f"{c.rl.steps * over * c.rl.batch_size * c.sampling.num_candidates}"
        " at most, ledgered in the workdir")
  if c.sft.steps:
    lines.append(
        f"stage 1  SFT on anchors: {c.sft.steps} steps x {c.sft.batch_size}"
        f" anchors (<= {c.sft.max_response_len} tokens), lr "
        f"{c.sft.learning_rate}, "
        + _updates(c.sft.steps, per_step=1, grad_accum=c.opt.grad_accum,
                   warmup_frac=c.sft.warmup_frac))
  else:
    lines.append("stage 1  none (sft.steps = 0): the initial model is the "
                 "reference")
  if c.recipe != "sft":
    inner = (c.loss.grpo.inner_iterations if c.recipe == "grpo" else 1)
    over = c.rl.get("oversample", 1)
    lines.append(
        f"stage 2  {c.recipe}: {c.rl.steps} steps x {c.rl.batch_size} "
        f"prompts" + (f" (of {over * c.rl.batch_size} drawn)" if over > 1
                      else "")
        + f" x K {c.sampling.num_candidates} candidates (<= "
        f"{c.sampling.max_new_tokens} tokens, T {c.sampling.temperature}); "
        f"ranking {c.ranking.scheme}, pu.mode {c.pu.mode} (delta "
        f"{c.pu.delta}, prior {c.pu.prior}); lr {c.opt.learning_rate}, "
        + _updates(c.rl.steps, per_step=inner, grad_accum=c.opt.grad_accum,
                   warmup_frac=c.opt.warmup_frac))
  e = c.eval
  lines.append(
      f"held-out models {e.models}: greedy <= {e.max_new_tokens} tokens"
      + (f", and {e.samples} samples a prompt at T {e.temperature}"
         if e.samples else "")
      + (f", first {e.num_prompts} prompts" if e.num_prompts else ""))
  lines.append("memory of the train step, per device (estimate):")
  lines += _memory(c)
  return "\n".join(lines)
