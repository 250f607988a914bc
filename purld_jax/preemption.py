"""A polite stop: SIGTERM saves a checkpoint at the next step, then exits.

Schedulers (SLURM, Kubernetes, spot VMs) send SIGTERM some seconds before
they kill a job. With `ckpt.save_on_sigterm` the run catches it, finishes the
step it is in, saves that step (whatever `ckpt.every_steps` says), waits for
the write and leaves with `Preempted` (exit status 143, the shell's code for
SIGTERM); the same command resumes there. Nothing is paid twice: anchors are
in the ledger already.

  with preemption.on_sigterm():       # main thread only
    run(...)                          # Loop.maybe_save: stop_agreed()

The grace period must cover the rest of one step plus one save; a step
longer than that is lost, as under kill -9 (then `ckpt.every_minutes` bounds
what a kill costs). Outside a training loop (held-out evaluation, export)
the flag is not read and the run goes on; a second SIGTERM stops the
process at once, as without the handler. With several processes the flag is OR-ed across them at
every step, so all hosts save the same step even when the signal reaches
them at different times.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import jax
import numpy as np

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for SIGTERM

_requested = threading.Event()


class Preempted(Exception):
  """The run stopped at a saved step because SIGTERM arrived."""

  def __init__(self, stage: str, step: int, directory: str | None):
    where = f" (checkpoint {directory}/{step})" if directory else ""
    super().__init__(
        f"[{stage}] SIGTERM: stopped after step {step}{where}; run the same "
        "command again to resume from it")
    self.stage, self.step, self.directory = stage, step, directory


def request() -> None:
  """Asks for a stop at the next step (what the SIGTERM handler does)."""
  _requested.set()


def requested() -> bool:
  """True once a stop was asked for in this process."""
  return _requested.is_set()


def clear() -> None:
  _requested.clear()


def stop_agreed() -> bool:
  """True when any process asked for a stop. A collective when there are
  several processes: every process must call it at the same step."""
  flag = requested()
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.int32(flag))
  return bool(np.any(flags))


@contextlib.contextmanager
def on_sigterm(enabled: bool = True):
  """SIGTERM sets the stop flag inside the block (the previous handler is
  restored after it); a no-op when not `enabled` or off the main thread."""
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield
    return
  def handler(signum, frame):
    del frame
    if requested():  # the second SIGTERM: stop at once
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
    request()

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    clear()
