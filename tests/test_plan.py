"""`main --dry_run` (purld_jax/plan.py): the plan of a run, nothing run."""

import os
import subprocess
import sys

import pytest

from purld_jax import plan
from tests import train_fixtures
from tests.train_fixtures import subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_describe_counts_the_updates_and_hides_the_key(tmp_path):
  # GRPO 4 steps x 2 inner iterations = 8 updates, warmup ceil(0.25 x 8) = 2;
  # SFT 4 steps, warmup 1. The key's variable is named, never read.
  c = train_fixtures.tiny_config(**{
      "recipe": "grpo", "loss.grpo.inner_iterations": 2,
      "teacher.backend": "openai", "teacher.api_key_env": "MY_KEY_VAR"})
  text = plan.describe(c, str(tmp_path / "w"))
  assert "stage 2  grpo: 4 steps x 2 prompts x K 2 candidates" in text
  assert "8 optimizer updates (warmup 2, then cosine)" in text
  assert "stage 1  SFT on anchors: 4 steps x 2 anchors" in text
  assert "4 optimizer updates (warmup 1, then cosine)" in text
  assert "key from $MY_KEY_VAR" in text
  assert "= train step peak" in text and "(new)" in text
  assert not (tmp_path / "w").exists()


def _dry(*args):
  return subprocess.run(
      [sys.executable, "-m", "purld_jax.main", "--dry_run", *args],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
      timeout=300)


def test_dry_run_of_a_paper_config(tmp_path):
  work = tmp_path / "w"
  ok = _dry("--config=configs/h100_qwen25_0p5b.py", f"--workdir={work}",
            "--config.data.train_path=data/demo/train.jsonl",
            "--config.data.eval_path=data/demo/eval.jsonl")
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "494.0 M params" in ok.stdout and "1 device(s)" in ok.stdout
  assert "ranking anchor_recon" in ok.stdout
  assert not work.exists()  # nothing written
  bad = _dry("--config=configs/h100_qwen25_0p5b.py", f"--workdir={work}",
             "--config.data.train_path=/nonexistent/train.jsonl")
  assert bad.returncode == 2
  assert "data.train_path='/nonexistent/train.jsonl': no such prompt file" in (
      bad.stderr)
  assert "Traceback" not in bad.stderr


def test_dry_run_of_the_gpu_vision_language_configs(tmp_path, monkeypatch):
  """The SmolVLM-500M and Qwen2.5-VL-3B host configs validate from their
  configs/arch folders, and the plan's estimate counts the vision tower
  (its size by hand in tests/tools/test_memory.py). In-process: what
  `main --dry_run` prints (test_dry_run_of_a_paper_config runs the CLI)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from purld_jax import main  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(REPO)
  for name, devices in (("vlm_h100_smolvlm500m", 1),
                        ("vlm_8xh100_qwen25vl3b", 8)):
    cfg = importlib.import_module(f"configs.{name}").get_config("")
    main.validate(cfg)
    work = tmp_path / name
    text = plan.describe(cfg, str(work))
    assert f"= {devices} device(s)" in text
    assert "M in the vision tower and connector" in text
    assert "ranking anchor_recon" in text and "= train step peak" in text
    assert not work.exists()


def test_the_demo_trains_lora_adapters_and_its_full_variant_every_weight(
    tmp_path, monkeypatch):
  """`make demo`'s config trains rank-16 adapters (a 4 GB machine: the
  README's measured peak); configs/demo.py:full fine-tunes every weight as
  the studies do. Both validate; the plan's step estimate is the smaller
  with LoRA (no reference copy, no Adam moments of the base)."""
  import re  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  from purld_jax import main  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(REPO)
  peaks = {}
  for arg in ("", "full"):
    cfg = demo.get_config(arg)
    main.validate(cfg)
    text = plan.describe(cfg, str(tmp_path / (arg or "lora")))
    assert ("LoRA r 16 on 7 targets" in text) == (arg == ""), text
    peaks[arg] = float(re.search(r"= train step peak\s+([\d.]+)",
                                 text).group(1))
  assert peaks[""] < 0.5 * peaks["full"], peaks
  with pytest.raises(ValueError, match="unknown variant 'x'.*full, tiny"):
    demo.get_config("x")
