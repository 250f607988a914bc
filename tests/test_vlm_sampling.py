"""A vision-language student (tiny random Idefics3) through the sampler
and the scorer: the vision tower and the prompt prefill run once per
prompt, not once per candidate; the sampler's log-probs are the scorer's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from purld_jax import data as data_lib
from purld_jax import prompts as prompts_lib
from purld_jax import sampling
from purld_jax import scoring
from purld_jax import vision
from purld_jax.models import idefics3
from purld_jax.models import llama
from purld_jax.train import student as student_lib
from tests import vlm_fixtures

K, T = 3, 6


@pytest.fixture(scope="module")
def student(tmp_path_factory):
  d = vlm_fixtures.make_vlm_dir(tmp_path_factory.mktemp("vlm"))
  return student_lib.make(path=str(d), dtype_name="float32",
                          param_dtype_name="float32", init_seed=0,
                          cache_dir="", workdir=str(d))


def _prompts():
  return [prompts_lib.Prompt(id="a", messages=(("user", "Which shape?"),),
                             images=(vlm_fixtures.png(0),)),
          prompts_lib.Prompt(id="b", messages=(("user", "Two: which?"),),
                             images=(vlm_fixtures.png(1, 30, 12),
                                     vlm_fixtures.png(2))),
          prompts_lib.Prompt(id="c", messages=(("user", "No image."),))]


@pytest.fixture(scope="module")
def batch(student):
  source = data_lib.encode(_prompts(), student.tokenizer, max_len=128,
                           processor=student.processor)
  return data_lib.collate(source, [0, 1, 2], buckets=(64, 128))


def _model(student):
  graphdef, _ = student.abstract()
  return graphdef, student.init_params()


def test_student_from_an_idefics3_dir_has_the_processor(student, batch):
  assert student.is_vlm and student.processor is not None
  assert student.tokenizer.content_parts
  # <end_of_utterance> ends a turn
  eou = student.tokenizer.hf.convert_tokens_to_ids("<end_of_utterance>")
  assert eou in student.tokenizer.stop_ids
  s = student.cfg.image_seq_len
  n = (batch.tokens == student.cfg.image_token_id).sum(-1)
  assert n.tolist() == [s, 2 * s, 0]
  assert batch.pixel_values.shape == (3, 2, 3, 28, 28)  # I: 2 slots
  assert batch.pixel_mask.shape == (3, 2, 28, 28)
  real = np.asarray(idefics3.real_images(jnp.asarray(batch.pixel_values)))
  assert real.tolist() == [[True, False], [True, True], [False, False]]
  idefics3.check_image_tokens(batch.tokens, batch.pixel_values, student.cfg)


def _sample(student, batch, pv=None, key=0):
  graphdef, params = _model(student)
  sp = sampling.SamplingParams(max_new_tokens=T, stop_ids=())
  return sampling.sample(
      graphdef, params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
      jax.random.key(key), prompt_index=jnp.asarray(batch.index),
      num_candidates=K, sampling=sp, pad_id=student.tokenizer.pad_id,
      pixel_values=jnp.asarray(batch.pixel_values if pv is None else pv),
      pixel_mask=jnp.asarray(batch.pixel_mask))


def test_vision_tower_and_prefill_run_once_per_prompt(student, batch,
                                                      monkeypatch):
  """Counted while `sample` and `response_logps` are traced: one vision
  call on the B * I tiles (not B * K * I), one decoder pass over the
  [B, P] prompts (not [B * K, P]); a K-fold pass fails both counts."""
  calls = {"vision": [], "extend": []}
  real_vision = idefics3.Idefics3.image_features
  real_extend = llama.Llama.extend

  def vision_spy(self, pv, pm=None):
    calls["vision"].append(pv.shape)
    return real_vision(self, pv, pm)

  def extend_spy(self, tokens, cache, **kw):
    rows = (kw["embeds"].shape[:2] if kw.get("embeds") is not None
            else tokens.shape)
    calls["extend"].append(tuple(rows))
    return real_extend(self, tokens, cache, **kw)

  monkeypatch.setattr(idefics3.Idefics3, "image_features", vision_spy)
  monkeypatch.setattr(llama.Llama, "extend", extend_spy)
  b, p = batch.tokens.shape
  i = batch.pixel_values.shape[1]
  # a fresh jit (the module-level one may hold a trace already)
  graphdef, params = _model(student)
  sp = sampling.SamplingParams(max_new_tokens=T, stop_ids=())
  body = jax.jit(sampling.sample.__wrapped__, static_argnames=(
      "graphdef", "num_candidates", "sampling", "pad_id"))
  cands = body(graphdef, params, jnp.asarray(batch.tokens),
               jnp.asarray(batch.mask), jax.random.key(0),
               prompt_index=jnp.asarray(batch.index), num_candidates=K,
               sampling=sp, pad_id=0,
               pixel_values=jnp.asarray(batch.pixel_values),
               pixel_mask=jnp.asarray(batch.pixel_mask))
  assert cands.tokens.shape == (b, K, T)
  assert calls["vision"] == [(b, i, 3, 28, 28)]
  assert calls["extend"] == [(b, p)]  # decode steps do not call extend
  calls["vision"].clear(), calls["extend"].clear()
  score = jax.jit(lambda prm, *a: scoring.response_logps(
      nnx.merge(graphdef, prm), *a[:4], pixel_values=a[4], pixel_mask=a[5]))
  score(params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
        cands.tokens, cands.mask, jnp.asarray(batch.pixel_values),
        jnp.asarray(batch.pixel_mask))
  assert calls["vision"] == [(b, i, 3, 28, 28)]
  assert calls["extend"] == [(b, p)]


def test_sampler_logps_equal_the_scorer_and_depend_on_the_image(student,
                                                                batch):
  graphdef, params = _model(student)
  model = nnx.merge(graphdef, params)
  cands = _sample(student, batch)
  assert bool(cands.mask.any())
  lp = scoring.jitted_response_logps(
      model, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
      cands.tokens, cands.mask, pixel_values=jnp.asarray(batch.pixel_values),
      pixel_mask=jnp.asarray(batch.pixel_mask))
  np.testing.assert_allclose(np.asarray(lp), np.asarray(cands.logps),
                             atol=2e-5, rtol=0)
  # the plain forward over [prompt | candidate] rows agrees too
  m = np.asarray(cands.mask[0, 0])
  row = np.concatenate([batch.tokens[0], np.asarray(cands.tokens[0, 0])[m]])
  tl = scoring.token_logps(
      model, jnp.asarray(row[None]),
      jnp.asarray(np.concatenate([batch.mask[0], m[m]]))[None],
      pixel_values=jnp.asarray(batch.pixel_values[:1]),
      pixel_mask=jnp.asarray(batch.pixel_mask[:1]),
      image_at=jnp.asarray(np.arange(len(row)) < batch.tokens.shape[1])[None])
  np.testing.assert_allclose(np.asarray(tl)[0, -m.sum():],
                             np.asarray(cands.logps[0, 0])[m], atol=2e-5)
  # another image, the same tokens: other log-probs for rows 0 and 1; row 2
  # (no image) is unchanged
  other = batch.pixel_values.copy()
  other[:2] = np.where(other[:2] != 0, -other[:2], 0)
  lp2 = np.asarray(scoring.jitted_response_logps(
      model, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
      cands.tokens, cands.mask, pixel_values=jnp.asarray(other),
      pixel_mask=jnp.asarray(batch.pixel_mask)))
  diff = np.abs(lp2 - np.asarray(lp)).max(axis=(1, 2))
  assert diff[0] > 1e-3 and diff[1] > 1e-3
  np.testing.assert_allclose(lp2[2], np.asarray(lp)[2], atol=1e-6)


def test_text_student_batches_have_no_pixels(char_tok):
  p = prompts_lib.Prompt.from_text("hi", id="x")
  source = data_lib.encode([p], char_tok, max_len=64)
  b = data_lib.collate(source, [0], buckets=(16,))
  assert b.pixel_values is None and b.pixel_mask is None
  with pytest.raises(ValueError, match="has images but"):
    data_lib.encode([dataclasses.replace(p, images=(vlm_fixtures.png(0),))],
                    char_tok, max_len=64)


from tests.train_fixtures import char_tok  # noqa: E402,F401  (fixture)


def test_sharded_sampler_and_scorer_equal_single_device(student):
  """On a (2, 2, 2) mesh of the 8 fake devices: the prompts' rows (B = 4)
  and their pixels split over data x fsdp, the vision tower and decoder
  params by the logical rules."""
  from purld_jax import sharded
  from purld_jax import sharding
  source = data_lib.encode(_prompts(), student.tokenizer, max_len=128,
                           processor=student.processor)
  b = data_lib.collate(source, [0, 1, 2, 0], buckets=(64, 128))
  graphdef, params = _model(student)
  sp = sampling.SamplingParams(max_new_tokens=T, stop_ids=())
  mesh = sharding.make_mesh((2, 2, 2))
  p_sh = sharding.param_shardings(student.cfg, mesh)
  sample = sharded.jit_sampler(graphdef, p_sh, mesh=mesh, num_candidates=K,
                               sampling=sp, pad_id=0)
  key = jax.random.key(3)
  got = sample(jax.device_put(params, p_sh), b.tokens, b.mask, key, b.index,
               b.pixel_values, b.pixel_mask)
  want = sampling.sample(
      graphdef, params, jnp.asarray(b.tokens), jnp.asarray(b.mask), key,
      prompt_index=jnp.asarray(b.index), num_candidates=K, sampling=sp,
      pad_id=0, pixel_values=jnp.asarray(b.pixel_values),
      pixel_mask=jnp.asarray(b.pixel_mask))
  np.testing.assert_array_equal(np.asarray(got.tokens),
                                np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logps), np.asarray(want.logps),
                             atol=2e-5)
  score = sharded.jit_fn(
      lambda p, pt, pm, r, rm, pv, pxm: scoring.response_logps(
          nnx.merge(graphdef, p), pt, pm, r, rm, pixel_values=pv,
          pixel_mask=pxm), p_sh, ("batch",) * 6, mesh=mesh)
  lp = score(jax.device_put(params, p_sh), b.tokens, b.mask,
             np.asarray(want.tokens), np.asarray(want.mask), b.pixel_values,
             b.pixel_mask)
  np.testing.assert_allclose(np.asarray(lp), np.asarray(want.logps),
                             atol=2e-5)


def test_stack_images_pads_tiles_and_slots():
  # Slots: 1, 2, 4, then multiples of 4 (17 SmolVLM tiles -> 20, not 32).
  assert [vision.image_slots(n) for n in (1, 2, 3, 4, 5, 8, 9, 17)] == [
      1, 2, 4, 4, 8, 8, 12, 20]
  # Prompt 0: 5 tiles of 2 x 3 (ones); prompt 1: no image; prompt 2: 1 tile.
  a = (np.ones((5, 3, 2, 3), np.float32), np.ones((5, 2, 3), bool))
  c = (np.full((1, 3, 4, 4), 2.0, np.float32), np.ones((1, 4, 4), bool))
  pv, pm = vision.stack_images([a, None, c], image_size=4)
  assert pv.shape == (3, 8, 3, 4, 4) and pm.shape == (3, 8, 4, 4)
  assert pm[0].sum() == 5 * 2 * 3 and pv[0].sum() == 5 * 3 * 2 * 3
  assert not pm[1].any() and not pv[1].any()
  assert pm[2, 0].all() and not pm[2, 1:].any() and pv[2].sum() == 2 * 48
  assert vision.stack_images([None, None], image_size=4) == (None, None)
  with pytest.raises(ValueError, match="larger than the vision tower"):
    vision.stack_images([a], image_size=2)
