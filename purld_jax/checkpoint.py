"""Checkpoints with orbax: train state, data iterator and config in one step.

  ckpt = checkpoint.Checkpointer(workdir / "ckpt" / "sft", every_steps=50,
                                 keep=3, async_save=True, every_minutes=30)
  restored = checkpoint.restore_latest(ckpt, abstract_arrays, data_iter)
  if restored is None: arrays = init(), else arrays = restored.arrays
  ...
  ckpt.save(step, state.arrays(), data_iter=it, config=config.to_dict())
  ckpt.close()                                   # waits for the last write

A step directory `<directory>/<step>/` holds three items:
  state   params, opt_state, step, rng (orbax StandardSave; arrays only)
  data    {"process_count": n, "iterator": the grain iterator's get_state()}
  config  the run's config as JSON
Orbax writes into a temporary directory and renames it when complete, so a
kill -9 leaves either a whole step or none; `keep` newest steps are kept.
A step is due every `every_steps` steps and, with `every_minutes`, also once
that long has passed since this process's last save (or its start): what a
kill -9 can cost is then bounded in time, whatever a step takes. Process 0's
clock decides for all processes.
With `async_save` the arrays are copied off the device before `save` returns
(so the caller may donate them to the next step) and written in the
background; the iterator state is snapshotted at the call, as a plain dict.

Nothing here reads pickles. API keys are never in a checkpoint: configs hold
only the NAME of the environment variable (`teacher.api_key_env`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `restore_latest` found.

  Attributes:
    step: the step restored.
    arrays: the state arrays, laid out like the abstract target.
    config: the config saved with them (a dict).
  """

  step: int
  arrays: Any
  config: dict


class Checkpointer:
  """An orbax CheckpointManager over one stage's directory."""

  def __init__(self, directory: str | os.PathLike, *, every_steps: int,
               keep: int, async_save: bool = True, every_minutes: float = 0.0,
               clock: Callable[[], float] = time.monotonic):
    if every_steps < 1:
      raise ValueError(f"every_steps {every_steps} < 1")
    if every_minutes < 0:
      raise ValueError(f"every_minutes {every_minutes} < 0")
    self.directory = os.path.abspath(os.fspath(directory))
    self.every_steps = every_steps
    self.every_minutes = every_minutes
    self._clock = clock
    self._t_saved = clock()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save),
        item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def due(self, step: int) -> bool:
    """True every `every_steps` steps, or (with `every_minutes`) when that
    long has passed since the last save. With `every_minutes` and several
    processes this is a collective: every process calls it at every step."""
    by_steps = step % self.every_steps == 0
    if not self.every_minutes:
      return by_steps
    late = self._clock() - self._t_saved >= 60.0 * self.every_minutes
    if jax.process_count() > 1:  # process 0's clock decides for all
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      late = bool(multihost_utils.broadcast_one_to_all(np.int32(late)))
    return by_steps or late

  def save(self, step: int, arrays: Any, *, data_iter=None,
           config: dict | None = None, force: bool = False) -> bool:
    """Saves `arrays` (+ iterator state and config) as step `step` when due
    (or `force`); False when not due or when that step is already saved."""
    if not (force or self.due(step)) or step in self._manager.all_steps():
      return False
    data = {"process_count": jax.process_count(),
            "iterator": None if data_iter is None else data_iter.get_state()}
    self._t_saved = self._clock()
    return self._manager.save(
        step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config or {})))

  def restore(self, step: int, abstract_arrays: Any, *, data_iter=None
              ) -> Restored:
    """Restores step `step` into `abstract_arrays` (a tree of
    jax.ShapeDtypeStruct with shardings) and, given `data_iter`, sets its
    state."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_arrays),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    data = out.data
    if data_iter is not None:
      if data.get("process_count") != jax.process_count():
        raise CheckpointError(
            f"{self.directory}/{step}: saved by {data.get('process_count')} "
            f"processes, restoring on {jax.process_count()}; the data shards "
            "would differ")
      if data.get("iterator") is None:
        raise CheckpointError(f"{self.directory}/{step}: no iterator state")
      data_iter.set_state(data["iterator"])
    return Restored(step=step, arrays=out.state, config=dict(out.config or {}))

  def keep_only(self, step: int) -> list[int]:
    """Deletes every saved step but `step` (a finished stage: its last step
    is all that a resume or an extension needs); returns those deleted."""
    self.wait()
    gone = [s for s in self._manager.all_steps() if s != step]
    for s in gone:
      self._manager.delete(s)
    return gone

  def wait(self) -> None:
    """Blocks until every save has been written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any, sharding=None) -> Any:
  """jax.ShapeDtypeStruct of each leaf of `tree` (arrays or shape structs),
  with `sharding` (one sharding for all leaves, or a matching tree); default
  replicated on the first local device."""
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, sharding)


def restore_latest(ckpt: Checkpointer, abstract_arrays: Any, *,
                   data_iter=None, config: dict | None = None
                   ) -> Restored | None:
  """Restores the newest step of `ckpt`, or returns None when it has none.

  Differences between the saved config and `config` are logged (a resumed
  run may change e.g. its length; it is the caller's business to refuse
  changes that break it).
  """
  step = ckpt.latest_step()
  if step is None:
    return None
  restored = ckpt.restore(step, abstract_arrays, data_iter=data_iter)
  if config is not None:
    for line in config_diff(restored.config, config):
      logging.warning("resuming %s/%d with a changed config: %s",
                      ckpt.directory, step, line)
  return restored


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def config_diff(saved: dict, current: dict) -> list[str]:
  """'key: saved -> current' for each leaf that differs (dotted keys)."""
  a, b = _flat(saved), _flat(current)
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def restore_or_init(ckpt: Checkpointer, abstract_arrays: Any, init_fn, *,
                    data_iter=None, config: dict | None = None):
  """(arrays, step) from the newest checkpoint, else (init_fn(), 0).

  Resume is automatic: a directory holding a complete step is continued
  from it (its data iterator state set on `data_iter`); `init_fn` (e.g.
  reading pretrained weights) runs only when there is none.
  """
  restored = restore_latest(ckpt, abstract_arrays, data_iter=data_iter,
                            config=config)
  if restored is None:
    return init_fn(), 0
  logging.info("resumed %s at step %d", ckpt.directory, restored.step)
  return restored.arrays, restored.step


# ----------------------------------------------------------------------------
# Reading a run's checkpoints from outside it (export): nothing is created
# or cleaned up, so a run writing into the directory is not disturbed.


def complete_steps(directory: str | os.PathLike) -> list[int]:
  """Steps of `directory` whose checkpoint is complete, ascending.

  Orbax writes `<step>.orbax-checkpoint-tmp...` and renames it to `<step>`
  when every item is written, so an integer-named directory is whole.
  """
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def restore_params(step_dir: str | os.PathLike, abstract_params: Any) -> Any:
  """The `params` of a step's `state` item alone (no optimizer state read).

  Args:
    step_dir: `<directory>/<step>`.
    abstract_params: tree of jax.ShapeDtypeStruct with shardings (see
      `abstract_like`) of the params.
  """
  target = {"params": abstract_params}
  out = ocp.PyTreeCheckpointer().restore(
      os.path.join(os.fspath(step_dir), "state"),
      args=ocp.args.PyTreeRestore(
          item=target, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  return out["params"]


def saved_config(step_dir: str | os.PathLike) -> dict:
  """The run config saved with a step (a dict)."""
  return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      os.path.join(os.fspath(step_dir), "config")) or {})
