"""`main.validate` on vision-language settings: an Idefics3 directory
passes (every ranking scheme included); LoRA, the GGUF export and image
prompts for a text student are refused, each with a short error naming
the field."""

import pytest

from purld_jax import config_check
from tests import train_fixtures
from tests import vlm_fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  vlm = str(vlm_fixtures.make_vlm_dir(tmp_path_factory.mktemp("vlm")))
  prompts = vlm_fixtures.write_prompt_file(
      tmp_path_factory.mktemp("p") / "train.jsonl",
      vlm_fixtures.colour_records())
  return vlm, prompts


def _config(files, **kw):
  vlm, prompts = files
  return train_fixtures.tiny_config(**{
      "model.path": vlm, "data.train_path": prompts, "data.eval_path": prompts,
      "recipe": "dpo", "ranking.scheme": "anchor_recon", **kw})


def _errors(c):
  try:
    config_check.validate(c)
  except config_check.ConfigError as e:
    return str(e)
  return ""


def test_a_vlm_run_validates(files):
  assert _errors(_config(files)) == ""
  assert _errors(_config(files, **{"ranking.scheme": "pmi"})) == ""
  assert _errors(_config(files, **{"recipe": "sft",
                                   "ranking.scheme": "judge"})) == ""
  for scheme in ("judge", "self_reward", "pairwise_judge"):
    assert _errors(_config(files, **{"ranking.scheme": scheme,
                                     "ranking.yes_word": "Y",
                                     "ranking.no_word": "N"})) == ""


@pytest.mark.parametrize("override,message", [
    ({"model.lora.rank": 4},
     "model.lora.rank=4: LoRA is not supported for a vision-language"),
    ({"export.gguf": True},
     "export.gguf=True: no GGUF export for a vision-language student"),
    ({"model.path": "tiny"},
     "data.train_path, data.eval_path: prompts with images, but "
     "model.path='tiny' is a text model"),
])
def test_vlm_settings_that_do_not_apply_are_refused(files, override,
                                                    message):
  err = _errors(_config(files, **override))
  assert message in err, err


def _shapes_config(arg):
  import sys
  if train_fixtures.REPO not in sys.path:
    sys.path.insert(0, train_fixtures.REPO)
  from configs import vlm_shapes
  return vlm_shapes.get_config(arg)


def test_vlm_shapes_needs_the_users_student_and_nothing_else(monkeypatch):
  monkeypatch.chdir(train_fixtures.REPO)
  err = _errors(_shapes_config(""))
  assert err.count("\n  ") == 1, err  # one problem: model.path
  assert "model.path='': not 'tiny', 'embedded' or a Hugging Face" in err


def test_vlm_shapes_tiny_runs_through_the_main_job(tmp_path, monkeypatch,
                                                   capsys):
  """configs/vlm_shapes.py:tiny through `main.run` (one device; the test
  process has 8): SFT, GRPO ranked by anchor_recon on the shapes pictures,
  the held-out table on 4 dev prompts."""
  import json
  from purld_jax import main
  monkeypatch.chdir(train_fixtures.REPO)
  monkeypatch.setenv("PURLD_JAX_CACHE", str(tmp_path / "cache"))
  c = _shapes_config("tiny")
  assert c.model.path.startswith(str(tmp_path / "cache"))
  c.mesh.data = 1
  c.log.tensorboard = False
  c.jit_cache_dir = train_fixtures.JIT_CACHE
  main.run(c, str(tmp_path / "w"))
  rows = json.loads((tmp_path / "w" / "eval" / "summary.json").read_text())
  assert [r["model"] for r in rows] == ["before", "sft", "final"]
  assert all(r["prompts"] == 4 and r["scored"] == 4 for r in rows)
  with open(tmp_path / "w" / "metrics.jsonl", encoding="utf-8") as f:
    stages = {json.loads(line)["stage"] for line in f}
  assert {"sft", "grpo"} <= stages
  assert "final" in capsys.readouterr().out
