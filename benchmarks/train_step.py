"""Time of one PU-RL train step (DPO and GRPO) on this CPU.

  python -m benchmarks.train_step            # the embedded SmolLM2-135M
  python -m benchmarks.train_step --random   # random weights, same shape

The job: B=8 prompts of 60-70 real tokens (left-padded to the 96 bucket),
K=4 candidates plus the anchor (K+1 = 5 members) of 8-16 tokens, padded to
T=16.
  dpo:  best-vs-worst pairs (2 of the 5 members of a prompt); one jitted
        `dpo.train_step` on `dpo.build_batch`'s arrays (`dpo.compact` when
        the tree has it): the reference's forward, the policy's forward and
        backward, AdamW.
  grpo: the K=4 candidates; one jitted `grpo.train_step` (policy forward
        and backward, clipped ratio, k3 KL to given reference log-probs),
        plus `grpo.reference_logps` once (timed apart).
Steps are timed from call to ready, best of --repeats, after a compile.

Tokens/s counts the real response tokens that enter the loss (the pairs'
members, or the K candidates). The roofline fraction is the FLOPs those
rows need, their prompt counted once, over (seconds x this machine's f32
matmul rate at the step's row count, `benchmarks.sampling.measure_rates`):
a forward is 2 x (non-embedding weights) per token plus 2 x V x D per
predicted token (attention left out: P ~ 70); the policy's forward and
backward count 3 forwards, the reference 1. Appends one JSON line to
benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import subprocess
import time

import numpy as np

from benchmarks import sampling as sampling_bench


def _groups(b, k, p_lo, p_hi, t, vocab, seed=0):
  """Prompts [B, P] (bucketed, left-padded) and members [B, K+1, T]."""
  from purld_jax import sampling
  rng = np.random.default_rng(seed)
  prompts = [list(rng.integers(10, vocab, rng.integers(p_lo, p_hi + 1)))
             for _ in range(b)]
  tokens, mask = sampling.pad_prompts(prompts, 0)
  lens = rng.integers(t // 2, t + 1, (b, k + 1))
  members = rng.integers(10, vocab, (b, k + 1, t)).astype(np.int32)
  mmask = np.arange(t)[None, None, :] < lens[..., None]
  return tokens, mask, np.where(mmask, members, 0), mmask


def _dpo_batch(tokens, mask, members, mmask, rng):
  """best-vs-worst: one pair per prompt over two distinct candidates."""
  from purld_jax.train import dpo
  b, m, _ = members.shape
  picks = np.stack([rng.choice(m - 1, 2, replace=False) for _ in range(b)])
  batch = dict(prompt_tokens=tokens, prompt_mask=mask, members=members,
               member_mask=mmask, chosen=picks[:, :1].astype(np.int32),
               rejected=picks[:, 1:].astype(np.int32),
               pair_mask=np.ones((b, 1), bool))
  if hasattr(dpo, "compact"):
    batch = dpo.compact(batch)
  return batch


def _best(f, repeats):
  import jax
  start = time.perf_counter()
  jax.block_until_ready(f())
  first = time.perf_counter() - start
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f())
    runs.append(time.perf_counter() - start)
  return first, runs


def _flops(cfg, prompt_tokens, response_tokens, passes):
  """FLOPs of `passes` forwards over prompts once plus the responses."""
  head = cfg.vocab_size * cfg.hidden_size
  emb = head * (1 if cfg.tie_word_embeddings else 2)
  body = cfg.num_params() - emb
  fwd = 2 * body * (prompt_tokens + response_tokens) + 2 * head * response_tokens
  return passes * fwd


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--random", action="store_true",
                      help="random weights of SmolLM2's shape")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--recipes", default="dpo,grpo")
  parser.add_argument("--out", default=str(sampling_bench.RESULTS))
  args = parser.parse_args(argv)
  b, k, t = 8, 4, 16

  import jax
  import jax.numpy as jnp
  from flax import nnx
  from purld_jax.train import dpo
  from purld_jax.train import grpo
  from purld_jax.train import state as state_lib

  model, _, model_name = sampling_bench.load_model(args.random)
  cfg = model.cfg
  graphdef, params = nnx.split(model)
  ref_params = jax.tree.map(jnp.copy, params)
  tx, schedule = state_lib.make_optimizer(learning_rate=1e-6, warmup_steps=0,
                                          total_steps=10)
  state = state_lib.TrainState.create(graphdef, params, tx,
                                      rng=jax.random.PRNGKey(0))
  tokens, mask, members, mmask = _groups(b, k, 60, 70, t, cfg.vocab_size)
  p_real = int(mask.sum())
  rng = np.random.default_rng(1)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
  info = sampling_bench.machine()
  print(f"{info['cpu']} x {info['nproc']}; jax {jax.__version__}; "
        f"{model_name}; commit {commit}; B={b} prompts of "
        f"{p_real / b:.1f} tokens padded to {tokens.shape[1]}; K+1={k + 1} "
        f"members of T={t}; load {sampling_bench.load()}", flush=True)

  rows = []
  for recipe in args.recipes.split(","):
    if recipe == "dpo":
      batch = _dpo_batch(tokens, mask, members, mmask, rng)
      fn = jax.jit(functools.partial(
          dpo.train_step, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
          reduce="pairs", schedule=schedule))
      step = lambda: fn(state, ref_params, batch)
      used = np.stack([np.take_along_axis(batch["member_mask"].sum(-1),
                                          batch[c], -1)[:, 0]
                       for c in ("chosen", "rejected")])
      resp, passes = int(used.sum()), 4  # policy fwd + bwd, reference fwd
      shape = batch["members"].shape
      extra = {}
    else:
      batch = dict(prompt_tokens=tokens, prompt_mask=mask,
                   responses=members[:, :k], response_mask=mmask[:, :k],
                   old_logps=np.full((b, k, t), -2.0, np.float32),
                   advantages=rng.normal(size=(b, k)).astype(np.float32))
      ref_fn = jax.jit(lambda p, bt: grpo.reference_logps(
          nnx.merge(graphdef, p), bt))
      ref_first, ref_runs = _best(lambda: ref_fn(ref_params, batch),
                                  args.repeats)
      batch["ref_logps"] = ref_fn(ref_params, batch)
      fn = jax.jit(functools.partial(
          grpo.train_step, eps_low=0.2, eps_high=0.28, beta_kl=0.04,
          aggregation="token", schedule=schedule))
      step = lambda: fn(state, batch)
      resp, passes = int(mmask[:, :k].sum()), 3
      shape = batch["responses"].shape
      extra = dict(reference_s=min(ref_runs))
    first, runs = _best(step, args.repeats)
    rates = sampling_bench.measure_rates(shape[0] * shape[1] * t, cfg)
    secs = min(runs)
    flops = _flops(cfg, p_real, resp, passes)
    row = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        commit=commit, bench="train_step", recipe=recipe, model=model_name,
        B=b, K=k, T=t, prompt_tokens=p_real / b,
        padded_prompt=int(tokens.shape[1]), scored_shape=list(shape), **info,
        jax=jax.__version__, step_s=secs, runs_s=runs,
        compile_and_first_s=first, response_tok_s=resp / secs,
        gflop=flops / 1e9, matmul_gflops=rates["matmul_gflops"],
        roofline=flops / secs / (rates["matmul_gflops"] * 1e9),
        load=sampling_bench.load(), **extra)
    rows.append(row)
    print(f"  {recipe}: scored {tuple(shape)}; step {secs:.2f} s (runs "
          f"{', '.join(f'{r:.2f}' for r in runs)}; compile+first "
          f"{first:.1f} s); {row['response_tok_s']:.1f} response tok/s; "
          f"{row['gflop']:.0f} GFLOP needed, matmul "
          f"{row['matmul_gflops']:.0f} GFLOP/s -> roofline "
          f"{row['roofline']:.2f}"
          + (f"; reference_logps {extra['reference_s']:.2f} s" if extra
             else ""), flush=True)
  with open(args.out, "a", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
