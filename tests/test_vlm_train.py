"""A vision-language student (tiny random Idefics3, image prompts) through
stage 1 (SFT on the dataset teacher's anchors) and stage 2 (DPO, GRPO,
LDL), end to end; a DPO step's direction on an image prompt; the final
directory loads in transformers with our logits."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from purld_jax import data as data_lib
from purld_jax import prompts as prompts_lib
from purld_jax import rollout
from purld_jax import scoring
from purld_jax.train import dpo
from purld_jax.train import pu_rl
from purld_jax.train import sft
from purld_jax.train import state as state_lib
from purld_jax.train import student as student_lib
from tests import train_fixtures
from tests import vlm_fixtures
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)

@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
  return str(vlm_fixtures.make_vlm_dir(tmp_path_factory.mktemp("vlm")))


@pytest.fixture(scope="module")
def train_path(tmp_path_factory):
  """A JSONL prompt file of four image prompts (PNG paths in `images`; one
  prompt with two images, one without any): what the trainers read."""
  return vlm_fixtures.write_prompt_file(
      tmp_path_factory.mktemp("prompts") / "train.jsonl",
      vlm_fixtures.colour_records())


def _prompts(train_path):
  return prompts_lib.read_jsonl(train_path)


def _config(vlm_dir, train_path, **kw):
  return train_fixtures.tiny_config(**{
      "model.path": vlm_dir, "data.train_path": train_path,
      "data.eval_path": "", "data.buckets": (64,), "data.max_prompt_len": 64,
      "sft.steps": 2, "rl.steps": 2, "log.tensorboard": False,
      "ckpt.async_save": False, "ranking.scheme": "similarity",
      "sampling.num_candidates": 3, "sampling.max_new_tokens": 6, **kw})


@pytest.fixture(scope="module")
def reference(vlm_dir, train_path, tmp_path_factory):
  """Stage 1 on the image prompts: (workdir, reference dir)."""
  work = tmp_path_factory.mktemp("sft")
  return str(work), sft.run(_config(vlm_dir, train_path, recipe="dpo"),
                            str(work))


def _metrics(workdir, stage):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["stage"] == stage]


def test_sft_trains_on_image_prompts(reference):
  work, ref = reference
  rows = _metrics(work, "sft")
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows)
  for f in ("config.json", "model.safetensors", "tokenizer.json",
            "preprocessor_config.json", sft.DONE):
    assert os.path.isfile(os.path.join(ref, f)), f
  with open(os.path.join(ref, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["model_type"] == "idefics3"


@pytest.mark.parametrize("recipe", ["dpo", "grpo", "ldl"])
def test_recipe_runs_on_image_prompts(recipe, vlm_dir, train_path, reference,
                                      tmp_path, jit_cache):  # noqa: F811
  c = _config(vlm_dir, train_path, recipe=recipe)
  out = pu_rl.run(c, str(tmp_path), reference_dir=reference[1])
  rows = _metrics(str(tmp_path), recipe)
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert np.isfinite(r["loss"]) and r["teacher_calls"] == 0.0
  assert os.path.isfile(os.path.join(out, "preprocessor_config.json"))


def test_a_judge_scheme_ranks_image_prompts(vlm_dir, train_path, reference,
                                            tmp_path, jit_cache):  # noqa: F811
  # the judge's rows hold the prompts' images (vision.PromptImages, built
  # by rollout.collect from the student's processor)
  c = _config(vlm_dir, train_path, recipe="dpo",
              **{"ranking.scheme": "judge", "ranking.yes_word": "Y",
                 "ranking.no_word": "N"})
  pu_rl.run(c, str(tmp_path), reference_dir=reference[1])
  rows = _metrics(str(tmp_path), "dpo")
  assert [r["step"] for r in rows] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows)


def test_a_dpo_step_raises_chosen_over_rejected_on_an_image_prompt(
    vlm_dir, train_path, reference):
  s = student_lib.make(path=reference[1], dtype_name="float32",
                       param_dtype_name="float32", init_seed=0, cache_dir="",
                       workdir=reference[0])
  graphdef, _ = s.abstract()
  params = s.init_params()
  source = data_lib.encode(_prompts(train_path)[:1], s.tokenizer, max_len=64,
                           processor=s.processor)
  batch = data_lib.collate(source, [0], buckets=(64,))
  ids = [sft.response_ids(s.tokenizer, batch.prompts[0].as_dicts(), a,
                          max_len=8) for a in ("red", "blue")]
  members, mask = rollout.pack_members(
      np.zeros((1, 0, 1), np.int32), np.zeros((1, 0, 1), bool), [ids[0]],
      pad_id=s.tokenizer.pad_id)
  members2, mask2 = rollout.pack_members(
      np.zeros((1, 0, 1), np.int32), np.zeros((1, 0, 1), bool), [ids[1]],
      pad_id=s.tokenizer.pad_id)
  t = max(members.shape[-1], members2.shape[-1])
  pad = lambda x: np.pad(x, ((0, 0), (0, 0), (0, t - x.shape[-1])))
  b = dict(prompt_tokens=batch.tokens, prompt_mask=batch.mask,
           members=np.concatenate([pad(members), pad(members2)], 1),
           member_mask=np.concatenate([pad(mask), pad(mask2)], 1),
           chosen=np.array([[0]], np.int32), rejected=np.array([[1]], np.int32),
           pair_mask=np.array([[True]]), pixel_values=batch.pixel_values,
           pixel_mask=batch.pixel_mask)
  b = jax.tree.map(jnp.asarray, b)

  def margin(p):
    lp = scoring.response_logps(
        nnx.merge(graphdef, p), b["prompt_tokens"], b["prompt_mask"],
        b["members"], b["member_mask"], pixel_values=b["pixel_values"],
        pixel_mask=b["pixel_mask"]).sum(-1)
    return float(lp[0, 0] - lp[0, 1])

  state = state_lib.TrainState.create(graphdef, params, optax.sgd(1e-2),
                                      rng=jax.random.PRNGKey(0))
  new, metrics = jax.jit(lambda st, ref, bt: dpo.train_step(
      st, ref, bt, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
      reduce="pairs", schedule=lambda _: 1e-2))(state, params, b)
  assert np.isfinite(float(metrics["loss"]))
  assert margin(new.params) > margin(params) + 1e-4
  # the gradient reaches the vision tower: the image is part of the prompt
  moved = jax.tree.map(lambda a, c: float(jnp.abs(a - c).max()),
                       new.params["vision"], params["vision"])
  assert max(jax.tree.leaves(moved)) > 0


def test_final_model_loads_in_transformers_with_our_logits(vlm_dir, train_path,
                                                           reference):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  ref = reference[1]
  s = student_lib.make(path=ref, dtype_name="float32",
                       param_dtype_name="float32", init_seed=0, cache_dir="",
                       workdir=reference[0])
  graphdef, _ = s.abstract()
  model = nnx.merge(graphdef, s.init_params())
  source = data_lib.encode(_prompts(train_path)[1:2], s.tokenizer, max_len=64,
                           processor=s.processor)
  batch = data_lib.collate(source, [0], buckets=(64,))
  ours = np.asarray(model(jnp.asarray(batch.tokens),
                          jnp.asarray(batch.pixel_values),
                          jnp.asarray(batch.pixel_mask),
                          attention_mask=jnp.asarray(batch.mask)))
  theirs_model = transformers.Idefics3ForConditionalGeneration.from_pretrained(
      ref, dtype=torch.float32).eval()
  mask = torch.from_numpy(batch.mask.astype(np.int64))
  with torch.no_grad():
    theirs = theirs_model(
        input_ids=torch.from_numpy(batch.tokens.astype(np.int64)),
        attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        pixel_values=torch.from_numpy(batch.pixel_values),
        pixel_attention_mask=torch.from_numpy(batch.pixel_mask)
    ).logits.float().numpy()
  m = batch.mask.astype(bool)
  np.testing.assert_allclose(ours[m], theirs[m], atol=1e-4, rtol=0)


def _eval_records():
  """Held-out image prompts with numeric answers (so they are scored)."""
  return [dict(id=f"eval-{i}", prompt=f"How many {i}?", answer=str(i),
               images=[vlm_fixtures.png(40 + i + j, 20, 16 + 4 * j)
                       for j in range(1 + i % 2)]) for i in range(3)]


@pytest.fixture(scope="module")
def eval_path(tmp_path_factory):
  return vlm_fixtures.write_prompt_file(
      tmp_path_factory.mktemp("eval") / "eval.jsonl", _eval_records())


def test_main_job_on_image_prompts(vlm_dir, train_path, eval_path, tmp_path,
                                   capsys, jit_cache):  # noqa: F811
  """`main.run` on a tiny VLM and JSONL prompt files whose records carry
  `images`: SFT, DPO ranked by anchor_recon (PU-RLD's default scheme: its
  rows keep the images), then the held-out table on image prompts, greedy
  and sampled."""
  from purld_jax import main
  c = _config(vlm_dir, train_path, recipe="dpo", **{
      "ranking.scheme": "anchor_recon",
      "data.eval_path": eval_path, "eval.num_prompts": 0,
      "eval.batch_size": 2, "eval.samples": 2, "eval.temperature": 1.0,
      "ckpt.every_steps": 1})
  main.run(c, str(tmp_path))
  err = capsys.readouterr().err
  assert "[sft] reference:" in err
  assert [r["step"] for r in _metrics(str(tmp_path), "sft")] == [1, 2]
  assert [r["step"] for r in _metrics(str(tmp_path), "dpo")] == [1, 2]
  for suffix in ("", ".sampled"):
    rows = json.loads((tmp_path / "eval" / f"summary{suffix}.json"
                       ).read_text())
    assert [r["model"] for r in rows] == ["before", "sft", "final"]
    assert all(r["prompts"] == 3 and r["scored"] == 3 for r in rows)
  with open(tmp_path / "reference" / "config.json", encoding="utf-8") as f:
    assert json.load(f)["model_type"] == "idefics3"


def test_heldout_answers_on_image_prompts_see_the_images(vlm_dir, reference,
                                                         eval_path):
  """`evaluate.model_answers` on image eval prompts (encoded with the
  student's processor): greedy answers are those of the prompts decoded
  one at a time, and they depend on the image (the same prompts with
  other images give other answers)."""
  from purld_jax import evaluate
  s = student_lib.make(path=reference[1], dtype_name="float32",
                       param_dtype_name="float32", init_seed=0, cache_dir="",
                       workdir=reference[0])
  graphdef, _ = s.abstract()
  params = s.init_params()
  prompts = prompts_lib.read_jsonl(eval_path)
  kw = dict(name="m", buckets=(64,), max_new_tokens=12)

  def answers(ps, batch_size):
    src = data_lib.encode(ps, s.tokenizer, max_len=64, processor=s.processor)
    return evaluate.greedy_answers(graphdef, params, s.tokenizer, src,
                                   batch_size=batch_size, **kw).texts

  together = answers(prompts, 3)
  assert together == tuple(answers([p], 1)[0] for p in prompts)
  other = [prompts_lib.Prompt(id=p.id, messages=p.messages, answer=p.answer,
                              images=tuple(vlm_fixtures.png(99 + len(i), 20,
                                                            16) for i in
                                           p.images)) for p in prompts]
  assert answers(other, 3) != together
  # sampled: two samples a prompt, same seed -> the same draws
  src = data_lib.encode(prompts, s.tokenizer, max_len=64,
                        processor=s.processor)
  sp = evaluate.sampled_params(s.tokenizer, 12, 1.0)
  a, b = (evaluate.model_answers(graphdef, params, s.tokenizer, src, name="m",
                                 batch_size=bs, sampling=sp, samples=2,
                                 buckets=(64,)) for bs in (3, 1))
  assert a.texts == b.texts and len(a.ids) == 3


@pytest.mark.slow
def test_vlm_exact_resume_after_kill_9(vlm_dir, train_path, tmp_path,
                                       jit_cache):  # noqa: F811
  """A VLM run (image prompts, anchor_recon) killed with SIGKILL after its
  step-2 checkpoint and resumed to step 4 ends bit-identical to an
  uninterrupted run, with no teacher request after the resume (the
  text-model test of test_train_pu_rl.py, on the tiny VLM)."""
  n = 2
  cfg = train_fixtures.tiny_config(**{
      "recipe": "dpo", "rl.steps": 2 * n, "sft.steps": 1,
      "ckpt.every_steps": n, "log.tensorboard": False,
      "ranking.yes_word": "Y", "ranking.no_word": "N",
      "model.path": vlm_dir, "data.train_path": train_path,
      "data.eval_path": "", "ranking.scheme": "anchor_recon"})
  full = str(tmp_path / "full")
  pu_rl.run(cfg, full)
  killed = str(tmp_path / "killed")
  cmd = train_fixtures.rl_command(
      cfg, killed, 2 * n, n, f"--config.model.path={vlm_dir}",
      "--config.ranking.scheme=anchor_recon")
  train_fixtures.resume_after_kill_matches(cfg, cmd, killed, full, n)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_dpo_on_a_2x2x2_mesh_equals_one_device(vlm_dir, train_path, reference,
                                              tmp_path, jit_cache):  # noqa: F811
  """Stage 2 on image prompts with the vision tower, connector and decoder
  split by the logical rules over (2, 2, 2): the same losses and final
  params as on one device (one step of 4 prompts: data x fsdp = 4)."""
  runs = {}
  for mesh in ((1, 1, 1), (2, 2, 2)):
    work = str(tmp_path / "x".join(map(str, mesh)))
    c = _config(vlm_dir, train_path, recipe="dpo", **{
        "rl.batch_size": 4, "rl.steps": 1, "mesh.data": mesh[0], "mesh.fsdp": mesh[1],
        "mesh.tensor": mesh[2]})
    out = pu_rl.run(c, work, reference_dir=reference[1])
    s = student_lib.from_config(c.model, work)
    runs[mesh] = ([r["loss"] for r in _metrics(work, "dpo")],
                  s.load_params(out))
  (want_loss, want), (got_loss, got) = runs[(1, 1, 1)], runs[(2, 2, 2)]
  assert len(got_loss) == 1
  np.testing.assert_allclose(got_loss, want_loss, atol=1e-5, rtol=0)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      np.asarray(g), np.asarray(w), atol=1e-5, rtol=0), got, want)
  # the step moved the vision tower: not a comparison of two untouched trees
  ref = student_lib.from_config(c.model, work).load_params(reference[1])
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a, np.float32)
                                                 - np.asarray(b, np.float32)
                                                 ).max()), got, ref)
  assert max(jax.tree.leaves(moved["vision"])) > 0


def test_vlm_stage2_resumes_after_a_stop_equal_to_an_uninterrupted_run(
    vlm_dir, train_path, reference, tmp_path, jit_cache):  # noqa: F811
  """Image prompts, DPO: stopped after step 1 of 2 as a SIGTERM stops it
  (the step saved although not due), resumed in-process from that
  checkpoint: the losses and final params of a run that never stopped
  (the kill -9 version in another process: the slow test above)."""
  from purld_jax import preemption  # pylint: disable=g-import-not-at-top
  from purld_jax.train import loop as loop_lib  # pylint: disable=g-import-not-at-top
  c = _config(vlm_dir, train_path, recipe="dpo",
              **{"ckpt.every_steps": 100})
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  want_dir = pu_rl.run(c, full, reference_dir=reference[1])
  record = loop_lib.Loop.record

  def record_then_stop(self, step, *args, **kwargs):
    out = record(self, step, *args, **kwargs)
    if self.stage == "dpo" and step == 1:
      preemption.request()
    return out

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop_lib.Loop, "record", record_then_stop)
    with pytest.raises(preemption.Preempted):
      pu_rl.run(c, part, reference_dir=reference[1])
  preemption.clear()
  assert [r["step"] for r in _metrics(part, "dpo")] == [1]
  steps = []

  def record_step(self, step, *args, **kwargs):
    steps.append((self.stage, step))
    return record(self, step, *args, **kwargs)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop_lib.Loop, "record", record_step)
    got_dir = pu_rl.run(c, part, reference_dir=reference[1])
  assert steps == [("dpo", 2)]  # resumed at step 2, step 1 not redone
  assert [r["loss"] for r in _metrics(part, "dpo")] == [
      r["loss"] for r in _metrics(full, "dpo")]
  s = student_lib.from_config(c.model, part)
  jax.tree.map(lambda g, w: np.testing.assert_array_equal(
      np.asarray(g), np.asarray(w)), s.load_params(got_dir),
               s.load_params(want_dir))
