"""One GRPO iteration on this CPU: purld_jax against TRL's GRPOTrainer.

  python -m benchmarks.grpo_iteration            # 8 prompts x 8 x 64 tokens
  python -m benchmarks.grpo_iteration --quick    # 2 prompts x 2 x 8, 1 iteration
  python -m benchmarks.grpo_iteration --quick --sides ours --lora 8

The job, the same on every side: SmolLM2-135M-Instruct (the f32 HF directory
of `models.embedded.ensure_converted`, loaded by both), the first B prompts
of data/demo/train.jsonl, K completions per prompt of exactly T new tokens
(stop tokens ignored by ours, EOS suppressed by `min_new_tokens` in TRL, so
both generate and train on B*K*T tokens), temperature 1, no filters; the
reward is the exact-match check of `peers.exact_match` on both sides (a
verifiable reward, so the comparison is about the RL machinery: PU-RLD's
self-ranking against an anchor is not run); old log-probs, reference
log-probs with beta = 0.04 (k3 KL), the clipped ratio at eps 0.2, DAPO
token aggregation, AdamW at lr 1e-6 with global-norm clipping at 1, one
optimizer step.

Sides, each in its own process:
  ours         `rollout.collect` (one jitted `sampling.sample`: each prompt
               prefilled once for its K rows; the sampler's own log-probs are
               the old policy's; scheme "oracle" with the reward as
               verifier), `grpo.build_batch`, `grpo.reference_logps` (jitted,
               each prompt once for its K responses), one jitted
               `grpo.train_step` on all B*K rows, run as `--micro-batches`
               slices of the prompts inside the step (default B: one
               prompt's K rows at a time, as trl_accum) under one
               optimizer update.
  ours_remat   ours with model.remat "full" (each layer recomputed in the
               backward pass: one forward more, one layer's activations
               alive at a time; ours' lower-memory setting).
  trl_onebatch GRPOTrainer, all B*K completions in one micro-batch.
  trl_accum    GRPOTrainer, K completions per micro-batch and B
               gradient-accumulation steps (its lower-memory setting).
  trl_*        with TRL's default gradient checkpointing (GRPOConfig turns
               it on); trl_onebatch_nockpt / trl_accum_nockpt turn it off
               (TRL's faster setting: no recomputed forward).
--lora R (ours only): the policy is rank-R LoRA adapters on the frozen
model (`peers.ours_setup`), trained as the stages train them (the base an
undonated argument of the jitted step, the reference the base with zero
adapters): NOT the same work as TRL's full fine-tune (no gradient or Adam
state for the base weights), so its time and memory are ours' alone, not
a comparison.
TRL computes no old log-probs here (generation and the update are aligned,
so its ratio is taken against the detached current log-probs, which equal
them); its reference is a second model copy.

One warm-up iteration (compiles on ours), then --iterations timed ones; the
median counts. Phases: generation (sampling and decoding), reward, ref
log-probs, loss forward / backward / optimizer (ours: one fused jitted step,
not split), other (the rest of the iteration). Prints the table and appends
one JSON line to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from benchmarks import peers

MODULE = "benchmarks.grpo_iteration"
PHASES = ["generation", "reward", "ref_logps", "build_batch", "train_step",
          "loss_forward", "backward", "optimizer", "other"]


# ----------------------------------------------------------------------------
# Ours


def run_ours(s: dict) -> dict:
  import functools
  import types

  import jax
  from flax import nnx
  from purld_jax import hostmem
  from purld_jax import rollout
  from purld_jax import sampling
  from purld_jax.train import grpo

  rows = peers.demo_prompts(s["prompts"])
  state, ref_params, schedule, tok, batch_p, cfg = peers.ours_setup(
      s["lr"], rows, remat=s["remat"], lora_rank=s.get("lora", 0),
      scan_layers=s.get("scan_layers", False))
  graphdef = state.graphdef
  answers = [r["answer"] for r in rows]
  verifier = lambda b, text: peers.exact_match(text, answers[b])
  # A stop id no token has: every row generates exactly T tokens.
  sp = sampling.SamplingParams(temperature=1.0, max_new_tokens=s["new_tokens"],
                               stop_ids=(-1,))
  rp = rollout.RankingParams(scheme="oracle")
  config = types.SimpleNamespace(
      preference=types.SimpleNamespace(tau_label=1.0),
      # d = softmax over the K rewards (shift: the anchor's score cancels;
      # not a member), A = (d - mean) / max(std, 0.1): the group's rewards
      # alone, no PU gate. (build_batch reads these since 139979b.)
      pu=types.SimpleNamespace(mode="shift", delta=0.0, prior=0.5,
                               include_anchor=False, anchor_fallback=False),
      loss=types.SimpleNamespace(grpo=types.SimpleNamespace(
          advantage="std", std_floor=0.1)))
  micro = s["micro_batches"]
  chunk = s.get("vocab_chunk") or None  # positions per logits chunk
  ref_fn = jax.jit(lambda p, b: grpo.reference_logps(
      nnx.merge(graphdef, p), b, micro_batches=micro, vocab_chunk=chunk))
  train = functools.partial(
      grpo.train_step, eps_low=s["epsilon"], eps_high=s["epsilon"],
      beta_kl=s["beta"], aggregation="token", schedule=schedule,
      micro_batches=micro, vocab_chunk=chunk)
  frozen = state.frozen  # LoRA: the base, never donated (sharded.FrozenStep)
  if frozen is None:
    step_fn = jax.jit(train, donate_argnums=0)
    step_args = lambda st: (st,)
  else:
    def body(st, base, b):
      new, m = train(st.replace(frozen=base), b)
      return new.replace(frozen=None), m
    step_fn = jax.jit(body, donate_argnums=0)
    step_args = lambda st: (st.replace(frozen=None), frozen)
  phases = peers.Phases()
  iters, tokens, temps = [], 0, {}

  for it in range(1 + s["iterations"]):
    start = time.perf_counter()
    key = jax.random.fold_in(jax.random.PRNGKey(1), it)
    group = rollout.collect(graphdef, state.full_params(), ref_params, tok,
                            batch_p,
                            [str(a) for a in answers], key,
                            k=s["completions"], sampling=sp,
                            ranking_params=rp, max_anchor_len=16,
                            verifier=verifier)
    phases.add("generation", group.timings["sample_s"])
    phases.add("reward", group.timings["score_s"])
    with phases("build_batch"):
      batch = grpo.build_batch(group, config)
    if it == 0:  # compiled apart: its time and memory are their own phases
      ref_fn, temps["ref_logps"] = peers.compile_jit(
          phases, "compile_ref_logps", ref_fn, ref_params, batch)
    with phases("ref_logps"):
      batch["ref_logps"] = jax.block_until_ready(ref_fn(ref_params, batch))
    if it == 0:
      step_fn, temps["train_step"] = peers.compile_jit(
          phases, "compile_train_step", step_fn, *step_args(state), batch)
    with phases("train_step"):
      state, metrics = step_fn(*step_args(state), batch)
      state = state.replace(frozen=frozen)
      jax.block_until_ready(state.params)
    total = time.perf_counter() - start
    times = phases.take()
    times["other"] = total - sum(times.values())
    times["total"] = total
    hostmem.release()  # after each step, untimed, as train/loop.py does
    tokens = int(group.member_mask[:, :group.k].sum())
    print(f"  ours iteration {it}{' (warm-up)' if it == 0 else ''}: "
          f"{total:.1f} s " + " ".join(f"{k}={v:.1f}" for k, v in times.items()
                                       if k != "total")
          + f"; loss {float(metrics['loss']):.4f}, reward mean "
          f"{group.scores.mean():.3f}, tokens {tokens}", flush=True)
    iters.append(times)
  return peers.side_result(iters, completion_tokens=tokens,
              rss_after_mb=phases.rss_mb, xla_temp_mb=temps,
              prompt_tokens=[len(i) for i in batch_p.ids],
              padded_prompt=int(batch_p.tokens.shape[1]),
              matmul_gflops=peers.jax_matmul_gflops(s["rate_rows"], cfg))


# ----------------------------------------------------------------------------
# TRL


def run_trl(side: str, s: dict) -> dict:
  import datasets
  import torch
  import transformers
  import trl
  from purld_jax.models import embedded

  path = str(embedded.ensure_converted())
  b, k, t = s["prompts"], s["completions"], s["new_tokens"]
  accum = s["trl_accumulate"]
  rows = peers.demo_prompts(b)
  ds = datasets.Dataset.from_list(
      [dict(prompt=[dict(role="user", content=r["prompt"])],
            answer=str(r["answer"])) for r in rows])

  def exact_match_reward(completions, answer, **_):
    return [peers.exact_match(c[0]["content"], a)
            for c, a in zip(completions, answer)]

  phases = peers.Phases()
  iters, lengths = [], []

  with tempfile.TemporaryDirectory() as tmp:
    args = trl.GRPOConfig(
        output_dir=tmp, report_to="none", save_strategy="no",
        logging_steps=1, use_cpu=True, bf16=False, seed=0,
        per_device_train_batch_size=k if accum else b * k,
        gradient_accumulation_steps=b if accum else 1,
        num_generations=k, max_completion_length=t,
        generation_kwargs=dict(min_new_tokens=t),
        temperature=1.0, top_p=1.0, top_k=0, beta=s["beta"],
        epsilon=s["epsilon"], loss_type="dapo", learning_rate=s["lr"],
        max_grad_norm=1.0, lr_scheduler_type="constant",
        max_steps=1 + s["iterations"], shuffle_dataset=False,
        model_init_kwargs=dict(dtype=torch.float32),
        gradient_checkpointing=s["trl_grad_checkpointing"],
        dataloader_num_workers=0)
    trainer = trl.GRPOTrainer(
        model=path, reward_funcs=exact_match_reward, args=args,
        train_dataset=ds,
        processing_class=transformers.AutoTokenizer.from_pretrained(path),
        callbacks=[peers.trl_timer(side, phases, iters, lengths)])
    phases.wrap(trainer, "_generate", "generation")
    phases.wrap(trainer, "_calculate_rewards", "reward")
    phases.wrap(trainer, "_get_per_token_logps_and_entropies",
                lambda: "loss_forward" if torch.is_grad_enabled()
                else "ref_logps")
    phases.wrap(trainer.accelerator, "backward", "backward")
    trainer.train()
  return peers.trl_result(trainer, ds, iters, path, s["rate_rows"],
                          mean_completion_length=lengths,
                          rss_after_mb=phases.rss_mb)


def run_side(side: str, settings: dict) -> dict:
  settings = peers.side_settings(side, settings)
  return (run_ours(settings) if side.startswith("ours")
          else run_trl(side, settings))


# ----------------------------------------------------------------------------
# Main


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if "--child" in argv:
    return peers.child_main(run_side, argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--completions", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--beta", type=float, default=0.04)
  parser.add_argument("--remat", default="none",
                      help="ours' model.remat: none | full | dots (full: "
                      "layer activations recomputed in the backward pass)")
  parser.add_argument("--micro-batches", type=int, default=None,
                      help="ours' opt.micro_batches: prompt slices run one "
                      "after another inside the jitted step and the "
                      "reference pass (default: B, one prompt's K "
                      "completions per slice, TRL's accumulation layout)")
  parser.add_argument("--vocab-chunk", type=int, default=0, metavar="N",
                      help="ours' model.vocab_chunk: response positions per "
                      "chunk of the vocabulary head's logits (0: automatic, "
                      "at most 512 MiB of logits at once)")
  parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                      help="ours only: train rank-RANK LoRA adapters on the "
                      "frozen model (0: full fine-tune). Not equal work to "
                      "TRL's full fine-tune")
  peers.add_common_args(parser, peers.SIDES)
  args = parser.parse_args(argv)
  if args.quick:
    args.prompts, args.completions, args.new_tokens = 2, 2, 8
    args.iterations = 1
  micro = args.prompts if args.micro_batches is None else args.micro_batches
  settings = dict(prompts=args.prompts, completions=args.completions,
                  new_tokens=args.new_tokens, iterations=args.iterations,
                  beta=args.beta, epsilon=0.2, lr=1e-6, temperature=1.0,
                  aggregation="token (DAPO)", optimizer_steps=1,
                  rate_rows=512, omp_wait=args.omp_wait, remat=args.remat,
                  micro_batches=micro,
                  scan_layers=args.scan_layers, vocab_chunk=args.vocab_chunk,
                  quick=args.quick)
  if args.lora:
    settings["lora"] = args.lora
    print(f"ours: LoRA rank {args.lora} (alpha {2 * args.lora}, all seven "
          "projections), the base frozen: NOT equal work to TRL's full "
          "fine-tune (TRL sides, if run, still train every weight)",
          flush=True)
  sides = peers.run_sides(MODULE, args.sides, settings)
  from purld_jax.models import embedded
  dims = peers.model_dims(str(embedded.ensure_converted()))
  b, k, t = args.prompts, args.completions, args.new_tokens
  ok = peers.succeeded(sides)
  p = sum(next(iter(ok.values()))["prompt_tokens"])
  bkt = b * k * t
  # generation: prompts once + every decoded token with the head; reference:
  # one forward; the update: forward and backward (3 forwards).
  useful = (peers.forward_flops(dims, p, bkt) + 4 * peers.forward_flops(
      dims, p, bkt)) / 1e9
  for name, s in ok.items():
    print(f"{name}: prompt tokens {s['prompt_tokens']}"
          + (f", TRL mean completion length {s['mean_completion_length']}"
             if "mean_completion_length" in s else
             f", completion tokens {s.get('completion_tokens')}"))
  peers.report("grpo_iteration", settings, sides, useful, PHASES, args.out)
  if args.lora:
    print(f"note: ours trained LoRA rank {args.lora} adapters, the base "
          "frozen; the useful GFLOP above count a full fine-tune's update, "
          "and any ratio to a TRL side compares unequal work")


if __name__ == "__main__":
  main()
