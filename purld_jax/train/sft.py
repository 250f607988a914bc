"""Stage 1: SFT of the student on the teacher's anchors -> the frozen reference.

  reference_dir = sft.run(config, workdir)

Per step: a batch of prompts (data.py) -> their anchors from the ledger
(anchors.py: the teacher is asked only for prompts it never answered) ->
rows [prompt tokens | anchor tokens | end of turn], left-padded -> one jitted
step, response-only NLL (losses.sft_nll). A prompt whose anchor is unusable
(cut at the teacher's max_tokens, or empty) is an invalid row, not trained
on; the stage prints how many, once, at its end. The result is written as a
Hugging Face directory `<workdir>/reference/` (the frozen pi_ref of stage 2,
and the "SFT on anchors" baseline); with `sft.steps = 0` it is the initial
model.

Workdir layout (shared with stage 2):
  anchors.sqlite        the anchor ledger
  ckpt/sft/<step>/      orbax checkpoints (state, data iterator, config)
  metrics.jsonl, tb/    metrics (metrics.py)
  reference/            the result (safetensors + tokenizer + SFT.json)
A workdir holding a checkpoint resumes from it; a finished stage is not run
again.

With LoRA (`model.lora.rank` > 0) only the adapters are trained and
checkpointed; `reference/` holds the MERGED model (adapters folded into
the base), so stage 2 starts new adapters at zero on top of the SFT result,
and `reference/adapter/` the adapters as a PEFT directory on `model.path`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np

from purld_jax import data as data_lib
from purld_jax import losses
from purld_jax import prompts as prompts_lib
from purld_jax import scoring
from purld_jax import sharded
from purld_jax import shared_anchors
from purld_jax import teacher as teacher_lib
from purld_jax.models import tokenizer as tokenizer_lib
from purld_jax.train import loop as loop_lib
from purld_jax.train import state as state_lib
from purld_jax.train import student as student_lib

STAGE = "sft"
REFERENCE = "reference"
DONE = "SFT.json"


# ----------------------------------------------------------------------------
# Batches


def response_ids(tok: tokenizer_lib.Tokenizer, messages, answer: str, *,
                 max_len: int) -> list[int]:
  """Token ids of the assistant turn `answer` after `messages`, as the chat
  template writes it, cut after its end-of-turn token, at most max_len.

  The prompt side is `tok.encode_chat(messages)` (generation prompt
  included); the response is what the template adds after it when the
  answer is appended. A template that does not extend its own generation
  prompt falls back to the answer's tokens and the first stop id.
  """
  prefix = tok.render_chat(messages, add_generation_prompt=True)
  full = tok.render_chat(list(messages) + [{"role": "assistant",
                                            "content": answer}],
                         add_generation_prompt=False)
  if full.startswith(prefix):
    ids = tok.encode(full[len(prefix):])
  else:
    ids = tok.encode(answer) + [tok.stop_ids[0]]
  stops = set(tok.stop_ids)
  for i, t in enumerate(ids):
    if t in stops:
      ids = ids[:i + 1]
      break
  return ids[:max_len]


def make_batch(tok: tokenizer_lib.Tokenizer, batch: data_lib.PromptBatch,
               answers, *, max_response_len: int, buckets) -> dict:
  """Rows [prompt | response], left-padded to a bucket.

  Returns:
    dict of numpy arrays: tokens i32[B, L], mask bool[B, L] (real tokens),
    loss_mask bool[B, L] (response tokens: the NLL's targets); with image
    prompts also pixel_values / pixel_mask (`batch`'s) and image_at
    bool[B, L] (the prompt's columns, where image tokens are merged).
  """
  rows, n_resp = [], []
  for p, ids, answer in zip(batch.prompts, batch.ids, answers):
    resp = response_ids(tok, p.as_dicts(), answer, max_len=max_response_len)
    rows.append(list(ids) + resp)
    n_resp.append(len(resp))
  length = tokenizer_lib.bucket_length(max(len(r) for r in rows), buckets)
  tokens, mask = tokenizer_lib.pad_left(rows, tok.pad_id, length)
  loss_mask = np.zeros_like(mask)
  for i, n in enumerate(n_resp):
    if n:
      loss_mask[i, length - n:] = True
  loss_mask &= batch.valid[:, None]
  out = dict(tokens=tokens, mask=mask, loss_mask=loss_mask)
  if getattr(batch, "pixel_values", None) is not None:
    cols = np.arange(length)[None, :]
    ends = length - np.asarray(n_resp)[:, None]
    out.update(pixel_values=batch.pixel_values, pixel_mask=batch.pixel_mask,
               image_at=mask & (cols < ends))
  return out


def row_buckets(prompt_buckets, max_response_len: int) -> tuple[int, ...]:
  """Row lengths of SFT batches: each prompt bucket plus the response
  budget, so every batch of prompts within a bucket has one shape (one
  compiled step; padding each batch to its own longest row compiled a new
  step for nearly every batch). No prompt buckets: none here either."""
  return tuple(int(b) + int(max_response_len) for b in prompt_buckets or ())


# ----------------------------------------------------------------------------
# The step


def train_step(state: state_lib.TrainState, batch: dict,
               nan_at_step: jax.Array | int = -1, *, schedule,
               grad_accum: int = 1, micro_batches: int = 1,
               vocab_chunk: int | None = None,
               response_len: int | None = None):
  """One SFT step: (state, batch) -> (state, metrics). Pure; jit it.

  Args:
    state: the train state.
    batch: `make_batch` arrays.
    nan_at_step: i32[] test hook (`state.inject_nan`); -1 = never.
    schedule: the learning-rate schedule (reported as `lr`).
    grad_accum: batches per update across calls (for the reported lr).
    micro_batches: slices of the batch run one at a time inside the step
      (`state.grad_step`): less memory, the same update.
    vocab_chunk: `scoring.token_logps` memory knob.
    response_len: the longest response (`sft.max_response_len`): only the
      last that many columns, where `make_batch` puts the responses, are
      projected onto the vocabulary. None = every column.
  """
  def loss_fn(params, mb):
    logps = scoring.token_logps(state.model(params), mb["tokens"],
                                mb["mask"], vocab_chunk=vocab_chunk,
                                last=response_len,
                                pixel_values=mb.get("pixel_values"),
                                pixel_mask=mb.get("pixel_mask"),
                                image_at=mb.get("image_at"))
    loss, metrics = losses.sft_nll(logps, mb["loss_mask"])
    return state_lib.inject_nan(loss, state.step, nan_at_step), metrics

  return state_lib.grad_step(
      state, loss_fn, batch, schedule=schedule, grad_accum=grad_accum,
      micro_batches=micro_batches,
      weight_fn=lambda mb: jnp.sum(mb["loss_mask"].astype(jnp.float32)))


# ----------------------------------------------------------------------------
# The loop


def reference_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), REFERENCE)


def is_done(workdir: str, steps: int) -> bool:
  """True when the reference of an SFT run of `steps` steps is written."""
  path = os.path.join(reference_dir(workdir), DONE)
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("steps") == steps


def save_reference(graphdef, params, tok, workdir: str, *, steps: int,
                   teacher_label: str, adapter_base: str = "") -> str:
  """Writes the reference HF directory atomically (tmp dir, then rename);
  process 0 writes, every process waits for it (the workdir is shared).
  `params` of a LoRA graphdef are written merged (`write_model_dir`)."""
  out = reference_dir(workdir)
  params = sharded.to_host(params)
  if jax.process_index() == 0:
    write_model_dir(graphdef, params, tok, out, DONE,
                    {"steps": steps, "teacher": teacher_label},
                    adapter_base=adapter_base)
  sharded.barrier("sft.reference")
  return out


ADAPTER = "adapter"  # a LoRA run's PEFT adapter directory, in a model dir


def write_model_dir(graphdef, params, tok, out: str, marker: str,
                    record: dict, *, adapter_base: str = "") -> None:
  """A stage's HF directory with its done `marker` file (`record` as JSON,
  written last), written beside `out` and renamed in whole: a kill leaves
  the old one or the new one, and an export's hard links to the old files
  keep their bytes. A LoRA model (its graphdef's cfg.lora) is written
  merged, and its adapters as a PEFT directory `out/adapter/` whose
  base_model_name_or_path is `adapter_base`."""
  from purld_jax import models  # pylint: disable=g-import-not-at-top
  from purld_jax.models import lora  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  model = nnx.merge(graphdef, params)
  models.save_pretrained(model, tok, tmp)
  if model.cfg.lora is not None:
    lora.write_peft(lora.split(params)[0], model.cfg,
                    os.path.join(tmp, ADAPTER),
                    base_model_name_or_path=adapter_base)
  with open(os.path.join(tmp, marker), "w", encoding="utf-8") as f:
    json.dump(record, f)
  if os.path.exists(out):
    shutil.rmtree(out)
  os.replace(tmp, out)


def drop_checkpoints(config, workdir: str, stage: str) -> None:
  """With `ckpt.keep_finished = "none"`, deletes a finished stage's
  checkpoints (its model directory is written: nothing reads them but an
  extension of the run, which then starts the stage over)."""
  if config.ckpt.keep_finished != "none" or jax.process_index() != 0:
    return
  path = os.path.join(os.path.abspath(workdir), "ckpt", stage)
  if os.path.isdir(path):
    shutil.rmtree(path)
    print(f"[{stage}] checkpoints deleted (ckpt.keep_finished=none): {path}",
          file=sys.stderr)


def run(config, workdir: str) -> str:
  """Runs (or resumes, or skips when done) stage 1; returns the reference
  directory."""
  workdir = os.path.abspath(workdir)
  steps = config.sft.steps
  if is_done(workdir, steps):
    print(f"[{STAGE}] already done: {reference_dir(workdir)}", file=sys.stderr)
    return reference_dir(workdir)
  student = student_lib.from_config(config.model, workdir)
  tok = student.tokenizer
  teacher = teacher_lib.make(
      teacher_lib.TeacherConfig.from_mapping(config.teacher.to_dict()))
  print(f"[{STAGE}] teacher: {teacher.label}", file=sys.stderr)
  graphdef, _ = student.abstract()
  if steps == 0:  # the base model as it is (no adapters)
    return save_reference(student.base_graphdef(), student.init_params(),
                          tok, workdir, steps=0, teacher_label=teacher.label)

  source = data_lib.encode(prompts_lib.read_jsonl(config.data.train_path),
                           tok, max_len=config.data.max_prompt_len,
                           processor=student.processor)
  # The global batch on every process (sharded.py: host data is whole).
  it = data_lib.train_iterator(source, batch_size=config.sft.batch_size,
                               seed=config.data.shuffle_seed,
                               buckets=config.data.buckets, process_index=0,
                               process_count=1)
  mesh, param_sh = loop_lib.mesh_setup(
      config, student.cfg, batch_sizes={"sft.batch_size":
                                        config.sft.batch_size})
  # With LoRA: the adapters are trained, the base (read now) is frozen.
  train = student_lib.trainable(student, param_sh, student.init_params,
                                seed=config.seed)
  store = shared_anchors.SharedAnchors(workdir, teacher)
  try:
    with loop_lib.Stage(config, workdir, STAGE, total_steps=steps,
                        learning_rate=config.sft.learning_rate,
                        warmup_frac=config.sft.warmup_frac,
                        graphdef=graphdef, param_shapes=train.shapes,
                        param_sh=train.shardings, init_params=train.init,
                        data_iter=it, teacher_label=teacher.label,
                        frozen=train.frozen,
                        frozen_sh=train.frozen_sh) as stage:
      if config.data.prefetch_anchors:
        store.anchors(source.prompts)
      state = stage.state
      step_fn = sharded.jit_train_step(functools.partial(
          train_step, schedule=stage.schedule,
          grad_accum=config.opt.grad_accum,
          micro_batches=config.opt.micro_batches,
          vocab_chunk=config.model.vocab_chunk or None,
          response_len=config.sft.max_response_len), stage.state_sh,
          ("batch", "replicated"), mesh=mesh)
      nan_at_step = np.int32(config.debug.nan_at_step)
      stage.loop.compiling()
      for step in range(stage.start, steps):
        # Rows whose anchor is truncated or empty are invalid: no loss.
        prompts, answers = store.for_batch(next(it))
        batch = make_batch(tok, prompts, answers,
                           max_response_len=config.sft.max_response_len,
                           buckets=row_buckets(config.data.buckets,
                                               config.sft.max_response_len))
        state, metrics = step_fn(state, batch, nan_at_step)
        stage.step_done(step + 1, state, metrics,
                        tokens=int(batch["mask"].sum()))
      unusable = store.summary()  # "N anchors truncated by ...; not trained on"
      if unusable and jax.process_index() == 0:
        print(f"[{STAGE}] {unusable}", file=sys.stderr)
      stage.finish(state)
  finally:
    store.close()
  out = save_reference(graphdef, state.full_params(), tok, workdir,
                       steps=steps, teacher_label=teacher.label,
                       adapter_base=student.hf_dir or student_lib.TINY)
  drop_checkpoints(config, workdir, STAGE)
  return out
