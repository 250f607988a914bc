"""A Qwen2.5-VL student (tiny random, models/tiny_qwen_vl.py) through the
batches, the sampler and the scorer: M-RoPE positions as transformers'
get_rope_index, the vision tower and the prompt prefill once per prompt,
greedy tokens equal to transformers' `generate`, log-probs equal to
transformers' forward (torch is the test-only oracle)."""

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
from purld_jax import vision_qwen
from purld_jax.models import llama
from purld_jax.models import qwen2_vl
from purld_jax.models import tiny_qwen_vl
from purld_jax.models import tokenizer as tokenizer_lib
from purld_jax.train import student as student_lib
from tests import vlm_fixtures

K, T = 2, 8
S = 4  # image tokens an image: 16 x 16 pixels, 4 x 4 patches, merged 2 x 2


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
  return tiny_qwen_vl.ensure(tmp_path_factory.mktemp("qwen") / "tiny")


@pytest.fixture(scope="module")
def student(qdir):
  return student_lib.make(path=qdir, dtype_name="float32",
                          param_dtype_name="float32", init_seed=0,
                          cache_dir="", workdir=qdir)


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


@pytest.fixture(scope="module")
def model(student):
  graphdef, _ = student.abstract()
  return nnx.merge(graphdef, student.init_params())


@pytest.fixture(scope="module")
def cands(model, student, batch):
  graphdef, params = nnx.split(model)
  sp = sampling.SamplingParams(temperature=0.0, max_new_tokens=T,
                               stop_ids=student.tokenizer.stop_ids)
  return sampling.sample(
      graphdef, params, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
      jax.random.key(0), prompt_index=jnp.asarray(batch.index),
      num_candidates=K, sampling=sp, pad_id=student.tokenizer.pad_id,
      pixel_values=jnp.asarray(batch.pixel_values),
      pixel_mask=jnp.asarray(batch.pixel_mask))


def test_student_from_a_qwen_dir_has_the_processor(student, batch):
  assert student.is_vlm and isinstance(student.cfg, qwen2_vl.Qwen2VLConfig)
  assert vision_qwen.is_qwen_processor(student.processor)
  im_end = student.tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
  assert im_end in student.tokenizer.stop_ids
  n = (batch.tokens == student.cfg.image_token_id).sum(-1)
  assert n.tolist() == [S, 2 * S, 0]
  assert batch.pixel_values.shape == (3, 2, 16, 96)  # I: 2 slots, Q, K
  assert batch.pixel_mask.tolist() == [[True, False], [True, True],
                                       [False, False]]
  _, shapes = student.abstract()
  params = student.init_params()
  assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(
      lambda x: x.shape, shapes)


def test_a_preprocessor_without_a_fixed_size_is_refused(qdir, tmp_path):
  import json
  import shutil
  d = tmp_path / "q"
  shutil.copytree(qdir, d)
  f = d / "preprocessor_config.json"
  cfg = json.loads(f.read_text())
  cfg["size"] = {"shortest_edge": 64, "longest_edge": 1024}
  f.write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="preprocessor_config.json: size="):
    student_lib.make(path=str(d), dtype_name="float32",
                     param_dtype_name="float32", init_seed=0, cache_dir="",
                     workdir=str(d))


def test_mrope_positions_equal_rope_index(model, student, batch):
  cfg = student.cfg
  n_img = int(batch.pixel_mask.sum())
  want = qwen2_vl.rope_index(batch.tokens, batch.mask,
                             [[1, 4, 4]] * n_img, cfg)
  got = vision.prompt_positions(model, jnp.asarray(batch.tokens),
                                jnp.asarray(batch.mask),
                                jnp.asarray(batch.pixel_values))
  np.testing.assert_array_equal(np.asarray(got), want)
  # two images in one run, an image first, left padding
  i, p = cfg.image_token_id, student.tokenizer.pad_id
  row = [p, p, i, i, i, i, 20, 21] + [i] * 8 + [22, 23]
  mask = np.asarray([[t != p or j > 1 for j, t in enumerate(row)]])
  want = qwen2_vl.rope_index(np.asarray([row]), mask, [[1, 4, 4]] * 3, cfg)
  got = vision_qwen.mrope_positions(jnp.asarray([row]) == i,
                                    jnp.asarray(mask), 2)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_vision_tower_and_prefill_run_once_per_prompt(model, student, batch,
                                                      monkeypatch):
  """Counted while `sample` and `response_logps` are traced: one vision
  call on the B * I images, one decoder pass over [B, P]."""
  calls = {"vision": [], "extend": []}
  real_vision = vision_qwen.image_features
  real_extend = llama.Llama.extend

  def vision_spy(model, pv):
    calls["vision"].append(pv.shape)
    return real_vision(model, pv)

  def extend_spy(self, tokens, cache, **kw):
    rows = (kw["embeds"].shape[:2] if kw.get("embeds") is not None
            else tokens.shape)
    calls["extend"].append(tuple(rows))
    return real_extend(self, tokens, cache, **kw)

  monkeypatch.setattr(vision_qwen, "image_features", vision_spy)
  monkeypatch.setattr(llama.Llama, "extend", extend_spy)
  b, p = batch.tokens.shape
  shape = batch.pixel_values.shape
  graphdef, params = nnx.split(model)
  sp = sampling.SamplingParams(max_new_tokens=3, stop_ids=())
  body = jax.jit(sampling.sample.__wrapped__, static_argnames=(
      "graphdef", "num_candidates", "sampling", "pad_id"))
  args = (jnp.asarray(batch.tokens), jnp.asarray(batch.mask))
  images = dict(pixel_values=jnp.asarray(batch.pixel_values),
                pixel_mask=jnp.asarray(batch.pixel_mask))
  c = body(graphdef, params, *args, jax.random.key(0),
           prompt_index=jnp.asarray(batch.index), num_candidates=K,
           sampling=sp, pad_id=0, **images)
  assert calls == {"vision": [shape], "extend": [(b, p)]}
  calls["vision"].clear(), calls["extend"].clear()
  jax.jit(lambda prm, *a: scoring.response_logps(
      nnx.merge(graphdef, prm), *a, **images))(params, *args, c.tokens,
                                                c.mask)
  assert calls == {"vision": [shape], "extend": [(b, p)]}


# ----------------------------------------------------------------------------
# transformers as the oracle


@pytest.fixture(scope="module")
def reference(qdir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
      qdir, dtype=torch.float32)
  return ref.eval()


def _torch_inputs(student, prompt):
  """transformers' kwargs of one prompt (no padding), from our encoding."""
  import torch
  ids, pv, _ = vision.encode_prompt(student.processor, student.tokenizer,
                                    prompt)
  ids = torch.tensor([ids], dtype=torch.long)
  kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == student.cfg.image_token_id).long())
  if pv is not None:
    kw["pixel_values"] = torch.from_numpy(pv.reshape(-1, pv.shape[-1]))
    kw["image_grid_thw"] = torch.tensor([[1, 4, 4]] * len(pv))
  return kw


def test_greedy_tokens_equal_transformers_generate(student, cands,
                                                   reference):
  import torch
  tok = student.tokenizer
  got = np.asarray(cands.tokens)
  for b, prompt in enumerate(_prompts()):
    kw = _torch_inputs(student, prompt)
    reference.model.rope_deltas = None
    with torch.no_grad():
      out = reference.generate(**kw, max_new_tokens=T, do_sample=False,
                               eos_token_id=list(tok.stop_ids),
                               pad_token_id=tok.pad_id)
    new = out[0, kw["input_ids"].shape[1]:].numpy()
    want = np.full(T, tok.pad_id)
    want[:len(new)] = new
    for k in range(K):
      np.testing.assert_array_equal(got[b, k], want, err_msg=f"prompt {b}")


def _torch_logps(reference, kw, response):
  """f32[n] transformers' log-probs of `response` after the prompt."""
  import torch
  ids = torch.cat([kw["input_ids"], torch.tensor([response])], 1)
  kw = dict(kw, input_ids=ids, attention_mask=torch.ones_like(ids),
            mm_token_type_ids=torch.cat(
                [kw["mm_token_type_ids"],
                 torch.zeros((1, len(response)), dtype=torch.long)], 1))
  reference.model.rope_deltas = None
  with torch.no_grad():
    logits = reference(**kw).logits.float()[0]
  lp = torch.log_softmax(logits, -1)
  n = len(response)
  return lp[-n - 1:-1].gather(-1, torch.tensor(response)[:, None])[:, 0
                                                                    ].numpy()


def test_scorer_logps_equal_transformers(model, student, batch, cands,
                                         reference):
  """Responses (other than greedy: each token shifted) scored by
  `response_logps` (prompt prefilled once) and by `token_logps` on
  [prompt | response] rows: transformers' log-probs; the sampler's
  log-probs of its greedy tokens too."""
  tok = student.tokenizer
  images = dict(pixel_values=jnp.asarray(batch.pixel_values),
                pixel_mask=jnp.asarray(batch.pixel_mask))
  resp = np.asarray(cands.tokens).copy()
  resp[:, 1] = np.where(np.asarray(cands.mask)[:, 1],
                        (resp[:, 1] + 7) % 100 + 10, tok.pad_id)
  mask = np.asarray(cands.mask)
  lp = np.asarray(scoring.response_logps(
      model, jnp.asarray(batch.tokens), jnp.asarray(batch.mask),
      jnp.asarray(resp), jnp.asarray(mask), **images))
  np.testing.assert_allclose(lp[:, 0], np.asarray(cands.logps)[:, 0],
                             atol=1e-5)
  rows, n_resp = [], []
  for b, prompt in enumerate(_prompts()):
    kw = _torch_inputs(student, prompt)
    for k in range(K):
      r = resp[b, k][mask[b, k]].tolist()
      np.testing.assert_allclose(lp[b, k, :len(r)],
                                 _torch_logps(reference, kw, r), atol=1e-4,
                                 err_msg=f"prompt {b} response {k}")
    rows.append(list(batch.ids[b]) + resp[b, 1][mask[b, 1]].tolist())
    n_resp.append(int(mask[b, 1].sum()))
  tokens, row_mask = tokenizer_lib.pad_left(rows, tok.pad_id, 64)
  cols = np.arange(64)[None]
  image_at = row_mask & (cols < 64 - np.asarray(n_resp)[:, None])
  full = np.asarray(scoring.token_logps(
      model, jnp.asarray(tokens), jnp.asarray(row_mask),
      image_at=jnp.asarray(image_at), **images))
  for b in range(len(rows)):
    n = n_resp[b]
    np.testing.assert_allclose(full[b, 64 - n:], lp[b, 1, :n], atol=1e-4)
