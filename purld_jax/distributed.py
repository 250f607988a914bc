"""Multi-process start: `jax.distributed.initialize()` when the environment
says this process is one of several, nothing otherwise.

  from purld_jax import distributed
  distributed.initialize()   # first thing in main, before any JAX call

When it initializes (`mode`):
  "env"   JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
          and JAX_PROCESS_ID are set: passed as they are (plain multi-node
          GPU launches, one process per node).
  "auto"  PURLD_DISTRIBUTED=1 (a TPU pod slice launched with
          `gcloud ... --worker=all`), or SLURM with more than one task
          (SLURM_NTASKS > 1): JAX finds coordinator, process count and id
          itself (Cloud TPU metadata, SLURM variables).
  None    anything else, e.g. a laptop or one GPU machine: a no-op.
After it, `jax.devices()` lists every process's devices and
`jax.process_index()` says which process this is.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax

_ENV_KEYS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def mode(env: Mapping[str, str]) -> str | None:
  """"env", "auto" or None for these environment variables (see above).

  Raises:
    ValueError naming the missing variables when only some of _ENV_KEYS are
    set.
  """
  present = [k for k in _ENV_KEYS if env.get(k)]
  if present:
    missing = [k for k in _ENV_KEYS if k not in present]
    if missing:
      raise ValueError(f"{', '.join(present)} set but {', '.join(missing)} "
                       "not: a multi-process launch needs all three")
    return "env"
  if env.get("PURLD_DISTRIBUTED") == "1":
    return "auto"
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "auto"
  return None


def initialize(env: Mapping[str, str] | None = None) -> bool:
  """Calls jax.distributed.initialize() when `mode(env)` says so.

  Args:
    env: the environment (default os.environ).

  Returns:
    whether it initialized.
  """
  env = os.environ if env is None else env
  how = mode(env)
  if how is None:
    return False
  if how == "env":
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env["JAX_NUM_PROCESSES"]),
        process_id=int(env["JAX_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
  return True
