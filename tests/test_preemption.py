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
from tests import train_fixtures
from tests.train_fixtures import REPO
from tests.train_fixtures import jit_cache  # noqa: F401


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


def test_stop_before_raises_only_once_asked():
  preemption.stop_before("eval", "evaluating sft")  # no stop asked: nothing
  preemption.request()
  with pytest.raises(preemption.Preempted) as e:
    preemption.stop_before("eval", "evaluating sft (1 of 3 models done)",
                           "/w/eval")
  assert e.value.step is None and e.value.stage == "eval"
  assert str(e.value) == (
      "[eval] SIGTERM: stopped before evaluating sft (1 of 3 models done) "
      "(finished work in /w/eval); run the same command again to go on")
  with pytest.raises(preemption.Preempted, match=r"^\[export\] .* before x;"):
    preemption.stop_before("export", "x", collective=False)


def test_heldout_stops_between_models_and_resumes(
    tmp_path, monkeypatch, capsys, jit_cache):  # noqa: F811
  from purld_jax import evaluate
  from purld_jax.train import heldout
  c = train_fixtures.tiny_config(**{"eval.num_prompts": 3,
                                    "eval.batch_size": 4})
  decode = evaluate.model_answers
  decoded = []

  def decode_then_sigterm(*args, **kwargs):
    decoded.append(kwargs["name"])
    out = decode(*args, **kwargs)
    preemption.request()  # as if SIGTERM came while this model decoded
    return out

  monkeypatch.setattr(evaluate, "model_answers", decode_then_sigterm)
  models = {"before": "init", "sft": "init", "final": "init"}
  with pytest.raises(preemption.Preempted,
                     match=r"before evaluating sft \(1 of 3 models done\)"):
    heldout.run(c, str(tmp_path), models)
  assert decoded == ["before"]
  assert sorted(os.listdir(tmp_path / "eval")) == [
      "before.jsonl", "before.settings.json"]
  preemption.clear()
  monkeypatch.setattr(evaluate, "model_answers", decode)
  rows = heldout.run(c, str(tmp_path), models)
  assert [r["model"] for r in rows] == ["before", "sft", "final"]
  assert "[eval] before: already evaluated" in capsys.readouterr().err
  # The same weights, decoded before and after the stop: the same answers.
  first, again = (evaluate.read_answers(str(tmp_path / "eval" / f"{m}.jsonl"),
                                        m) for m in ("before", "final"))
  assert first.texts == again.texts


def test_main_stops_before_the_export_and_resumes_it(
    tmp_path, monkeypatch, jit_cache):  # noqa: F811
  from purld_jax import main
  from purld_jax.train import heldout
  c = train_fixtures.tiny_config(**{
      "recipe": "sft", "sft.steps": 1, "data.eval_path": "",
      "log.tensorboard": False, "ckpt.async_save": False,
      "export.dir": "export"})
  evaluate_heldout = heldout.run

  def evaluate_then_sigterm(*args, **kwargs):
    out = evaluate_heldout(*args, **kwargs)
    preemption.request()  # as if SIGTERM came during the evaluation
    return out

  monkeypatch.setattr(heldout, "run", evaluate_then_sigterm)
  with pytest.raises(preemption.Preempted, match=r"^\[export\] .* before the "
                     r"export \(training and evaluation are done\)"):
    main.run(c, str(tmp_path))
  assert not (tmp_path / "export").exists()
  preemption.clear()
  monkeypatch.setattr(heldout, "run", evaluate_heldout)
  main.run(c, str(tmp_path))
  assert (tmp_path / "export" / "model.safetensors").exists()


def test_remove_stale_tmp_only_takes_dead_writers_leftovers(tmp_path):
  import subprocess
  import sys
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  dead_pid = int(dead.stdout)
  stale = [tmp_path / f"export.tmp-{dead_pid}",
           tmp_path / "sub" / f"final.tmp-{dead_pid}"]
  for d in stale:
    (d / "inner").mkdir(parents=True)
    (d / "inner" / "w.bin").write_bytes(b"x" * 10)
  (tmp_path / f"x.json.tmp-{dead_pid}").write_text("{}")
  live = tmp_path / f"reference.tmp-{os.getpid()}"  # a writer still at work
  live.mkdir()
  other = [tmp_path / "rollouts" / ".tmp-00000003-5a5b",  # not pid-named
           tmp_path / "final", tmp_path / "a" / "b" / f"c.tmp-{dead_pid}"]
  for d in other:
    d.mkdir(parents=True)
  gone = preemption.remove_stale_tmp(str(tmp_path))
  assert gone == sorted(str(p) for p in stale + [
      tmp_path / f"x.json.tmp-{dead_pid}"])
  assert not any(p.exists() for p in stale)
  assert live.is_dir() and all(d.is_dir() for d in other)  # deeper: left
