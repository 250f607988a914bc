"""SIGTERM: the flag, the handler's life, the Loop's save of a step that was
not due, and a second SIGTERM that stops at once."""

import os
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest

from purld_jax import checkpoint
from purld_jax import preemption
from purld_jax.train import loop as loop_lib
from tests.train_fixtures import REPO


@pytest.fixture(autouse=True)
def _no_stop_left():
  preemption.clear()
  yield
  preemption.clear()


def test_sigterm_sets_the_flag_inside_the_block_only():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.on_sigterm():
    assert not preemption.requested()
    os.kill(os.getpid(), signal.SIGTERM)  # handled before os.kill returns
    assert preemption.requested()
    assert preemption.stop_agreed()  # one process: its own flag
  assert signal.getsignal(signal.SIGTERM) is before
  assert not preemption.requested()


def test_disabled_leaves_the_handler_alone():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.on_sigterm(enabled=False):
    assert signal.getsignal(signal.SIGTERM) is before


def _loop(ckpt):
  return loop_lib.Loop(stage="rl", total_steps=10, start_step=0, ckpt=ckpt,
                       writer=None, nan_policy="stop", progress=False)


def test_loop_saves_a_step_that_was_not_due_then_stops(tmp_path):
  arrays = {"w": jnp.arange(3.0)}
  ckpt = checkpoint.Checkpointer(tmp_path, every_steps=100, keep=3)
  loop = _loop(ckpt)
  assert not loop.maybe_save(4, arrays)  # not due, no stop: nothing
  preemption.request()
  with pytest.raises(preemption.Preempted) as e:
    loop.maybe_save(5, arrays)
  assert e.value.step == 5 and e.value.stage == "rl"
  assert f"{tmp_path}/5" in str(e.value)
  assert "run the same command again" in str(e.value)
  # The write is complete when Preempted is raised, before close().
  assert checkpoint.complete_steps(tmp_path) == [5]
  ckpt.close()


def test_loop_without_checkpoints_still_stops():
  preemption.request()
  with pytest.raises(preemption.Preempted, match=r"after step 2; run"):
    _loop(None).maybe_save(2, {"w": jnp.zeros(2)})


def test_a_second_sigterm_stops_at_once():
  # The child asks for a stop, then gets a second SIGTERM in a busy wait
  # that never reads the flag: the default action ends it.
  code = textwrap.dedent("""
      import os, signal, sys, time
      from purld_jax import preemption
      with preemption.on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested()
        print("first handled", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
      print("not reached", flush=True)
  """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == -signal.SIGTERM, proc.stderr
  assert proc.stdout == "first handled\n"
