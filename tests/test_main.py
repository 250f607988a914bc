"""The command line and the configs: errors name the culprit, before any
compute."""

import os
import re
import subprocess
import sys

import pytest
from absl import flags

from purld_jax import main
from tests.train_fixtures import REPO
from tests.train_fixtures import subprocess_env
from tests.train_fixtures import tiny_config


def _parse(*args):
  fv = flags.FlagValues()
  main.define_flags(fv)
  cwd = os.getcwd()
  os.chdir(REPO)  # config paths as users type them
  try:
    main.parse(["main", *args], fv)
  finally:
    os.chdir(cwd)
  return fv


def test_overrides_reach_the_config():
  fv = _parse("--config=configs/sft.py:tiny", "--workdir=/tmp/x",
              "--config.sft.steps=7", "--config.data.buckets=(32,64)")
  assert fv.config.sft.steps == 7
  assert tuple(fv.config.data.buckets) == (32, 64)
  assert fv.config.model.path == "tiny"


@pytest.mark.parametrize("args, message", [
    (["--config.sft.stepz=3"],
     "--config.sft.stepz=3: unknown config key 'sft.stepz' "
     "(did you mean 'steps'?)"),
    (["--config.sfx.steps=3"], "unknown config key 'sfx.steps'"),
    (["--config.sft.steps=abc"],
     "flag --config.sft.steps=abc: invalid literal for int()"),
    (["--config.sft=3"], "flag --config.sft=3: Failed to parse '3'"),
])
def test_bad_overrides_are_named(args, message):
  with pytest.raises(main.CommandLineError) as e:
    _parse("--config=configs/sft.py:tiny", "--workdir=/tmp/x", *args)
  assert message in str(e.value)


def test_missing_config_file_is_named():
  with pytest.raises(main.CommandLineError,
                     match=r"cannot load config file configs/nope\.py"):
    _parse("--config=configs/nope.py", "--workdir=/tmp/x")


def test_unknown_variant_is_named():
  with pytest.raises(main.CommandLineError, match="unknown variant 'big'"):
    _parse("--config=configs/sft.py:big", "--workdir=/tmp/x")


def test_required_flags():
  with pytest.raises(main.CommandLineError, match="--workdir is required"):
    _parse("--config=configs/sft.py:tiny")
  with pytest.raises(main.CommandLineError, match="--config is required"):
    _parse("--workdir=/tmp/x")


def test_validation_names_every_bad_field_before_compute(tmp_path):
  cfg = tiny_config(**{
      "data.train_path": str(tmp_path / "missing.jsonl"),
      "ranking.scheme": "vibes", "opt.nan_policy": "ignore",
      "model.path": str(tmp_path), "sft.batch_size": 0,
      "teacher.on_truncated": "shrug", "eval.models": "final,after",
      "rl.oversample": 0})
  workdir = tmp_path / "run"
  with pytest.raises(main.ConfigError) as e:
    main.run(cfg, str(workdir))
  text = str(e.value)
  for needle in ("data.train_path=", "no such prompt file",
                 "ranking.scheme='vibes'", "opt.nan_policy='ignore'",
                 "model.path=", "sft.batch_size=0: must be > 0",
                 "teacher.on_truncated='shrug'",
                 "eval.models='final,after': a comma list",
                 "rl.oversample=0: must be > 0"):
    assert needle in text, (needle, text)
  assert not workdir.exists()  # nothing was started


def test_ranking_template_is_checked_before_compute():
  # A misspelt placeholder would otherwise surface as a KeyError at the
  # first scoring step, after SFT and the teacher's anchors.
  cfg = tiny_config(**{"ranking.scheme": "judge",
                       "ranking.template": "{prompt} {reference} {respons}"})
  with pytest.raises(main.ConfigError) as e:
    main.validate(cfg)
  text = str(e.value)
  assert ("ranking.template: unknown placeholder {respons}; scheme 'judge' "
          "takes {prompt}, {reference}, {response}") in text
  assert "ranking.template: no {response}: scheme 'judge'" in text
  # The same text is right for the self-reward judge, wrong for anchor_recon.
  good = "Q: {prompt}\nA: {response}\nGood? Answer Yes or No. {{sic}}"
  main.validate(tiny_config(**{"ranking.scheme": "self_reward",
                               "ranking.template": good}))
  with pytest.raises(main.ConfigError, match=r"no \{draft\}"):
    main.validate(tiny_config(**{"ranking.scheme": "anchor_recon",
                                 "ranking.template": good}))
  with pytest.raises(main.ConfigError, match="not a format string"):
    main.validate(tiny_config(**{"ranking.template": "{prompt {response}"}))


def test_answer_words_are_checked_before_compute(tmp_path):
  # The tiny model's tokenizer is one token per character: "Y" is one
  # token, "Yes" three. The check reads the tokenizer only.
  cfg = tiny_config(**{"recipe": "dpo", "ranking.scheme": "judge",
                       "ranking.yes_word": "Y", "ranking.no_word": "No"})
  with pytest.raises(main.ConfigError) as e:
    main.check_answer_words(cfg)
  text = str(e.value)
  assert "ranking.no_word='No': 'No' is not a single token" in text
  assert "yes_word" not in text
  cfg = tiny_config(**{"recipe": "dpo", "ranking.scheme": "judge",
                       "ranking.yes_word": "Y", "ranking.no_word": "N"})
  main.check_answer_words(cfg)
  # Schemes that do not read the words, and stage 1 alone, are not checked.
  for over in ({"ranking.scheme": "pmi"}, {"recipe": "sft"}):
    main.check_answer_words(tiny_config(**{"recipe": "dpo",
                                           "ranking.no_word": "No", **over}))
  # main.run stops on it before anything is written.
  workdir = tmp_path / "run"
  with pytest.raises(main.ConfigError, match="ranking.yes_word='Yes'"):
    main.run(tiny_config(**{"recipe": "dpo", "ranking.yes_word": "Yes"}),
             str(workdir))
  assert not workdir.exists()


def test_mesh_and_remat_are_validated_naming_the_field():
  # data x fsdp = 2 x 2 = 4: 6 and 2 are not multiples, 8 is.
  cfg = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                       "sft.batch_size": 6, "rl.batch_size": 8,
                       "eval.batch_size": 2, "model.remat": "some"})
  with pytest.raises(main.ConfigError) as e:
    main.validate(cfg)
  text = str(e.value)
  assert ("sft.batch_size=6: must be a multiple of mesh.data x mesh.fsdp = "
          "2 x 2 = 4") in text
  assert "eval.batch_size=2: must be a multiple" in text
  assert "rl.batch_size" not in text
  assert "model.remat='some': not one of ['none', 'full', 'dots']" in text
  # An inferred (-1) size is not known here: only the explicit ones count.
  cfg = tiny_config(**{"mesh.data": -1, "mesh.fsdp": 2, "sft.batch_size": 6,
                       "rl.batch_size": 4, "eval.batch_size": 4})
  main.validate(cfg)
  cfg = tiny_config(**{"mesh.data": -1, "mesh.fsdp": -1, "mesh.tensor": 0})
  with pytest.raises(main.ConfigError) as e:
    main.validate(cfg)
  assert "mesh.tensor=0: must be > 0 or -1" in str(e.value)
  assert "mesh: at most one size may be -1" in str(e.value)


def test_half_state_fields_are_validated_naming_the_field():
  cfg = tiny_config(**{"opt.mu_dtype": "float16",
                       "rl.reference_dtype": "int8"})
  with pytest.raises(main.ConfigError) as e:
    main.validate(cfg)
  text = str(e.value)
  assert ("opt.mu_dtype='float16': not one of ['float32', 'bfloat16']"
          in text)
  assert ("rl.reference_dtype='int8': not one of ['float32', 'bfloat16']"
          in text)
  # b1 = 0.99 is 0.98828125 in bf16: mu settles at 0.01 / 0.01171875.
  with pytest.raises(main.ConfigError, match=re.escape(
      "opt.mu_dtype='bfloat16' with opt.b1=0.99: b1 rounds to bf16 in "
      "b1 * mu, so mu would settle at 0.853 x its f32 value")):
    main.validate(tiny_config(**{"opt.mu_dtype": "bfloat16", "opt.b1": 0.99}))
  # LoRA: the reference is the frozen base itself, not a copy to cast.
  with pytest.raises(main.ConfigError, match=re.escape(
      "rl.reference_dtype='bfloat16' with model.lora.rank=4: the LoRA "
      "reference is the frozen base itself")):
    main.validate(tiny_config(**{"rl.reference_dtype": "bfloat16",
                                 "model.lora.rank": 4}))
  main.validate(tiny_config(**{"opt.mu_dtype": "bfloat16", "opt.b1": 0.95,
                               "rl.reference_dtype": "bfloat16"}))
  main.validate(tiny_config(**{"opt.mu_dtype": "bfloat16",
                               "model.lora.rank": 4}))


def test_malformed_prompt_file_is_named_with_line(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
  with pytest.raises(main.ConfigError, match=re.escape(f"{path}:2: field "
                                                       "'prompt'")):
    main.validate(tiny_config(**{"data.train_path": str(path)}))


def test_recipe_without_trainer_is_refused_before_compute(monkeypatch):
  from purld_jax import config_check
  monkeypatch.setattr(config_check, "STAGE2_RUNNER",
                      "purld_jax.train.not_written")
  with pytest.raises(main.ConfigError,
                     match="purld_jax.train.not_written is not written yet"):
    main.validate(tiny_config(recipe="dpo"))


def _budget_errors(**overrides):
  try:
    main.validate(tiny_config(**overrides))
  except main.ConfigError as e:
    return str(e)
  return ""


def test_budgets_that_would_cut_each_other_are_refused():
  # Held-out answers shorter than the training candidates: refused, and
  # equal budgets are fine.
  text = _budget_errors(**{"recipe": "dpo", "sampling.max_new_tokens": 16,
                           "eval.max_new_tokens": 15})
  assert ("eval.max_new_tokens=15 < sampling.max_new_tokens=16: held-out "
          "answers would be cut") in text
  assert "raise eval.max_new_tokens" in text
  assert not _budget_errors(**{"recipe": "dpo", "sampling.max_new_tokens": 16,
                               "eval.max_new_tokens": 16})
  # A generating teacher's longest anchor must fit SFT's response budget
  # exactly (no slack: the tokenizers differ).
  text = _budget_errors(**{"teacher.backend": "openai",
                           "teacher.max_tokens": 9,
                           "sft.max_response_len": 8})
  assert ("sft.max_response_len=8 < teacher.max_tokens=9 "
          "(teacher.backend='openai')") in text
  assert "eval.max_new_tokens" not in text
  assert not _budget_errors(**{"teacher.backend": "openai",
                               "teacher.max_tokens": 8,
                               "sft.max_response_len": 8})
  # The dataset teacher writes nothing: its max_tokens bounds no anchor.
  assert not _budget_errors(**{"teacher.backend": "dataset",
                               "teacher.max_tokens": 512,
                               "sft.max_response_len": 8})
  # Both at once: both named.
  text = _budget_errors(**{"teacher.backend": "openai",
                           "teacher.max_tokens": 9, "sft.max_response_len": 8,
                           "sampling.max_new_tokens": 8,
                           "eval.max_new_tokens": 4})
  assert "sft.max_response_len=8 <" in text
  assert "eval.max_new_tokens=4 <" in text


def test_candidates_may_be_shorter_than_anchors():
  # sampling.max_new_tokens < sft.max_response_len (= teacher.max_tokens):
  # an RL recipe samples short candidates against long anchors; accepted.
  for recipe in ("dpo", "grpo", "ldl"):
    assert not _budget_errors(**{
        "recipe": recipe, "teacher.backend": "openai",
        "teacher.max_tokens": 64, "sft.max_response_len": 64,
        "sampling.max_new_tokens": 8, "eval.max_new_tokens": 64}), recipe


@pytest.mark.parametrize("name", [
    "sft", "demo", "arith", "purld_dpo", "purld_grpo", "purld_ldl",
    "purld_dpo_lora"])
@pytest.mark.parametrize("variant", ["", "tiny"])
def test_shipped_configs_validate(name, variant):
  import importlib
  module = importlib.import_module(f"configs.{name}")
  cfg = module.get_config(variant)
  cwd = os.getcwd()
  os.chdir(REPO)
  try:
    if cfg.model.path == "embedded":
      cfg.model.path = "tiny"  # validation of the rest needs no weights
    main.validate(cfg)
  finally:
    os.chdir(cwd)


def test_every_config_field_is_commented():
  with open(os.path.join(REPO, "configs/common.py"), encoding="utf-8") as f:
    lines = f.read().split("\ndef tiny(")[0].splitlines()  # tiny(): overrides
  fields = [l for l in lines if re.match(r"\s+c\.[\w.]+ = ", l)
            and "ConfigDict()" not in l and not re.search(r"= \w+\(\)$", l)]
  assert len(fields) > 80
  bare = [l for l in fields if "#" not in l]
  # A field may be documented by the comment lines right above it.
  bare = [l for l in bare if not lines[lines.index(l) - 1].strip().startswith("#")]
  assert not bare, bare


def test_cli_error_exits_2_without_traceback():
  proc = subprocess.run(
      [sys.executable, "-m", "purld_jax.main", "--config=configs/sft.py:tiny",
       "--workdir=/tmp/unused", "--config.sft.stepz=1"],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode == 2
  assert "unknown config key 'sft.stepz'" in proc.stderr
  assert "Traceback" not in proc.stderr
