"""The judge schemes (judge, self_reward, pairwise_judge) on image prompts,
for both vision-language families (tiny random Idefics3 and Qwen2.5-VL):
each judge row holds the prompt's images where the prompt's text begins
in the template, and the scores equal a hand-built plain forward of the
whole row (transformers' processor for Idefics3; `Qwen2VL.__call__` with
`qwen2_vl.rope_index` positions for Qwen2.5-VL); the scores move with the
image; text prompts keep their text rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from purld_jax import prompts as prompts_lib
from purld_jax import ranking
from purld_jax import self_scoring
from purld_jax import templates
from purld_jax import vision
from purld_jax import vision_qwen
from purld_jax.models import qwen2_vl
from purld_jax.models import qwen2_vl_vision
from purld_jax.models import tiny_qwen_vl
from purld_jax.train import student as student_lib
from tests import vlm_fixtures

ANCHORS = ["red", "two"]
WORDS = dict(yes_word="Y", no_word="N")  # single tokens of the tiny vocabs
JUDGES = ("judge", "self_reward", "pairwise_judge")
HEAD = "Question:\n"  # every default judge template's text before {prompt}


@pytest.fixture(scope="module", params=["idefics3", "qwen2_5_vl"])
def scorer(request, tmp_path_factory):
  d = tmp_path_factory.mktemp(request.param)
  if request.param == "idefics3":
    path, work = str(vlm_fixtures.make_vlm_dir(d)), str(d)
  else:
    path = work = tiny_qwen_vl.ensure(d / "tiny")
  s = student_lib.make(path=path, dtype_name="float32",
                       param_dtype_name="float32", init_seed=0, cache_dir="",
                       workdir=work)
  graphdef, _ = s.abstract()
  return request.param, s, nnx.merge(graphdef, s.init_params())


def _prompts(seed=10):
  """Two image prompts: one image, then two images (a system turn too)."""
  return [
      prompts_lib.Prompt(id="0", messages=(("user", "Colour?"),),
                         images=(vlm_fixtures.png(seed, 16, 20),)),
      prompts_lib.Prompt(id="1", messages=(("system", "Be brief."),
                                           ("user", "Which?")),
                         images=(vlm_fixtures.png(seed + 1, 20, 20),
                                 vlm_fixtures.png(seed + 2, 24, 20)))]


def _cands(tok):
  return [[tok.encode(t) for t in ("red", "blue!")],
          [tok.encode(t) for t in ("one", "")]]


def _scores(s, model, prompts, scheme, images=True):
  tok = s.tokenizer
  pv, pm = vision.pixels_of(s.processor.image_processor, prompts)
  pi = vision.PromptImages(s.processor, prompts, pv, pm) if images else None
  return self_scoring.score_group(
      model, tok, [p.as_dicts() for p in prompts], ANCHORS[:len(prompts)],
      _cands(tok)[:len(prompts)], scheme=scheme, images=pi, rows_per_call=4,
      pad_multiple=8, **WORDS)


def _judge_logit(family, s, model, prompt, user):
  """log p(Y) - log p(N) after the single user turn `user` with the
  prompt's images in front of the prompt's text (after HEAD), rendered by
  the chat template and run as one plain forward."""
  assert user.startswith(HEAD)
  parts = ([{"type": "text", "text": HEAD}]
           + [{"type": "image"}] * len(prompt.images)
           + [{"type": "text", "text": user[len(HEAD):]}])
  text = s.tokenizer.render_chat([{"role": "user", "content": parts}])
  pil = vision.pil_images(prompt)
  if family == "idefics3":
    out = s.processor(text=[text], images=[pil], add_special_tokens=False,
                      return_tensors="np")
    logits = model(jnp.asarray(out["input_ids"], jnp.int32),
                   jnp.asarray(out["pixel_values"], jnp.float32),
                   jnp.asarray(out["pixel_attention_mask"]).astype(bool))
  else:
    cfg = model.cfg
    ids, pv, _ = vision_qwen.encode(s.processor, text, pil)
    row = np.asarray([list(ids)], np.int32)
    grid = [[1, 4, 4]] * len(pv)
    logits = model(jnp.asarray(row),
                   jnp.asarray(pv.reshape(-1, pv.shape[-1])),
                   qwen2_vl_vision.vision_inputs(grid, cfg.vision),
                   positions=jnp.asarray(qwen2_vl.rope_index(row, None, grid,
                                                             cfg)))
  lp = np.asarray(jax.nn.log_softmax(logits[0, -1].astype(jnp.float32)))
  word = lambda w: np.logaddexp.reduce(
      lp[list(templates.answer_token_ids(s.tokenizer, w))])
  return word(WORDS["yes_word"]) - word(WORDS["no_word"])


def _members(tok, b):
  return [tok.decode(templates.cut_at_stop(y, tok.stop_ids))
          for y in _cands(tok)[b]] + [ANCHORS[b]]


@pytest.mark.slow  # ~75 s; the image-change and row-layout tests stay fast
@pytest.mark.parametrize("scheme", ["judge", "self_reward"])
def test_judge_scores_equal_a_hand_built_forward(scheme, scorer):
  family, s, model = scorer
  tok = s.tokenizer
  prompts = _prompts()
  scores, s_a = _scores(s, model, prompts, scheme)
  assert scores.shape == (2, 2) and s_a.shape == (2,)
  template = (templates.JUDGE_TEMPLATE if scheme == "judge"
              else templates.SELF_REWARD_TEMPLATE)
  for b, p in enumerate(prompts):
    question = templates.prompt_text(p.as_dicts())
    for j, text in enumerate(_members(tok, b)):
      user = template.format(prompt=question, reference=ANCHORS[b],
                             response=text)
      want = _judge_logit(family, s, model, p, user)
      got = scores[b, j] if j < 2 else s_a[b]
      np.testing.assert_allclose(got, want, atol=2e-4, rtol=0,
                                 err_msg=f"{family} {scheme} b={b} member {j}")


@pytest.mark.slow  # ~35 s; as above
def test_pairwise_scores_equal_a_hand_built_forward(scorer):
  family, s, model = scorer
  tok = s.tokenizer
  prompts = _prompts()
  scores, s_a = _scores(s, model, prompts, "pairwise_judge")
  logits = np.zeros((2, 3, 3), np.float32)
  for b, p in enumerate(prompts):
    texts = _members(tok, b)
    question = templates.prompt_text(p.as_dicts())
    for i in range(3):
      for j in range(3):
        if i != j:
          logits[b, i, j] = _judge_logit(
              family, s, model, p, templates.PAIRWISE_TEMPLATE.format(
                  prompt=question, reference=ANCHORS[b],
                  response_a=texts[i], response_b=texts[j]))
  want = np.asarray(ranking.pairwise_judge(jnp.asarray(logits)))
  np.testing.assert_allclose(scores, want[:, :2], atol=2e-4, rtol=0)
  np.testing.assert_allclose(s_a, want[:, 2], atol=2e-4, rtol=0)


@pytest.mark.parametrize("scheme", JUDGES)
def test_scores_change_with_the_image(scheme, scorer):
  _, s, model = scorer
  a, a_anchor = _scores(s, model, _prompts(10), scheme)
  b, b_anchor = _scores(s, model, _prompts(50), scheme)
  assert np.abs(a - b).min() > 1e-6, (a, b)
  assert np.abs(a_anchor - b_anchor).min() > 1e-6, (a_anchor, b_anchor)


@pytest.mark.parametrize("scheme", JUDGES)
def test_a_text_prompt_beside_image_prompts_keeps_its_text_rows(scheme,
                                                                scorer):
  # A prompt without images in an image batch gets the text rows: its
  # scores equal the text path's (images=None), up to padding.
  _, s, model = scorer
  text = prompts_lib.Prompt(id="t", messages=(("user", "Colour?"),))
  mixed, mixed_a = _scores(s, model, [_prompts()[1], text], scheme)
  alone, alone_a = self_scoring.score_group(
      model, s.tokenizer, [text.as_dicts()], ANCHORS[1:], _cands(
          s.tokenizer)[1:], scheme=scheme, rows_per_call=4, pad_multiple=8,
      **WORDS)
  np.testing.assert_allclose(mixed[1:], alone, atol=2e-5, rtol=0)
  np.testing.assert_allclose(mixed_a[1:], alone_a, atol=2e-5, rtol=0)


def test_judge_rows_put_the_images_where_the_prompt_begins(scorer):
  _, s, _ = scorer
  tok = s.tokenizer
  prompts = _prompts()
  pv, pm = vision.pixels_of(s.processor.image_processor, prompts)
  images = vision.PromptImages(s.processor, prompts, pv, pm)
  msgs = [p.as_dicts() for p in prompts]
  batch = templates.judge_batch(
      tok, msgs, ANCHORS, _cands(tok),
      encode_chat=lambda b, m, at=0: images.encode_chat(tok, b, m, at))
  for r in range(4):
    row = batch.tokens[r][batch.attention_mask[r]].tolist()
    at = [i for i, t in enumerate(row) if t == images.image_token_id]
    assert len(at) == images.image_tokens(r // 2)
    # the template's head before the images, the prompt's text after them
    assert tok.decode(row[:at[0]]).endswith(HEAD)
    question = templates.prompt_text(msgs[r // 2])
    assert tok.decode(row[at[-1] + 1:]).startswith(question)
  # text prompts: the rows of the plain template, as before
  plain = templates.judge_batch(tok, msgs, ANCHORS, _cands(tok))
  want = [tok.encode_chat([{"role": "user", "content":
                            templates.JUDGE_TEMPLATE.format(
                                prompt=templates.prompt_text(m),
                                reference=a, response=tok.decode(y))}])
          for m, a, g in zip(msgs, ANCHORS, _cands(tok)) for y in g]
  for r, ids in enumerate(want):
    assert plain.tokens[r][plain.attention_mask[r]].tolist() == ids


def test_prompt_at_by_hand():
  assert templates.prompt_at("Q:\n{prompt}\n{response}", prompt="p",
                             response="r") == 3
  assert templates.prompt_at("{response} {{x}} {prompt}", prompt="p",
                             response="abc") == len("abc {x} ")
  assert templates.prompt_at("{response} only", response="r") == 0
  assert templates.prompt_at(templates.JUDGE_TEMPLATE, prompt="p",
                             reference="a", response="r") == len(HEAD)
