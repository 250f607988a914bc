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
what a kill costs). After training, the held-out evaluation reads the flag
before each model and the export before it starts (`stop_before`): each
model's answers are written when it finishes, so a stop there loses at most
the model being decoded, and the resumed run skips what is on disk. A
second SIGTERM stops the process at once, as without the handler. With several processes the flag is OR-ed across them at
every step, so all hosts save the same step even when the signal reaches
them at different times.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading

import jax
import numpy as np

EXIT_CODE = 128 + signal.SIGTERM  # 143, what a shell reports for SIGTERM

_requested = threading.Event()


class Preempted(Exception):
  """The run stopped at a saved step (or, with `step` None, before a unit of
  work named by `before`) because SIGTERM arrived."""

  def __init__(self, stage: str, step: int | None, directory: str | None,
               before: str = ""):
    if step is None:
      where = f" (finished work in {directory})" if directory else ""
      what = f"before {before}{where}; run the same command again to go on"
    else:
      where = f" (checkpoint {directory}/{step})" if directory else ""
      what = (f"after step {step}{where}; run the same command again to "
              "resume from it")
    super().__init__(f"[{stage}] SIGTERM: stopped {what}")
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


def stop_before(stage: str, before: str, directory: str | None = None, *,
                collective: bool = True) -> None:
  """Raises `Preempted` (step None) when a stop was asked for: call it
  between units of work whose results are already on disk. `collective`:
  every process calls it at the same point (`stop_agreed`); False where only
  this process gets there (process 0's export)."""
  if stop_agreed() if collective else requested():
    raise Preempted(stage, None, directory, before=before)


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


_TMP = re.compile(r"\.tmp-(\d+)$")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's live process
    return True
  return True


def remove_stale_tmp(workdir: str, depth: int = 2) -> list[str]:
  """Removes the `<name>.tmp-<pid>` directories and files that a killed
  writer left (the export, the SFT reference, the final model are written
  under such a name and renamed when whole), up to `depth` levels under
  `workdir`, whose pid is no longer alive on this host; returns them."""
  gone = []
  for root, dirs, files in os.walk(workdir):
    if root[len(workdir):].count(os.sep) >= depth:
      dirs[:] = []
      continue
    for name in list(dirs) + files:
      m = _TMP.search(name)
      if not m or _alive(int(m.group(1))):
        continue
      path = os.path.join(root, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
        dirs.remove(name)
      else:
        os.remove(path)
      gone.append(path)
  return sorted(gone)
