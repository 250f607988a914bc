"""A Qwen2.5-VL student (tiny random, models/tiny_qwen_vl.py) with image
prompts through stage 1 (SFT on the dataset teacher's anchors) and stage 2
(DPO), end to end on CPU, as tests/test_vlm_train.py runs Idefics3; the
config check passes such a run and refuses LoRA; held-out greedy answers
on image prompts are batch-independent and see the images."""

import json
import os

import numpy as np
import pytest

from purld_jax.models import tiny_qwen_vl
from purld_jax.train import pu_rl
from purld_jax.train import sft
from tests import train_fixtures
from tests import vlm_fixtures

jit_cache = train_fixtures.jit_cache  # the fixture, for usefixtures below


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
  return tiny_qwen_vl.ensure(tmp_path_factory.mktemp("qwen") / "tiny")


@pytest.fixture(scope="module")
def train_path(tmp_path_factory):
  """Four prompts in a JSONL file, PNG paths in `images` (one prompt with
  two images, one without any)."""
  return vlm_fixtures.write_prompt_file(
      tmp_path_factory.mktemp("prompts") / "train.jsonl",
      vlm_fixtures.colour_records())


def _config(qdir, train_path, **kw):
  return train_fixtures.tiny_config(**{
      "model.path": qdir, "data.train_path": train_path,
      "data.eval_path": "", "data.buckets": (64,), "data.max_prompt_len": 64,
      "sft.steps": 2, "rl.steps": 2, "log.tensorboard": False,
      "ckpt.async_save": False, "ranking.scheme": "similarity",
      "sampling.num_candidates": 3, "sampling.max_new_tokens": 6, **kw})


def _metrics(workdir, stage):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["stage"] == stage]


@pytest.mark.usefixtures("jit_cache")
def test_sft_then_dpo_on_image_prompts(qdir, train_path, tmp_path):
  work = str(tmp_path / "sft")
  ref = sft.run(_config(qdir, train_path, recipe="dpo"), work)
  rows = _metrics(work, "sft")
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows)
  for f in ("config.json", "model.safetensors", "tokenizer.json",
            "preprocessor_config.json", sft.DONE):
    assert os.path.isfile(os.path.join(ref, f)), f
  with open(os.path.join(ref, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["model_type"] == "qwen2_5_vl"

  rl_work = str(tmp_path / "dpo")
  out = pu_rl.run(_config(qdir, train_path, recipe="dpo"), rl_work,
                  reference_dir=ref)
  rows = _metrics(rl_work, "dpo")
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert np.isfinite(r["loss"]) and r["teacher_calls"] == 0.0
  for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
    assert os.path.isfile(os.path.join(out, f)), f


def _errors(c):
  from purld_jax import config_check
  try:
    config_check.validate(c)
  except config_check.ConfigError as e:
    return str(e)
  return ""


def test_a_qwen_vl_run_validates_and_lora_is_refused(qdir, train_path):
  c = lambda **kw: _config(qdir, train_path, recipe="dpo",
                           **{"data.eval_path": train_path, **kw})
  assert _errors(c()) == ""
  assert _errors(c(**{"ranking.scheme": "pmi"})) == ""
  assert ("model.lora.rank=4: LoRA is not supported for a vision-language"
          in _errors(c(**{"model.lora.rank": 4})))


def test_heldout_answers_on_image_prompts_see_the_images(qdir, train_path):
  """`evaluate.greedy_answers` on image prompts: batched (left-padded,
  other rows' images beside) equal one at a time, and other images give
  other answers."""
  from purld_jax import data as data_lib
  from purld_jax import evaluate
  from purld_jax import prompts as prompts_lib
  from purld_jax.train import student as student_lib
  s = student_lib.make(path=qdir, dtype_name="float32",
                       param_dtype_name="float32", init_seed=0, cache_dir="",
                       workdir=qdir)
  graphdef, _ = s.abstract()
  params = s.init_params()
  prompts = prompts_lib.read_jsonl(train_path)

  def answers(ps, batch_size):
    src = data_lib.encode(ps, s.tokenizer, max_len=64, processor=s.processor)
    return evaluate.greedy_answers(graphdef, params, s.tokenizer, src,
                                   batch_size=batch_size, name="m",
                                   buckets=(64,), max_new_tokens=8).texts

  together = answers(prompts, 4)
  assert together == tuple(answers([p], 1)[0] for p in prompts)
  other = [prompts_lib.Prompt(id=p.id, messages=p.messages, answer=p.answer,
                              images=tuple(vlm_fixtures.png(99 + len(i), 20,
                                                            16) for i in
                                           p.images)) for p in prompts]
  assert answers(other, 4) != together
