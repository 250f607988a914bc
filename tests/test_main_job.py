"""The main job end to end on the tiny model: SFT, PU-RL, held-out table."""

import json
import os
import subprocess
import sys

import numpy as np

from purld_jax import evaluate
from purld_jax import main
from tests import train_fixtures
from tests.train_fixtures import jit_cache  # noqa: F401


def test_main_job_prints_the_before_after_table_and_resumes(
    tmp_path, capsys, jit_cache):  # noqa: F811
  c = train_fixtures.tiny_config(**{
      "recipe": "dpo", "sft.steps": 1, "rl.steps": 2, "eval.num_prompts": 5,
      "eval.batch_size": 4, "log.tensorboard": False,
      "ranking.yes_word": "Y", "ranking.no_word": "N",
      "ckpt.async_save": False, "export.dir": "export"})
  main.run(c, str(tmp_path))
  out = capsys.readouterr()
  provenance = json.loads((tmp_path / "export" / "EXPORT.json").read_text())
  assert provenance["source"] == "final"
  assert (tmp_path / "export" / "model.safetensors").exists()
  # One PNG per stage with more than one step.
  assert sorted(os.listdir(tmp_path / "plots")) == ["dpo.png"]
  summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
  assert [r["model"] for r in summary] == ["before", "sft", "final"]
  assert all(r["prompts"] == 5 and r["scored"] == 5 for r in summary)
  # The table's numbers are the per-prompt files' numbers.
  for r in summary:
    a = evaluate.read_answers(str(tmp_path / "eval" / f"{r['model']}.jsonl"),
                              r["model"])
    assert r["accuracy"] == float(np.mean(a.correct))
    for text, ok, p in zip(a.texts, a.correct, a.ids):
      assert p.startswith("eval-")
      assert ok == evaluate.verify(text, _answer(p))
  assert "gain vs sft" in out.out and "final" in out.out
  assert ("beats sft" in out.out or "NOT significant" in out.out
          or "WORSE" in out.out)
  # A second run finds every stage done, every model evaluated and the
  # export current; it removes what a killed writer left.
  exported = (tmp_path / "export" / "model.safetensors").stat().st_mtime_ns
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout
  (tmp_path / f"export.tmp-{int(dead)}").mkdir()
  main.run(c, str(tmp_path))
  err = capsys.readouterr().err
  for name in ("before", "sft", "final"):
    assert f"[eval] {name}: already evaluated" in err
  assert "(up to date: not written again)" in err
  assert (tmp_path / "export" / "model.safetensors").stat().st_mtime_ns \
      == exported
  assert not (tmp_path / f"export.tmp-{int(dead)}").exists()
  # Extended by one step: the new final model is evaluated and exported
  # again (it was once reported "already evaluated" with the old answers).
  c.rl.steps = 3
  main.run(c, str(tmp_path))
  err = capsys.readouterr().err
  assert "[eval] final: already evaluated" not in err
  assert "[eval] sft: already evaluated" in err
  assert "up to date" not in err


def _answer(prompt_id):
  path = os.path.join(train_fixtures.REPO, "data/demo/eval.jsonl")
  with open(path, encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if rec["id"] == prompt_id:
        return rec["answer"]
  raise KeyError(prompt_id)


def test_main_and_export_flags_do_not_clash():
  """main imports purld_jax.export at the end of a run: importing it must
  define no flags (the demo once died there with DuplicateFlagError)."""
  import subprocess
  import sys
  code = ("from purld_jax import main; main.define_flags(); "
          "import purld_jax.export as e; from absl import flags; "
          "assert 'out' not in flags.FLAGS; print('ok')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=train_fixtures.REPO,
                        env=train_fixtures.subprocess_env(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "ok"
