"""The pod configs: valid, and their train step compiles ahead of time.

Fast: each pod config validates (both variants), and the tiny variant's DPO
step compiles on the 8 CPU devices of conftest.py under a (2, 2, 2) mesh,
with XLA's argument bytes equal to the estimate plus the batch. Slow: the
real architectures compile on as many fake devices as the slice has
(`python -m purld_jax.tools.aot`, a subprocess: the device count is fixed
when JAX starts).
"""

import importlib
import os
import subprocess
import sys

import jax
import pytest

from purld_jax import main
from purld_jax import sharding
from purld_jax.tools import aot
from purld_jax.tools import memory

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PODS = {"qwen25_1p5b_v5e16": 16, "llama31_8b_v5p64": 32,
        "h100_qwen25_0p5b": 1}


def _config(name, variant=""):
  return importlib.import_module(f"configs.{name}").get_config(variant)


@pytest.mark.parametrize("name", sorted(PODS))
@pytest.mark.parametrize("variant", ["", "tiny"])
def test_pod_configs_validate(name, variant, monkeypatch):
  monkeypatch.chdir(REPO)
  cfg = _config(name, variant)
  if not variant:  # the gsm8k files are built by the user (common.gsm8k)
    assert cfg.data.train_path == "runs/tasks/gsm8k/train.jsonl"
    cfg.data.train_path = "data/demo/train.jsonl"
    cfg.data.eval_path = "data/demo/eval.jsonl"
  main.validate(cfg)
  if not variant:
    mesh = cfg.mesh
    assert mesh.data * mesh.fsdp * mesh.tensor == PODS[name]
    assert cfg.rl.batch_size % (mesh.data * mesh.fsdp) == 0


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("half", [False, True])
def test_tiny_dpo_step_compiles_on_8_devices(half, monkeypatch):
  """half: opt.mu_dtype and rl.reference_dtype bfloat16, so XLA's argument
  bytes shrink by 2 bytes a parameter twice, as the estimate says."""
  monkeypatch.chdir(REPO)
  cfg = _config("qwen25_1p5b_v5e16", "tiny")
  cfg.rl.batch_size = 4  # 4 prompts over data x fsdp = 4
  cfg.data.max_prompt_len = 16
  if half:
    cfg.opt.mu_dtype = cfg.rl.reference_dtype = "bfloat16"
  mesh = sharding.make_mesh((2, 2, 2))
  compiled, _, s, arch = aot.compile_train_step(cfg, mesh)
  stats = compiled.memory_analysis()
  est = memory.estimate_from_config(cfg, arch, mesh)
  if half:
    assert est["optimizer"] == 3 * est["params"] // 2
    assert est["reference"] == est["params"] // 2
  # Per device: params, Adam mu and nu, reference params, plus one prompt's
  # batch: prompt 16 (i32 + bool), members 2 x 8 (i32 + bool), pair
  # (2 x i32 + bool), and scalars (counters, step, rng, nan_at_step).
  batch = 16 * 5 + 2 * 8 * 5 + 9
  args = est["params"] + est["optimizer"] + est["reference"]
  assert args + batch <= stats.argument_size_in_bytes <= args + batch + 64
  assert stats.temp_size_in_bytes > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PODS))
def test_pod_train_step_compiles_on_the_slice_size(name):
  proc = subprocess.run(
      [sys.executable, "-m", "purld_jax.tools.aot",
       f"--config=configs/{name}.py", f"--devices={PODS[name]}"],
      cwd=REPO, capture_output=True, text=True, timeout=3000, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "compiled the dpo train step" in proc.stdout
  assert "= train step peak" in proc.stdout
  print(proc.stdout)
