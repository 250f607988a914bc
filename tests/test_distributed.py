"""distributed.initialize: a no-op on one process; the calls it makes."""

import jax
import pytest

from purld_jax import distributed


@pytest.fixture
def calls(monkeypatch):
  made = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kw: made.append(kw))
  return made


def test_single_process_is_a_no_op(calls):
  assert not distributed.initialize({})
  assert not distributed.initialize({"SLURM_NTASKS": "1", "HOME": "/root"})
  assert not distributed.initialize({"PURLD_DISTRIBUTED": "0"})
  assert calls == []


def test_env_variables_are_passed(calls):
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "2"}
  assert distributed.initialize(env)
  assert calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                        process_id=2)]


@pytest.mark.parametrize("env", [{"PURLD_DISTRIBUTED": "1"},
                                 {"SLURM_NTASKS": "16"}])
def test_pods_and_slurm_auto_detect(calls, env):
  assert distributed.initialize(env)
  assert calls == [{}]


def test_partial_env_is_named(calls):
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID "
                     "not"):
    distributed.initialize({"JAX_COORDINATOR_ADDRESS": "h:1"})
  assert calls == []
