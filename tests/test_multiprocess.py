"""A real multi-process run: the main job as 2 processes x 2 CPU devices
(jax.distributed over localhost, gloo collectives) on mesh data 2 x fsdp 2,
against the same job as 1 process x 4 devices.

Slow (two full tiny jobs, ~5 minutes on 2 cores):
  .venv/bin/python -m pytest -q -m slow tests/test_multiprocess.py
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/demo.py:tiny", "--config.mesh.data=2",
        "--config.mesh.fsdp=2", "--config.sft.batch_size=4",
        "--config.rl.batch_size=4"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, devices: int, env_extra: dict):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "XLA_FLAGS"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", **env_extra)
  return subprocess.Popen(
      [sys.executable, "-m", "purld_jax.main", f"--workdir={workdir}"] + ARGS,
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def _params(workdir, which="final"):
  from safetensors.numpy import load_file
  return load_file(os.path.join(workdir, which, "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  multi = tmp_path_factory.mktemp("two_processes")
  single = tmp_path_factory.mktemp("one_process")
  port = _free_port()
  procs = [_launch(multi, 2, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                              "JAX_NUM_PROCESSES": "2",
                              "JAX_PROCESS_ID": str(i)}) for i in (0, 1)]
  logs = [p.communicate(timeout=1500)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-3000:]}"
  one = _launch(single, 4, {})
  log1 = one.communicate(timeout=1500)[0]
  assert one.returncode == 0, log1[-3000:]
  return multi, single, logs


def test_two_processes_train_what_one_process_trains(runs):
  multi, single, _ = runs
  got, want = _params(multi), _params(single)
  assert sorted(got) == sorted(want)
  for name in want:
    assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5,
                    err_msg=name)
  ref = _params(multi, "reference")
  assert any(not np.array_equal(got[n], ref[n]) for n in ref)  # it trained


def test_only_process_zero_reports_and_writes_each_step_once(runs):
  multi, single, logs = runs
  assert "final vs sft" in logs[0] and "final vs sft" not in logs[1]
  assert "[export]" in logs[0] and "[export]" not in logs[1]

  def steps(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    return [(r["stage"], r["step"]) for r in rows]

  assert steps(multi) == steps(single)  # one record per step, not two
  with open(os.path.join(multi, "eval", "summary.json"),
            encoding="utf-8") as f:
    got = json.load(f)
  with open(os.path.join(single, "eval", "summary.json"),
            encoding="utf-8") as f:
    want = json.load(f)
  assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
