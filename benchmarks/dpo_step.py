"""One DPO step on fixed pairs on this CPU: purld_jax against TRL's DPOTrainer.

  python -m benchmarks.dpo_step            # 8 pairs, 3 timed steps
  python -m benchmarks.dpo_step --quick    # 2 pairs, 1 timed step

The job, the same on every side: SmolLM2-135M-Instruct (the f32 HF directory
of `models.embedded.ensure_converted`, loaded by both), the first B prompts
of data/demo/train.jsonl, one pair each: chosen = the reference answer,
rejected = the answer plus one, both as the assistant turn of the chat
template (end of turn included); sigmoid DPO at beta 0.1, the reference a
frozen copy scored every step, AdamW at lr 1e-6 with global-norm clipping at
1, one optimizer step over all pairs.

Sides, each in its own process:
  ours         one jitted `dpo.train_step` (reference forward, policy forward
               and backward, AdamW in one XLA program; each prompt run once
               for its two members, `scoring.response_logps`).
  trl_onebatch DPOTrainer, all B pairs in one micro-batch (2B rows, the
               prompt in each).
  ours_remat   ours with model.remat "full" (layers recomputed in the
               backward pass: less memory, one more forward).
  trl_accum    DPOTrainer, one pair per micro-batch, B accumulation steps.
  trl_*        with TRL's default gradient checkpointing (on); the
  trl_*_nockpt sides turn it off (TRL's faster setting).

One warm-up step (compiles on ours), then --iterations timed steps; the
median counts. TRL phases: ref forward, policy forward, backward, optimizer,
other. Ours is one fused program (`train_step`); the reference forward alone,
jitted apart, is printed beside it as an indication of its share (not part of
the total). Prints the table and appends one JSON line to
benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from benchmarks import peers

MODULE = "benchmarks.dpo_step"
PHASES = ["train_step", "ref_forward", "policy_forward", "backward",
          "optimizer", "other"]


def pairs(n: int) -> list[dict]:
  return [dict(prompt=r["prompt"], chosen=str(r["answer"]),
               rejected=str(int(r["answer"]) + 1))
          for r in peers.demo_prompts(n)]


def run_ours(s: dict) -> dict:
  import functools

  import jax
  import numpy as np
  from flax import nnx
  from purld_jax import hostmem
  from purld_jax import rollout
  from purld_jax.train import dpo

  rows = pairs(s["pairs"])
  state, ref_params, schedule, tok, batch_p, cfg = peers.ours_setup(
      s["lr"], rows, remat=s.get("remat", "none"),
      scan_layers=s.get("scan_layers", False))
  graphdef = state.graphdef
  messages = [p.as_dicts() for p in batch_p.prompts]
  chosen = rollout.anchor_members(tok, messages, [r["chosen"] for r in rows],
                                  max_len=64)
  rejected = rollout.anchor_members(tok, messages,
                                    [r["rejected"] for r in rows], max_len=64)
  b = len(rows)
  t = max(len(ids) for ids in chosen + rejected)
  both = np.full((b, 2, t), tok.pad_id, np.int32)  # members: chosen, rejected
  both_mask = np.zeros((b, 2, t), bool)
  for i, pair in enumerate(zip(chosen, rejected)):
    for j, ids in enumerate(pair):
      both[i, j, :len(ids)], both_mask[i, j, :len(ids)] = ids, True
  batch = dpo.compact(dict(
      prompt_tokens=batch_p.tokens, prompt_mask=batch_p.mask, members=both,
      member_mask=both_mask, chosen=np.zeros((b, 1), np.int32),
      rejected=np.ones((b, 1), np.int32), pair_mask=np.ones((b, 1), bool)))
  step_fn = jax.jit(functools.partial(
      dpo.train_step, beta=s["beta"], loss_type="sigmoid",
      label_smoothing=0.0, reduce="pairs", schedule=schedule),
      donate_argnums=0)
  ref_fn = jax.jit(lambda p, bt: dpo._seq_logps(nnx.merge(graphdef, p), bt,
                                                None))
  iters, phases = [], peers.Phases()
  for it in range(1 + s["iterations"]):
    start = time.perf_counter()
    if it == 0:  # compiled apart (its memory a phase of its own), timed in
      step_fn, temp = peers.compile_jit(    # the warm-up as before
          phases, "compile_train_step", step_fn, state, ref_params, batch)
    state, metrics = step_fn(state, ref_params, batch)
    jax.block_until_ready(state.params)
    total = time.perf_counter() - start
    phases.add("train_step", total)
    hostmem.release()  # after each step, untimed, as train/loop.py does
    iters.append(dict(train_step=total, total=total))
    print(f"  ours step {it}{' (warm-up)' if it == 0 else ''}: {total:.2f} s;"
          f" loss {float(metrics['loss']):.4f}", flush=True)
  jax.block_until_ready(ref_fn(ref_params, batch))
  ref_s = []
  for _ in range(max(1, s["iterations"])):
    start = time.perf_counter()
    jax.block_until_ready(ref_fn(ref_params, batch))
    ref_s.append(time.perf_counter() - start)
  phases.add("ref_forward_apart", float(np.sum(ref_s)))
  return peers.side_result(
      iters, ref_forward_apart_s=float(np.median(ref_s)),
      rss_after_mb=phases.rss_mb, xla_temp_mb=dict(train_step=temp),
      prompt_tokens=[len(i) for i in batch_p.ids],
      response_tokens=int(both_mask.sum()),
      scored_shape=list(batch["members"].shape),
      matmul_gflops=peers.jax_matmul_gflops(s["rate_rows"], cfg))


def run_trl(side: str, s: dict) -> dict:
  import datasets
  import torch
  import transformers
  import trl
  from purld_jax.models import embedded

  path = str(embedded.ensure_converted())
  b = s["pairs"]
  accum = s["trl_accumulate"]
  ds = datasets.Dataset.from_list(
      [dict(prompt=[dict(role="user", content=r["prompt"])],
            chosen=[dict(role="assistant", content=r["chosen"])],
            rejected=[dict(role="assistant", content=r["rejected"])])
       for r in pairs(b)])
  phases = peers.Phases()
  iters = []

  with tempfile.TemporaryDirectory() as tmp:
    args = trl.DPOConfig(
        output_dir=tmp, report_to="none", save_strategy="no",
        logging_steps=1, use_cpu=True, bf16=False, seed=0,
        per_device_train_batch_size=1 if accum else b,
        gradient_accumulation_steps=b if accum else 1,
        beta=s["beta"], loss_type=["sigmoid"], learning_rate=s["lr"],
        max_grad_norm=1.0, lr_scheduler_type="constant",
        max_steps=1 + s["iterations"], precompute_ref_log_probs=False,
        model_init_kwargs=dict(dtype=torch.float32),
        gradient_checkpointing=s["trl_grad_checkpointing"],
        dataloader_num_workers=0)
    trainer = trl.DPOTrainer(
        model=path, args=args, train_dataset=ds,
        processing_class=transformers.AutoTokenizer.from_pretrained(path),
        callbacks=[peers.trl_timer(side, phases, iters)])
    phases.wrap(trainer.ref_model, "forward", "ref_forward")
    phases.wrap(trainer.model, "forward", "policy_forward")
    phases.wrap(trainer.accelerator, "backward", "backward")
    trainer.train()
  return peers.trl_result(trainer, ds, iters, path, s["rate_rows"],
                          rss_after_mb=phases.rss_mb)


def run_side(side: str, settings: dict) -> dict:
  settings = peers.side_settings(side, settings)
  return (run_ours(settings) if side.startswith("ours")
          else run_trl(side, settings))


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if "--child" in argv:
    return peers.child_main(run_side, argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--beta", type=float, default=0.1)
  peers.add_common_args(parser, peers.SIDES)
  args = parser.parse_args(argv)
  if args.quick:
    args.pairs, args.iterations = 2, 1
  settings = dict(pairs=args.pairs, iterations=args.iterations,
                  beta=args.beta, loss="sigmoid", lr=1e-6,
                  optimizer_steps=1, rate_rows=512, omp_wait=args.omp_wait,
                  scan_layers=args.scan_layers, quick=args.quick)
  sides = peers.run_sides(MODULE, args.sides, settings)
  from purld_jax.models import embedded
  dims = peers.model_dims(str(embedded.ensure_converted()))
  ok = peers.succeeded(sides)
  p = sum(next(iter(ok.values()))["prompt_tokens"])
  resp = ok.get("ours", {}).get("response_tokens", 0)
  # reference forward + policy forward and backward (3 forwards).
  useful = 4 * peers.forward_flops(dims, p, resp) / 1e9
  for name, s in ok.items():
    print(f"{name}: prompt tokens {s['prompt_tokens']}"
          + (f"; scored members {s['scored_shape']}, {resp} response tokens, "
             f"reference forward alone {s['ref_forward_apart_s']:.2f} s"
             if name == "ours" else ""))
  peers.report("dpo_step", settings, sides, useful, PHASES, args.out)


if __name__ == "__main__":
  main()
