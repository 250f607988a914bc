"""`main.validate` on vision-language settings: an Idefics3 directory
passes; LoRA, the GGUF export, a judge scheme on image prompts and image
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


@pytest.mark.parametrize("override,message", [
    ({"model.lora.rank": 4},
     "model.lora.rank=4: LoRA is not supported for a vision-language"),
    ({"export.gguf": True},
     "export.gguf=True: no GGUF export for a vision-language student"),
    ({"ranking.scheme": "judge"},
     "ranking.scheme='judge': not implemented for image prompts"),
    ({"ranking.scheme": "pairwise_judge"},
     "ranking.scheme='pairwise_judge': not implemented for image prompts"),
    ({"model.path": "tiny"},
     "data.train_path, data.eval_path: prompts with images, but "
     "model.path='tiny' is a text model"),
])
def test_vlm_settings_that_do_not_apply_are_refused(files, override,
                                                    message):
  err = _errors(_config(files, **override))
  assert message in err, err
