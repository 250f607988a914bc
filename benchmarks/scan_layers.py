"""Compile and run time of `model.scan_layers` against the unrolled layers.

  python -m benchmarks.scan_layers                 # both sides, 3 timed runs
  python -m benchmarks.scan_layers --iterations 1  # quicker

What a cold start pays: each side, in a fresh interpreter with no
compilation cache, lowers and compiles the demo's DPO train step
(`configs/demo.py` shapes, `tools/aot.compile_train_step`) and the demo
sampler (8 prompts x K 4 x 8 new tokens), then times, on SmolLM2-135M, the
gradient of `scoring.response_logps` (8 prompts of 64 tokens x 4 responses
of 16) and the sampler at 8 prompts x 8 candidates x 64 tokens (median of
--iterations after one warm-up call). Prints the table and appends one JSON
line to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from benchmarks import peers

MODULE = "benchmarks.scan_layers"
SIDES = ("unrolled", "scan")


def _timed(fn, *args):
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def run_side(side: str, settings: dict) -> dict:
  """One side's compile seconds and median run seconds."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  from purld_jax import sampling  # pylint: disable=g-import-not-at-top
  from purld_jax import scoring  # pylint: disable=g-import-not-at-top
  from purld_jax import sharding  # pylint: disable=g-import-not-at-top
  from purld_jax.models import embedded  # pylint: disable=g-import-not-at-top
  from purld_jax.models import hf  # pylint: disable=g-import-not-at-top
  from purld_jax.models import llama  # pylint: disable=g-import-not-at-top
  from purld_jax.tools import aot  # pylint: disable=g-import-not-at-top
  scan = side == "scan"
  out = {}
  config = demo.get_config()
  config.model.scan_layers = scan
  _, out["compile_dpo_step_s"], _, _ = aot.compile_train_step(
      config, sharding.mesh_from_config(config.mesh))

  path = embedded.ensure_converted()
  cfg = dataclasses.replace(
      hf.read_config(path, dtype=jnp.float32, param_dtype=jnp.float32),
      scan_layers=scan)
  params = hf.load_params(path, cfg)
  graphdef, _ = llama.abstract_model(cfg)
  rng = np.random.default_rng(0)
  b, p = 8, 64
  pt = jnp.asarray(rng.integers(1, 1000, (b, p)), jnp.int32)
  pm = jnp.ones((b, p), bool)

  def sampler(k, t):
    sp = sampling.SamplingParams(max_new_tokens=t, temperature=1.0)
    return jax.jit(lambda prm, key: sampling.sample(
        graphdef, prm, pt, pm, key, prompt_index=jnp.arange(b, dtype=jnp.int32),
        num_candidates=k, sampling=sp, pad_id=0).tokens)

  t0 = time.perf_counter()
  sampler(4, 8).lower(params, jax.random.key(0)).compile()
  out["compile_demo_sampler_s"] = time.perf_counter() - t0

  rt = jnp.asarray(rng.integers(1, 1000, (b, 4, 16)), jnp.int32)
  rm = jnp.ones((b, 4, 16), bool)
  grad = jax.jit(jax.grad(lambda prm: jnp.sum(scoring.response_logps(
      nnx.merge(graphdef, prm), pt, pm, rt, rm))))
  sample = sampler(8, 64)
  out["warmup_grad_s"] = _timed(grad, params)
  out["warmup_sample_s"] = _timed(sample, params, jax.random.key(0))
  grads, samples = [], []
  for i in range(settings["iterations"]):
    grads.append(_timed(grad, params))
    samples.append(_timed(sample, params, jax.random.key(i + 1)))
  out.update(grad_runs_s=grads, sample_runs_s=samples,
             grad_s=float(np.median(grads)),
             sample_s=float(np.median(samples)),
             sample_tok_s=b * 8 * 64 / float(np.median(samples)))
  return out


ROWS = [("compile: demo DPO step (s)", "compile_dpo_step_s", ".1f"),
        ("compile: demo sampler (s)", "compile_demo_sampler_s", ".1f"),
        ("grad 8x4x16, median (s)", "grad_s", ".2f"),
        ("sample 8x8x64, median (s)", "sample_s", ".2f"),
        ("sample tokens/s", "sample_tok_s", ".1f"),
        ("peak RSS (MB)", "peak_rss_mb", ".0f")]


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if "--child" in argv:
    peers.child_main(run_side, argv)
    return
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--iterations", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results.jsonl"))
  args = parser.parse_args(argv)
  settings = dict(iterations=args.iterations)
  sides = {side: peers.run_child(MODULE, side, settings) for side in SIDES}
  print(f"\n{'':30}" + "".join(f"{s:>12}" for s in SIDES) + f"{'scan/unrolled':>15}")
  for label, key, fmt in ROWS:
    vals = [sides[s].get(key) for s in SIDES]
    if None in vals:
      continue
    print(f"{label:30}" + "".join(f"{v:>12{fmt}}" for v in vals)
          + f"{vals[1] / vals[0]:>15.2f}")
  print("load avg before/after: " + ", ".join(
      f"{s} {sides[s]['load_before']}/{sides[s]['load_after']}"
      for s in SIDES))
  row = dict(peers.header(settings), bench="scan_layers", sides=sides)
  with open(args.out, "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
