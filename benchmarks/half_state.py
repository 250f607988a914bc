"""Half-precision state side by side (issue 32, item 2): the losses of one
pipeline run with f32 state, with bf16 Adam first moments
(`opt.mu_dtype`) and with a bf16 reference copy (`rl.reference_dtype`).

  python -m benchmarks.half_state                     # 24 SFT + 24 DPO steps
  python -m benchmarks.half_state --sft-steps 4 --rl-steps 4   # quicker

Each variant runs `pu_rl.run` (stage 1 SFT, then stage 2 DPO) on
`configs/demo.py:tiny` (a random tiny model, the char tokenizer, the
SIMULATED dataset teacher; CPU) from the same seed in its own workdir;
rl.reference_dtype only changes stage 2, opt.mu_dtype both stages (and a
fourth run, f32 with seed 1, shows the run-to-run noise). Writes
the per-step losses, the largest |loss - f32 loss| per stage, the bytes
each option saves (the tiny model and SmolLM2-135M's shapes, from
abstract shapes: nothing allocated) and a check of why nu stays f32 to
benchmarks/half_state.json, and a plot to benchmarks/half_state.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# f32_seed1: f32 with another run seed (sampling keys only: the same model,
# data order and SFT), the scale of run-to-run noise in the DPO losses.
VARIANTS = {"f32": {}, "bf16_mu": {"opt.mu_dtype": "bfloat16"},
            "bf16_ref": {"rl.reference_dtype": "bfloat16"},
            "f32_seed1": {"seed": 1}}


def _config(overrides: dict, sft_steps: int, rl_steps: int):
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config("tiny")
  c.sft.steps, c.rl.steps = sft_steps, rl_steps
  c.log.tensorboard = False
  c.rollout_store.enabled = False
  c.ckpt.async_save = False
  c.ckpt.every_steps = max(sft_steps, rl_steps)
  c.mesh.data = 1
  for key, value in overrides.items():
    *block, field = key.split(".")
    (c[block[0]] if block else c)[field] = value
  return c


def run_variant(name: str, sft_steps: int, rl_steps: int, root: str) -> dict:
  """Losses per stage ({"sft": [...], "dpo": [...]}) and wall seconds."""
  from purld_jax import config_check  # pylint: disable=g-import-not-at-top
  from purld_jax.train import pu_rl  # pylint: disable=g-import-not-at-top
  c = _config(VARIANTS[name], sft_steps, rl_steps)
  config_check.validate(c)
  workdir = os.path.join(root, name)
  t0 = time.perf_counter()
  pu_rl.run(c, workdir)
  wall = time.perf_counter() - t0
  losses = {"sft": [], c.recipe: []}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for row in map(json.loads, f):
      if row.get("stage") in losses and "loss" in row:
        losses[row["stage"]].append(row["loss"])
  return dict(losses=losses, wall_s=round(wall, 1))


def state_bytes() -> dict:
  """Bytes of mu (f32 / bf16), nu and the reference (f32 / bf16) for the
  tiny model and SmolLM2-135M, from abstract shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  from purld_jax.models import llama  # pylint: disable=g-import-not-at-top
  from purld_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from purld_jax.train import student  # pylint: disable=g-import-not-at-top
  out = {}
  for label, path in (("tiny", "tiny"), ("smollm2_135m", "embedded")):
    cfg = student.architecture(path=path, dtype_name="float32",
                               param_dtype_name="float32")
    graphdef, shapes = llama.abstract_model(cfg)
    nbytes = lambda t: sum(x.size * x.dtype.itemsize
                           for x in jax.tree.leaves(t))
    row = {"params": sum(x.size for x in jax.tree.leaves(shapes))}
    for mu in ("float32", "bfloat16"):
      tx, _ = state_lib.make_optimizer(learning_rate=1e-3, warmup_steps=0,
                                       total_steps=10, mu_dtype=mu)
      arrays = state_lib.abstract_arrays(graphdef, shapes, tx,
                                         rng=jax.random.PRNGKey(0))
      row[f"opt_state_{mu}"] = nbytes(arrays["opt_state"])
    row["opt_state_saved"] = row["opt_state_float32"] - row[
        "opt_state_bfloat16"]
    row["reference_float32"] = nbytes(shapes)
    row["reference_bfloat16"] = sum(x.size * 2 for x in jax.tree.leaves(
        shapes))
    row["reference_saved"] = row["reference_float32"] - row[
        "reference_bfloat16"]
    out[label] = row
  return out


def nu_check(steps: int = 1000) -> dict:
  """nu = b2 nu + (1 - b2) g^2 from nu = 1 with g = 0 for `steps` steps,
  stored in f32 and in bf16 (the computation in f32, the store rounded):
  f32 decays to b2^steps, bf16 stays put when (1 - b2) nu is under half
  a bf16 spacing; also optax's own b2 * nu in bf16 (b2 rounded)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  bf16, out = ml_dtypes.bfloat16, {}
  for b2 in (0.95, 0.999):
    nu32, nu16 = np.float32(1.0), bf16(1.0)
    for _ in range(steps):
      nu32 = np.float32(b2) * nu32
      nu16 = bf16(np.float32(b2) * np.float32(nu16))
    out[f"b2={b2}"] = dict(f32=float(nu32), bf16_store=float(nu16),
                           bf16_b2=float(bf16(b2)))
  return dict(steps=steps, g=0.0, nu0=1.0, **out)


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True, check=True
                          ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def plot(result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  stages = list(result["losses"]["f32"])
  fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.4))
  for ax, stage in zip(axes, stages):
    for name, style in zip(VARIANTS, ("-", "--", ":", "-")):
      ys = result["losses"][name][stage]
      kw = (dict(color="0.7", lw=0.8) if name == "f32_seed1"
            else dict(marker="."))
      ax.plot(range(1, len(ys) + 1), ys, style, label=name, **kw)
    ax.set_title(f"{stage} loss ({result['config']})")
    ax.set_xlabel("step")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sft-steps", type=int, default=24)
  p.add_argument("--rl-steps", type=int, default=24)
  p.add_argument("--out", default=os.path.join(REPO, "benchmarks",
                                               "half_state.json"))
  p.add_argument("--png", default=os.path.join(REPO, "benchmarks",
                                               "half_state.png"))
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  result = dict(config="configs/demo.py:tiny", commit=_commit(),
                command="python -m benchmarks.half_state --sft-steps "
                f"{args.sft_steps} --rl-steps {args.rl_steps}",
                sft_steps=args.sft_steps, rl_steps=args.rl_steps,
                losses={}, wall_s={})
  with tempfile.TemporaryDirectory() as root:
    for name in VARIANTS:
      r = run_variant(name, args.sft_steps, args.rl_steps, root)
      result["losses"][name], result["wall_s"][name] = r["losses"], r["wall_s"]
      print(f"[half_state] {name}: {r['wall_s']} s", file=sys.stderr)
  base = result["losses"]["f32"]
  result["max_abs_diff"] = {
      name: {stage: max((abs(a - b) for a, b in zip(ys, base[stage])),
                        default=None) for stage, ys in losses.items()}
      for name, losses in result["losses"].items() if name != "f32"}
  result["bytes"] = state_bytes()
  result["nu_check"] = nu_check()
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
    f.write("\n")
  plot(result, args.png)
  print(json.dumps({k: result[k] for k in ("max_abs_diff", "bytes",
                                           "nu_check", "wall_s")}, indent=1))


if __name__ == "__main__":
  main()
