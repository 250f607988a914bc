"""Stage 2, the PU-RL loop (METHOD.md), shared by the dpo, grpo and ldl recipes.

One iteration, for a batch of prompts:
  1. anchors from the ledger (a teacher call only for a prompt never seen);
  2. K candidates per prompt from the policy snapshot (rollout.collect);
  3-4. self-ranking scores against the anchor, the anchor scored too;
  5. preferences: the recipe's `build_batch` (pairs, or a label distribution);
  6. the recipe's jitted `train_step` (reference params passed in, frozen).

The reference is the SFT stage's output (stage 1 runs first, or is skipped
with `sft.steps = 0`, when the reference is the initial model). With LoRA
(`model.lora.rank` > 0) the policy is new adapters (B = 0) on that very
reference, frozen: the reference of the KL / DPO / LDL terms is the same
base arrays with zero adapters (`lora_views`), not a second copy; without
LoRA `rl.reference_dtype` = "bfloat16" keeps that copy in bf16 (never
checkpointed: every start, resumes included, reloads and casts it).
Checkpoints hold params, optimizer state, step, RNG and the data iterator,
so a killed run resumes to the bit and never asks the teacher twice (the
ledger).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from purld_jax import data as data_lib
from purld_jax import diagnostics
from purld_jax import evaluate
from purld_jax import prompts as prompts_lib
from purld_jax import rollout
from purld_jax import rollout_store
from purld_jax import sampling as sampling_lib
from purld_jax import sharded
from purld_jax import shared_anchors
from purld_jax import teacher as teacher_lib
from purld_jax import teacher_judge
from purld_jax.train import dpo
from purld_jax.train import grpo
from purld_jax.train import ldl
from purld_jax.train import loop as loop_lib
from purld_jax.train import sft
from purld_jax.train import student as student_lib

RECIPES = {"dpo": dpo, "grpo": grpo, "ldl": ldl}
FINAL = "final"
DONE = "FINAL.json"  # in FINAL: the stage's step count; written last


def is_done(workdir: str, steps: int) -> bool:
  """True when the final model of a stage 2 of `steps` steps is written."""
  try:
    with open(os.path.join(workdir, FINAL, DONE), encoding="utf-8") as f:
      return json.load(f).get("steps") == steps
  except (OSError, ValueError):
    return False


def sampling_params(config) -> sampling_lib.SamplingParams:
  s = config.sampling
  return sampling_lib.SamplingParams(
      temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
      max_new_tokens=s.max_new_tokens)


def ranking_params(config) -> rollout.RankingParams:
  r = config.ranking
  return rollout.RankingParams(
      scheme=(rollout.UNRANKED if config.pu.mode == "nnpu" else r.scheme),
      template=r.template or None, yes_word=r.yes_word,
      no_word=r.no_word, aggregation=r.aggregation, bt_iters=r.bt_iters,
      bt_prior=r.bt_prior, metric=r.metric,
      pmi_stop=r.pmi_stop, pair_opponents=r.pair_opponents,
      length_debias=r.length_debias, gate=r.gate,
      gate_margin=r.gate_margin,
      rows_per_call=r.rows_per_call,
      pad_multiple=r.pad_multiple, vocab_chunk=config.model.vocab_chunk or None)


def _oracle_agreement(group, correct, unranked: bool = False) -> dict:
  """oracle_* metrics: the self-ranking against exact answer match
  (`correct` f32[B, K], None unless every prompt has a reference answer;
  diagnostics.ranking_vs_oracle); the oracle is only watched, never trained
  on (unless ranking.scheme is "oracle")."""
  if correct is None:
    return {}
  d = diagnostics.ranking_vs_oracle(group.scores, correct, group.valid)
  if unranked:  # pu.mode nnpu: no ranking to judge, only the samples
    d = {k: d[k] for k in ("sample_accuracy", "mixed_groups")}
  return {f"oracle_{k}": v for k, v in d.items()}


def _verifier(prompts):
  """verifier(b, text) against the reference answers of a prompt batch."""
  return evaluate.batch_verifier([p.answer for p in prompts.prompts])


def _pair_verdicts(group, config, correct, anchors, verifier) -> dict:
  """oracle_pair_* metrics: the verifier's verdict on the DPO pairs of
  this step (diagnostics.pairs_vs_oracle; the anchor checked too)."""
  p = dpo.group_pairs(group, config)
  right = np.concatenate(
      [np.asarray(correct) > 0.5,
       np.array([[verifier(b, a) > 0.5] for b, a in enumerate(anchors)])],
      axis=-1)
  d = diagnostics.pairs_vs_oracle(np.asarray(p.chosen), np.asarray(p.rejected),
                                  np.asarray(p.mask), right)
  return {f"oracle_{k}": v for k, v in d.items()}


def _reference(config, workdir, student, ref_dir=None):
  """(graphdef, reference params): stage 1's output directory."""
  ref_dir = ref_dir or sft.run(config, workdir)
  graphdef, _ = student.abstract()
  return graphdef, student.load_params(ref_dir)


def cast_reference(ref_host, dtype_name: str = "float32"):
  """The reference's host params stored in `dtype_name` (rl.reference_dtype):
  "float32" leaves them as loaded (model.param_dtype); "bfloat16" rounds
  every floating leaf to bf16 (half the bytes; the model casts each weight
  to its compute dtype, model.dtype, where it is used)."""
  if dtype_name == "float32":
    return ref_host
  if dtype_name != "bfloat16":
    raise ValueError(f"rl.reference_dtype {dtype_name!r} not in "
                     "('float32', 'bfloat16')")
  bf16 = jax.numpy.bfloat16
  return jax.tree.map(
      lambda x: np.asarray(x, bf16)
      if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x, ref_host)


def lora_views(train, ref_host, param_sh, reference_dtype: str = "float32"):
  """(ref_params, ref_full, full) of stage 2.

  ref_params: what the recipes' steps take as the reference (`state.model
    (ref_params)`): the reference params on `param_sh`, stored in
    `reference_dtype` (`cast_reference`), or with LoRA zero adapters (the
    frozen base is the reference: B = 0 adds exactly 0).
  ref_full: the reference's whole param tree (sampler, scorers, GRPO's
    reference log-probs); with LoRA it holds `train.frozen`'s very arrays.
  full: params -> the whole model's tree (the identity without LoRA).

  Raises:
    ValueError: `reference_dtype` is not "float32" with LoRA (the frozen
      base is the policy's too: config_check refuses it first).
  """
  if train.frozen is None:
    ref = sharded.put(cast_reference(ref_host, reference_dtype), param_sh)
    return ref, ref, lambda p: p
  if reference_dtype != "float32":
    raise ValueError(f"rl.reference_dtype={reference_dtype!r} does not apply "
                     "with LoRA: the reference is the frozen base itself")
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), train.shapes)
  ref = sharded.put(zeros, train.shardings)
  return ref, train.full(ref), train.full


def _kinds(recipe) -> tuple[str, ...]:
  """Argument kinds after the state (sharded.jit_train_step)."""
  return (("batch", "replicated") if recipe is grpo
          else ("params", "batch", "replicated"))


def run(config, workdir: str, reference_dir: str | None = None) -> str:
  """Runs (or resumes) stage 2 (and stage 1 first unless `reference_dir` is
  given); returns the final model directory."""
  recipe = RECIPES[config.recipe]
  stage = recipe.STAGE
  workdir = os.path.abspath(workdir)
  if is_done(workdir, config.rl.steps):
    print(f"[{stage}] already done: {os.path.join(workdir, FINAL)}",
          file=sys.stderr)
    return os.path.join(workdir, FINAL)
  student = student_lib.from_config(config.model, workdir)
  tok = student.tokenizer
  graphdef, ref_host = _reference(config, workdir, student, reference_dir)
  teacher = teacher_lib.make(
      teacher_lib.TeacherConfig.from_mapping(config.teacher.to_dict()))
  steps = config.rl.steps
  source = data_lib.encode(prompts_lib.read_jsonl(config.data.train_path),
                           tok, max_len=config.data.max_prompt_len,
                           processor=student.processor)
  store = shared_anchors.SharedAnchors(workdir, teacher)
  rollouts = (rollout_store.RolloutStore(os.path.join(
      workdir, config.rollout_store.dir)) if config.rollout_store.enabled
              and jax.process_index() == 0 else None)
  judge = None
  if config.ranking.scheme == "teacher_judge":  # K teacher calls a prompt
    judge = teacher_judge.TeacherJudge(
        workdir, teacher_judge.judge_teacher(config, teacher),
        template=config.ranking.template)
  # The global batch on every process (sharded.py: host data is whole).
  over = config.rl.get("oversample", 1)
  drawn = config.rl.batch_size * over  # prompts sampled per step
  it = data_lib.train_iterator(source, batch_size=drawn,
                               seed=config.data.shuffle_seed + 1,
                               buckets=config.data.buckets, process_index=0,
                               process_count=1)
  mesh, param_sh = loop_lib.mesh_setup(
      config, student.cfg, batch_sizes={"rl.batch_size": config.rl.batch_size,
                                        "rl.batch_size x rl.oversample": drawn})
  ref_host = jax.tree.map(np.asarray, ref_host)
  ref_dtype = config.rl.get("reference_dtype", "float32")
  if student.cfg.lora is None and ref_dtype == "float32":
    # One copy of the reference, on the devices (a device_put copies even
    # on CPU); the policy starts as a copy of it (Stage's jitted init).
    ref_host = sharded.put(ref_host, param_sh)
  # The policy's f32 start (with LoRA: the frozen base, read once here),
  # let go once the train state exists; only the frozen reference copy is
  # stored in rl.reference_dtype.
  held = [ref_host]
  train = student_lib.trainable(student, param_sh, lambda: held[0],
                                seed=config.seed + 1)
  ref_params, ref_full, full = lora_views(train, ref_host, param_sh,
                                          ref_dtype)
  del ref_host
  vocab_chunk = config.model.vocab_chunk or None
  ref_logps_fn = sharded.jit_fn(
      lambda params, batch: grpo.reference_logps(
          nnx.merge(graphdef, params), batch, vocab_chunk=vocab_chunk,
          micro_batches=config.opt.micro_batches),
      param_sh, ("batch",), mesh=mesh)
  sp, rp = rollout.with_stop_ids(sampling_params(config), tok), \
      ranking_params(config)
  k = config.sampling.num_candidates
  sampler = sharded.on_host(sharded.jit_sampler(
      graphdef, param_sh, mesh=mesh, num_candidates=k, sampling=sp,
      pad_id=tok.pad_id))
  scorers = sharded.jit_scorers(graphdef, param_sh, mesh=mesh,
                                vocab_chunk=rp.vocab_chunk)
  nan_at_step = np.int32(config.debug.nan_at_step)
  inner = config.loss.grpo.inner_iterations if recipe is grpo else 1
  try:
    with loop_lib.Stage(
        config, workdir, stage, total_steps=steps,
        learning_rate=config.opt.learning_rate,
        warmup_frac=config.opt.warmup_frac, updates_per_step=inner,
        graphdef=graphdef, param_shapes=train.shapes,
        param_sh=train.shardings, init_params=train.init, data_iter=it,
        teacher_label=teacher.label, frozen=train.frozen,
        frozen_sh=train.frozen_sh) as st:
      held.clear()
      state = st.state
      step_fn = sharded.jit_train_step(functools.partial(
          recipe.train_step, schedule=st.schedule,
          grad_accum=config.opt.grad_accum,
          micro_batches=config.opt.micro_batches, vocab_chunk=vocab_chunk,
          **recipe.step_kwargs(config)), st.state_sh, _kinds(recipe),
          mesh=mesh)
      st.loop.compiling()
      for step in range(st.start, steps):
        prompts = next(it)
        # an unusable (truncated, empty) anchor leaves its prompt out
        prompts, anchors = store.for_batch(prompts)
        key = jax.random.fold_in(state.rng, state.step)
        policy = full(state.params)
        scorer = ref_full if config.ranking.scorer == "reference" else policy
        verifier = _verifier(prompts)
        group = rollout.collect(
            graphdef, policy, scorer, tok, prompts, anchors, key,
            k=k, sampling=sp, ranking_params=rp,
            max_anchor_len=config.sft.max_response_len, verifier=verifier,
            sampler=sampler, scorers=scorers(scorer), judge=judge,
            processor=student.processor)
        correct = rollout_store.correctness(
            group.texts, [p.answer for p in prompts.prompts], verifier)
        host = _oracle_agreement(  # over every drawn group
            group, correct, rp.scheme == rollout.UNRANKED)
        if over > 1:  # dynamic sampling: the groups with a signal first
          sig = recipe.signal(group, config)
          rows = rollout.select(sig, config.rl.batch_size, [config.seed, step])
          host.update(signal_drawn=float(sig[group.valid].mean()
                                         if group.valid.any() else 0.0),
                      signal_kept=float(sig[rows].mean()))
          group, prompts = rollout.take(group, rows), prompts.take(rows)
          anchors = [anchors[i] for i in rows]
          correct = None if correct is None else correct[rows]
        if recipe is dpo and correct is not None:  # what the pairs teach
          host.update(_pair_verdicts(group, config, correct, anchors,
                                     _verifier(prompts)))
        t0 = time.perf_counter()
        batch = recipe.build_batch(group, config)
        if recipe is grpo:
          if config.loss.grpo.beta_kl > 0:
            batch["ref_logps"] = ref_logps_fn(ref_full, batch)
          for _ in range(inner - 1):  # PPO epochs over one sampled batch
            state, _ = step_fn(state, batch, nan_at_step)
          state, metrics = step_fn(state, batch, nan_at_step)
        else:
          state, metrics = step_fn(state, ref_params, batch, nan_at_step)
        # Wait for the update so the phase timings are each its own (the
        # next sampling needs these params anyway: nothing overlaps).
        jax.block_until_ready(state.params)
        cand_mask = group.member_mask[:, :group.k]
        host.update(group.timings, **group.stats,
                    update_s=time.perf_counter() - t0,
                    score_mean=float(group.scores.mean()),
                    score_std=float(group.scores.std(axis=1).mean()),
                    anchor_score=float(group.anchor_score.mean()),
                    response_len=float(cand_mask.sum(-1).mean()),
                    finished=float(group.finished.mean()),
                    teacher_calls=store.teacher_calls())
        if rollouts is not None:  # a re-run step (resume) replaces its old copy
          host["store_s"] = rollouts.record(
              step + 1, group, batch, prompt_batch=prompts, anchors=anchors,
              teacher=teacher, scheme=config.ranking.scheme,
              recipe=config.recipe, correct=correct)
        host.update(teacher_judge.metrics(judge))
        st.step_done(step + 1, state, metrics, tokens=int(cand_mask.sum()),
                     host=host)
      if (line := store.summary()) and jax.process_index() == 0:
        print(f"[{stage}] {line}", file=sys.stderr)
      st.finish(state)
  finally:
    store.close()
    if judge is not None:
      judge.close()
  out = os.path.join(workdir, FINAL)
  params = sharded.to_host(full(state.params))  # LoRA: written merged
  if jax.process_index() == 0:
    sft.write_model_dir(graphdef, params, tok, out, DONE,
                        {"steps": steps, "recipe": config.recipe},
                        adapter_base=sft.reference_dir(workdir)
                        if reference_dir is None else reference_dir)
    print(f"[{stage}] final model: {out}", file=sys.stderr)
  sharded.barrier("pu_rl.final")
  sft.drop_checkpoints(config, workdir, stage)
  return out
