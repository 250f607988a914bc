"""Shared helpers of the training-pipeline tests: the tiny config, a
persistent compilation cache (the tiny SFT step takes ~10 s to compile on
a busy 2-core CPU; later runs, in-process or in a subprocess, load it), and
the char tokenizer.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shared by test sessions (keys are hashes of the program and the flags).
JIT_CACHE = os.environ.get("PURLD_TEST_JIT_CACHE") or os.path.join(
    tempfile.gettempdir(), "purld_jax_test_jit_cache")


@pytest.fixture(scope="module")
def jit_cache():
  """Persistent compilation cache for this module's tests; its path."""
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", JIT_CACHE)
  compilation_cache.reset_cache()
  yield JIT_CACHE
  jax.config.update("jax_compilation_cache_dir", old)
  compilation_cache.reset_cache()


def subprocess_env() -> dict:
  """Environment of a `python -m purld_jax.main` child: CPU, the cache."""
  env = dict(os.environ)  # 8 fake devices too: the same XLA:CPU numerics
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=JIT_CACHE,
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  return env


SMALL_TRAIN = 16  # prompts of the tests' train set


def small_train_path() -> str:
  """The first SMALL_TRAIN prompts of data/demo/train.jsonl, as a file (the
  ledger commits each anchor with fsync: 256 of them take seconds)."""
  path = os.path.join(tempfile.gettempdir(), "purld_jax_tests",
                      f"train{SMALL_TRAIN}.jsonl")
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(os.path.join(REPO, "data/demo/train.jsonl"), encoding="utf-8") as f:
      lines = f.readlines()[:SMALL_TRAIN]
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(lines)
    os.replace(tmp, path)
  return path


# A child's command line on `tiny_config`'s one-device mesh.
ONE_DEVICE = "--config.mesh.data=1"


def rl_command(cfg, workdir: str, steps: int, every: int, *extra) -> list:
  """The `purld_jax.main` command of `cfg`'s tiny stage-2 run (`cfg`
  from `tiny_config`): 1 SFT step, `steps` RL steps, a save every
  `every`, a 1 s pause per step (time to kill it), one device."""
  return [sys.executable, "-m", "purld_jax.main",
          "--config=configs/sft.py:tiny", f"--workdir={workdir}",
          f"--config.recipe={cfg.recipe}",
          f"--config.data.train_path={cfg.data.train_path}",
          f"--config.data.eval_path={cfg.data.eval_path}",
          f"--config.rl.steps={steps}", "--config.sft.steps=1",
          f"--config.ckpt.every_steps={every}", "--config.log.tensorboard=False",
          "--config.ranking.yes_word=Y", "--config.ranking.no_word=N",
          *extra, "--config.debug.step_sleep_s=1.0", ONE_DEVICE]


def kill_at_checkpoint(cmd, step_dir: str) -> str:
  """Runs `cmd` (a training command) in the repository, SIGKILLs it once
  `step_dir` (a checkpoint's folder) exists, and returns its output."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 300
  while not os.path.isdir(step_dir) and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint at step N in time"
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  out = proc.communicate()[0].decode(errors="replace")
  assert proc.returncode == -signal.SIGKILL, out
  return out


def resume_after_kill_matches(cfg, cmd, killed: str, full: str, n: int):
  """Runs `cmd` (stage 2 of `cfg` to 2n steps, a checkpoint every n) in
  `killed`, SIGKILLs it at step n, resumes it in this process with
  `pu_rl.run`, and asserts: its 2n-step state is bit-identical to the
  uninterrupted run in `full`, and the resume asked the teacher nothing."""
  from purld_jax import ledger as ledger_lib
  from purld_jax.train import pu_rl
  from tests.test_train_sft import _assert_bit_identical
  ckpt = os.path.join(killed, "ckpt", cfg.recipe)
  kill_at_checkpoint(cmd, os.path.join(ckpt, str(n)))
  assert not os.path.exists(os.path.join(ckpt, str(2 * n)))
  ledger = ledger_lib.Ledger(killed, create=False)
  before = ledger.stats()
  ledger.close()
  pu_rl.run(cfg, killed)  # stage 1 is done; stage 2 resumes from step n
  _assert_bit_identical(restore_rl_arrays(cfg, killed, 2 * n),
                        restore_rl_arrays(cfg, full, 2 * n))
  ledger = ledger_lib.Ledger(killed, create=False)
  after = ledger.stats()
  ledger.close()
  assert after.requests == before.requests
  assert after.asked_after_stored == 0


def tiny_config(**overrides):
  """configs/sft.py:tiny on `small_train_path()` on a one-device mesh (the
  tests' process has 8 fake devices), with dotted overrides
  ({"sft.steps": 6, "mesh.data": 2}), unlocked."""
  import sys
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from configs import sft as sft_config
  c = sft_config.get_config("tiny")
  c.data.train_path = small_train_path()
  c.data.eval_path = os.path.join(REPO, "data/demo/eval.jsonl")
  c.mesh.data = 1
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return c


@pytest.fixture(scope="session")
def char_tok(tmp_path_factory):
  """The tiny model's character-level chat tokenizer."""
  from purld_jax.train import student
  return student.char_tokenizer(tmp_path_factory.mktemp("char_tok") / "tok")


def restore_rl_arrays(cfg, workdir, step):
  """The train-state arrays of <workdir>/ckpt/<recipe>/<step> of a PU-RL
  run of `cfg`, on one device (its optimizer built as the stage builds it:
  GRPO's inner iterations count as updates; with LoRA the adapters'
  state)."""
  import jax
  from purld_jax import checkpoint as checkpoint_lib
  from purld_jax.train import state as state_lib
  from purld_jax.train import student
  s = student.from_config(cfg.model, str(workdir))
  graphdef, shapes = s.abstract()
  if s.cfg.lora is not None:  # a LoRA checkpoint holds the adapters alone
    from purld_jax.models import lora
    shapes = lora.split(shapes)[0]
  inner = (cfg.loss.grpo.inner_iterations if cfg.recipe == "grpo" else 1)
  tx, _ = state_lib.optimizer_from_config(
      cfg.opt, learning_rate=cfg.opt.learning_rate,
      warmup_frac=cfg.opt.warmup_frac, total_steps=cfg.rl.steps,
      updates_per_step=inner)
  abstract = checkpoint_lib.abstract_like(state_lib.abstract_arrays(
      graphdef, shapes, tx, rng=jax.random.PRNGKey(cfg.seed)))
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "ckpt", cfg.recipe), every_steps=1, keep=10)
  try:
    return ckpt.restore(step, abstract).arrays
  finally:
    ckpt.close()
