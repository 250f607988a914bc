"""Words on stderr while a first step compiles; library noise kept off it."""

import logging
import os
import types

import jax.numpy as jnp

from purld_jax import quiet
from purld_jax.train import heldout
from purld_jax.train import loop as loop_lib


def _loop(total, start=0):
  return loop_lib.Loop(stage="sft", total_steps=total, start_step=start,
                       ckpt=None, writer=None, nan_policy="skip",
                       progress=True)


def test_the_progress_bar_says_the_first_step_compiles(capsys):
  loop = _loop(3)
  loop.compiling()
  assert "compiling the first step" in capsys.readouterr().err
  loop.record(1, {"loss": jnp.float32(2.0)})
  assert "first step took" in capsys.readouterr().err
  loop.record(2, {"loss": jnp.float32(1.0)})  # step 1 read: its loss shown
  loop.close()
  assert "loss=2" in capsys.readouterr().err.split("\r")[-1]


def test_no_compile_notice_for_a_finished_stage(capsys):
  loop = _loop(3, start=3)
  loop.compiling()
  loop.close()
  assert "compiling" not in capsys.readouterr().err


def test_the_first_eval_batch_says_it_compiles(capsys):
  config = types.SimpleNamespace(log=types.SimpleNamespace(progress=True))
  show = heldout._progress(config, "sft", 2, compiles=True)
  assert list(show(iter(["b0", "b1"]))) == ["b0", "b1"]
  assert "compiling the first batch" in capsys.readouterr().err
  show = heldout._progress(config, "final", 2, compiles=False)
  assert list(show(iter(["b0", "b1"]))) == ["b0", "b1"]
  assert "compiling" not in capsys.readouterr().err


def test_quiet_silences_the_advisory_and_backend_info(monkeypatch):
  logger = logging.getLogger(quiet.JAX_BACKEND_LOGGER)
  old = logger.level
  monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
  try:
    logger.setLevel(logging.NOTSET)
    quiet.libraries()
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"
    assert logger.level == logging.WARNING  # INFO off, warnings still shown
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "")
    quiet.libraries()  # a value the user set is kept
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == ""
  finally:
    logger.setLevel(old)
