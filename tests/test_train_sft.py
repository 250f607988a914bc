"""Stage 1 (SFT on anchors): batches by hand, exact resume after kill -9 and
after SIGTERM, teacher calls after resume, the NaN policy, the reference,
the plots."""

import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from purld_jax import checkpoint as checkpoint_lib
from purld_jax import data as data_lib
from purld_jax import ledger as ledger_lib
from purld_jax import metrics as metrics_lib
from purld_jax import plot
from purld_jax import prompts as prompts_lib
from purld_jax import teacher as teacher_lib
from purld_jax.train import sft
from purld_jax.train import state as state_lib
from purld_jax.train import student
from tests.train_fixtures import ONE_DEVICE
from tests.train_fixtures import REPO
from tests.train_fixtures import SMALL_TRAIN
from tests.train_fixtures import char_tok  # noqa: F401
from tests.train_fixtures import jit_cache  # noqa: F401
from tests.train_fixtures import subprocess_env
from tests.train_fixtures import tiny_config


# ----------------------------------------------------------------------------
# Batches


def test_response_ids_are_the_template_continuation(char_tok):  # noqa: F811
  msgs = [{"role": "user", "content": "2+3?"}]
  ids = sft.response_ids(char_tok, msgs, "5", max_len=16)
  end = char_tok.hf.convert_tokens_to_ids("<|im_end|>")
  assert ids == char_tok.encode("5") + [end]  # "5<|im_end|>", cut after it
  assert sft.response_ids(char_tok, msgs, "12345", max_len=3) == (
      char_tok.encode("123"))


def test_make_batch_masks_the_response_only(char_tok):  # noqa: F811
  prompts = [prompts_lib.Prompt.from_text("1+1?", id="a", answer="2"),
             prompts_lib.Prompt.from_text("10+10?", id="b", answer="20")]
  source = data_lib.encode(prompts, char_tok, max_len=100)
  batch = data_lib.collate(source, [0, 1], buckets=(64,))
  out = sft.make_batch(char_tok, batch, ["2", "20"], max_response_len=8,
                       buckets=(64,))
  assert out["tokens"].shape == (2, 64)
  # Row 0: prompt ids, then "2" and <|im_end|>: the last 2 tokens are targets.
  n0 = len(source.ids[0]) + 2
  np.testing.assert_array_equal(out["mask"][0], np.arange(64) >= 64 - n0)
  np.testing.assert_array_equal(out["loss_mask"][0], np.arange(64) >= 62)
  np.testing.assert_array_equal(out["loss_mask"][1], np.arange(64) >= 61)
  np.testing.assert_array_equal(out["tokens"][0, 64 - n0:62], source.ids[0])


# ----------------------------------------------------------------------------
# Runs


def _restore(workdir, step, steps=6):
  """The arrays of <workdir>/ckpt/sft/<step> of a tiny run of `steps`."""
  cfg = tiny_config()
  s = student.from_config(cfg.model, str(workdir))
  graphdef, shapes = s.abstract()
  tx, _ = state_lib.optimizer_from_config(
      cfg.opt, learning_rate=cfg.sft.learning_rate,
      warmup_frac=cfg.sft.warmup_frac, total_steps=steps)
  abstract = checkpoint_lib.abstract_like(state_lib.abstract_arrays(
      graphdef, shapes, tx, rng=jax.random.PRNGKey(cfg.seed)))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "ckpt", "sft"),
                                     every_steps=1, keep=10)
  try:
    return ckpt.restore(step, abstract).arrays
  finally:
    ckpt.close()


def _assert_bit_identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.atleast_1d(x).view(np.uint8),
                                  np.atleast_1d(y).view(np.uint8))


def _ledger_requests(workdir):
  ledger = ledger_lib.Ledger(workdir, create=False)
  try:
    return ledger.stats()
  finally:
    ledger.close()


N = 3  # kill after N steps, resume to 2N


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, jit_cache):  # noqa: F811
  """(config, workdir) of an uninterrupted 2N-step run, saved every N."""
  del jit_cache
  cfg = tiny_config(**{"sft.steps": 2 * N, "ckpt.every_steps": N})
  full = str(tmp_path_factory.mktemp("full"))
  sft.run(cfg, full)  # (and fills the compilation cache)
  return cfg, full


def _child(cfg, workdir, every_steps):
  """`python -m purld_jax.main` of the tiny SFT run, paused after step N."""
  cmd = [sys.executable, "-m", "purld_jax.main",
         "--config=configs/sft.py:tiny", f"--workdir={workdir}",
         f"--config.data.train_path={cfg.data.train_path}",
         f"--config.data.eval_path={cfg.data.eval_path}",
         f"--config.sft.steps={2 * N}",
         f"--config.ckpt.every_steps={every_steps}",
         f"--config.debug.pause_after_step={N}", ONE_DEVICE]
  return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _resume_and_compare(cfg, full, killed, before):
  sft.run(cfg, killed)  # resumes from step N
  _assert_bit_identical(_restore(killed, 2 * N), _restore(full, 2 * N))
  after = _ledger_requests(killed)
  assert after.requests == before.requests  # no teacher call after resume
  assert after.asked_after_stored == 0
  steps = [r["step"] for r in metrics_lib.read(killed)]
  assert steps == list(range(1, 2 * N + 1))  # each step once
  assert sft.is_done(killed, 2 * N)


def test_exact_resume_after_kill_9(tmp_path, full_run):
  cfg, full = full_run
  killed = str(tmp_path / "killed")
  proc = _child(cfg, killed, every_steps=N)
  # The child blocks once step N is saved (debug.pause_after_step): the
  # kill lands at a known point, whatever the machine's speed.
  step_dir = os.path.join(killed, "ckpt", "sft", str(N))
  deadline = time.time() + 240
  while not os.path.isdir(step_dir) and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint at step N in time"
    time.sleep(0.05)
  time.sleep(0.2)  # into the pause
  os.kill(proc.pid, signal.SIGKILL)
  out = proc.communicate()[0].decode(errors="replace")
  assert proc.returncode == -signal.SIGKILL, out
  assert not os.path.exists(os.path.join(killed, "ckpt", "sft", str(2 * N)))
  assert not os.path.exists(os.path.join(killed, "reference"))
  before = _ledger_requests(killed)
  assert before.anchors == SMALL_TRAIN  # prefetched: every train prompt
  _resume_and_compare(cfg, full, killed, before)


def test_sigterm_saves_a_step_that_was_not_due(tmp_path, full_run):
  """SIGTERM at step N of a run that saves every 100 steps: step N is saved
  anyway, the exit status is 143, and the resume is exact."""
  cfg, full = full_run
  killed = str(tmp_path / "term")
  proc = _child(cfg, killed, every_steps=100)
  lines = []
  reader = threading.Thread(
      target=lambda: lines.extend(iter(proc.stdout.readline, b"")),
      daemon=True)
  reader.start()
  deadline = time.time() + 240
  while not any(b"paused after step" in ln for ln in lines):
    assert proc.poll() is None and time.time() < deadline, b"".join(lines)
    time.sleep(0.05)
  sft_dir = os.path.join(killed, "ckpt", "sft")
  assert checkpoint_lib.complete_steps(sft_dir) == []  # step N was not due
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 143
  reader.join(timeout=10)
  out = b"".join(lines).decode(errors="replace")
  assert f"[sft] SIGTERM: stopped after step {N} (checkpoint " in out, out
  assert "run the same command again to resume" in out
  assert checkpoint_lib.complete_steps(sft_dir) == [N]
  assert not os.path.exists(os.path.join(killed, "reference"))
  _resume_and_compare(cfg, full, killed, _ledger_requests(killed))


def test_nan_skip_keeps_params_and_goes_on(tmp_path, jit_cache):  # noqa: F811
  del jit_cache
  # 2N steps, as above: the same compiled step (the hook is traced).
  cfg = tiny_config(**{"sft.steps": 2 * N, "ckpt.every_steps": 1,
                       "ckpt.keep": 10, "ckpt.keep_finished": "all",
                       "debug.nan_at_step": 2,
                       "opt.nan_policy": "skip"})
  sft.run(cfg, str(tmp_path))
  one, two = _restore(tmp_path, 1), _restore(tmp_path, 2)
  _assert_bit_identical(two["params"], one["params"])  # step 2 skipped
  _assert_bit_identical(two["opt_state"], one["opt_state"])
  assert int(two["step"]) == 2
  records = {r["step"]: r for r in metrics_lib.read(tmp_path)}
  assert records[2]["skipped"] == 1.0 and records[2]["loss"] == "nan"
  assert records[1]["skipped"] == records[3]["skipped"] == 0.0
  assert sft.is_done(str(tmp_path), 2 * N)


def test_nan_stop_names_step_and_quantity(tmp_path, jit_cache):  # noqa: F811
  del jit_cache
  cfg = tiny_config(**{"sft.steps": 2 * N, "ckpt.every_steps": 1,
                       "debug.nan_at_step": 2, "opt.nan_policy": "stop"})
  with pytest.raises(state_lib.NonFiniteError,
                     match=r"step 2: non-finite loss \(nan\)"):
    sft.run(cfg, str(tmp_path))
  assert not sft.is_done(str(tmp_path), 2 * N)
  # Nothing after the bad step was written as a finished run.
  assert max(r["step"] for r in metrics_lib.read(tmp_path)) == 2


def test_zero_steps_writes_the_initial_model(tmp_path):
  cfg = tiny_config(**{"sft.steps": 0})
  ref = sft.run(cfg, str(tmp_path))
  from purld_jax.models import hf
  s = student.from_config(cfg.model, str(tmp_path))
  loaded = hf.load_params(ref, hf.read_config(ref))
  _assert_bit_identical(loaded, s.init_params())
  assert sft.is_done(str(tmp_path), 0)
  assert not os.path.exists(tmp_path / "anchors.sqlite")  # no teacher needed


def test_teacher_config_never_holds_a_key():
  with pytest.raises(teacher_lib.ConfigError, match="api_key_env"):
    teacher_lib.TeacherConfig.from_mapping(
        dict(tiny_config().teacher.to_dict(), api_key="sk-secret"))


# ----------------------------------------------------------------------------
# Plots


def test_plot_series_keeps_the_last_record_of_a_step():
  records = [{"stage": "sft", "step": 1, "loss": 3.0, "lr": 0.0},
             {"stage": "sft", "step": 2, "loss": 2.0, "lr": 1.0},
             {"stage": "sft", "step": 2, "loss": 1.5, "lr": 1.0},
             {"stage": "sft", "step": 3, "loss": "nan", "lr": 0.5,
              "nonfinite_loss": 1.0}]
  s = plot.series(records)["sft"]
  assert s["loss"][0] == (1, 2, 3)
  assert s["loss"][1][:2] == (3.0, 1.5) and np.isnan(s["loss"][1][2])
  assert "nonfinite_loss" not in s  # one value only
  # EMA 0.5, debiased: 3; (0.25*3 + 0.5*1.5) / 0.75 = 2; NaN carries it.
  np.testing.assert_allclose(plot.ema([3.0, 1.5, float("nan")], 0.5),
                             [3.0, 2.0, 2.0])


def test_plot_writes_a_png(tmp_path):
  w = metrics_lib.Writer(tmp_path, stage="sft", tensorboard=False)
  for step in range(1, 6):
    w.write(step, {"loss": 1.0 / step, "lr": 0.1 * step})
  w.close()
  paths = plot.plot_workdir(str(tmp_path))
  assert paths == [str(tmp_path / "plots" / "sft.png")]
  with open(paths[0], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_row_buckets_pad_every_batch_of_a_bucket_to_one_length():
  assert sft.row_buckets((72,), 64) == (136,)
  assert sft.row_buckets([32, 64], 16) == (48, 80)
  assert sft.row_buckets((), 64) == ()
  assert sft.row_buckets(None, 64) == ()
