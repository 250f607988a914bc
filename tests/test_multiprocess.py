"""A real multi-process run: the main job as 2 processes x 2 CPU devices
(jax.distributed over localhost, gloo collectives) on mesh data 2 x fsdp 2,
against the same job as 1 process x 4 devices; and the same job stopped by
a SIGTERM to one process, then resumed.

Slow (two full tiny jobs, ~5 minutes on 2 cores):
  .venv/bin/python -m pytest -q -m slow tests/test_multiprocess.py
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

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


def _launch(workdir, devices: int, env_extra: dict, extra=()):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "XLA_FLAGS"))}
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", **env_extra)
  return subprocess.Popen(
      [sys.executable, "-m", "purld_jax.main", f"--workdir={workdir}"]
      + ARGS + list(extra),
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


def test_sigterm_to_one_process_stops_both_at_one_step(runs, tmp_path):
  """SIGTERM reaches process 1 only: both processes save the same SFT step
  (the flag is OR-ed across processes) and exit 143; relaunched, the job
  ends where one process ends."""
  _, single, _ = runs
  port = _free_port()
  slow = ["--config.debug.step_sleep_s=2", "--config.ckpt.every_steps=100"]

  def launch(extra):
    return [_launch(tmp_path, 2, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                  "JAX_NUM_PROCESSES": "2",
                                  "JAX_PROCESS_ID": str(i)}, extra)
            for i in (0, 1)]

  procs = launch(slow)
  metrics = os.path.join(tmp_path, "metrics.jsonl")
  deadline = time.time() + 900
  while not (os.path.exists(metrics) and '"sft"' in open(metrics).read()):
    assert all(p.poll() is None for p in procs) and time.time() < deadline
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  logs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [143, 143], logs[1][-3000:]
  stops = [re.findall(r"\[sft\] SIGTERM: stopped after step (\d+)", log)
           for log in logs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, logs
  step = int(stops[0][0])
  assert 1 <= step < 4  # demo.py:tiny trains 4 SFT steps
  assert os.listdir(os.path.join(tmp_path, "ckpt", "sft")) == [str(step)]

  # Relaunched with a save due at every step by time (process 0's clock
  # decides, broadcast to process 1): steps 3 and 4 are the two kept
  # (ckpt.keep = 2), where the step cadence alone keeps 2 and 4.
  port = _free_port()
  procs = launch(["--config.ckpt.every_minutes=1e-6",
                  "--config.ckpt.keep_finished=all"])
  logs = [p.communicate(timeout=1500)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-3000:]}"
    assert f"[sft] resumed from step {step}" in log
  assert sorted(os.listdir(os.path.join(tmp_path, "ckpt", "sft"))) == [
      "3", "4"]
  got, want = _params(tmp_path), _params(single)
  for name in want:
    assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5,
                    err_msg=name)
