"""Ranking schemes on image prompts (a vision-language scorer): pmi and
anchor_recon rebuild each prompt's rows with its images (the image tokens
in the prefix, the prompt's pixels), and equal a hand-built forward of the
whole row text through transformers' processor; the scores move with the
image (the judge schemes: tests/test_vlm_judge_ranking.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from purld_jax import prompts as prompts_lib
from purld_jax import self_scoring
from purld_jax import templates
from purld_jax import vision
from purld_jax.train import student as student_lib
from tests import vlm_fixtures


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
  d = vlm_fixtures.make_vlm_dir(tmp_path_factory.mktemp("vlm"))
  s = student_lib.make(path=str(d), dtype_name="float32",
                       param_dtype_name="float32", init_seed=0, cache_dir="",
                       workdir=str(tmp_path_factory.mktemp("w")))
  graphdef, _ = s.abstract()
  return s, nnx.merge(graphdef, s.init_params())


def _prompts(seed=10):
  """Two image prompts: one image, then two images (a system turn too)."""
  return [
      prompts_lib.Prompt(id="0", messages=(("user", "Colour?"),),
                         images=(vlm_fixtures.png(seed, 16, 20),)),
      prompts_lib.Prompt(id="1", messages=(("system", "Be brief."),
                                           ("user", "Which?")),
                         images=(vlm_fixtures.png(seed + 1, 20, 20),
                                 vlm_fixtures.png(seed + 2, 24, 20)))]


ANCHORS = ["red", "two"]


def _scores(s, model, prompts, scheme):
  tok = s.tokenizer
  pv, pm = vision.pixels_of(s.processor.image_processor, prompts)
  images = vision.PromptImages(s.processor, prompts, pv, pm)
  cands = [[tok.encode(t) for t in ("red", "blue!")],
           [tok.encode(t) for t in ("one", "")]]
  return self_scoring.score_group(
      model, tok, [p.as_dicts() for p in prompts], ANCHORS, cands,
      scheme=scheme, images=images, rows_per_call=4, pad_multiple=8), cands


def _row_logps(s, model, prompt, messages, target):
  """Sum-free per-token log-probs of `target` after `messages` rendered
  with the prompt's images, the whole row through transformers'
  processor and one plain forward."""
  tok = s.tokenizer
  text = tok.render_chat(vision.with_image_parts(messages, len(prompt.images)))
  out = s.processor(text=[text], images=[vision.pil_images(prompt)],
                    add_special_tokens=False, return_tensors="np")
  ids = list(np.asarray(out["input_ids"])[0]) + list(target)
  logits = model(jnp.asarray([ids], jnp.int32),
                 jnp.asarray(out["pixel_values"], jnp.float32),
                 jnp.asarray(out["pixel_attention_mask"]).astype(bool))
  lp = jax.nn.log_softmax(logits[0].astype(jnp.float32), -1)
  n = len(target)
  return np.asarray([lp[len(ids) - n - 1 + t, target[t]] for t in range(n)])


def _with_last_user(msgs, content):
  return templates._with_last_user(msgs, content)  # pylint: disable=protected-access


@pytest.mark.parametrize("scheme", ["anchor_recon", "pmi"])
def test_scores_equal_a_hand_built_forward(scheme, scorer):
  s, model = scorer
  tok = s.tokenizer
  prompts = _prompts()
  (scores, s_a), cands = _scores(s, model, prompts, scheme)
  assert scores.shape == (2, 2) and s_a.shape == (2,)
  for b, p in enumerate(prompts):
    msgs = p.as_dicts()
    last = msgs[-1]["content"]
    members = [templates.cut_at_stop(y, tok.stop_ids) for y in cands[b]]
    members.append(tok.encode(ANCHORS[b]))
    for j, y in enumerate(members):
      if scheme == "anchor_recon":
        row = _with_last_user(msgs, templates.RECON_TEMPLATE.format(
            prompt=last, draft=tok.decode(y)))
        want = _row_logps(s, model, p, row, tok.encode(ANCHORS[b])).mean()
      else:
        if not y:
          want = 0.0
        else:
          row = _with_last_user(msgs, templates.PMI_TEMPLATE.format(
              prompt=last, reference=ANCHORS[b]))
          want = (_row_logps(s, model, p, row, y)
                  - _row_logps(s, model, p, msgs, y)).mean()
      got = scores[b, j] if j < 2 else s_a[b]
      np.testing.assert_allclose(got, want, atol=2e-4, rtol=0,
                                 err_msg=f"{scheme} b={b} member {j}")


@pytest.mark.parametrize("scheme", ["anchor_recon", "pmi"])
def test_scores_change_with_the_image(scheme, scorer):
  s, model = scorer
  (a, a_anchor), _ = _scores(s, model, _prompts(10), scheme)
  (b, b_anchor), _ = _scores(s, model, _prompts(50), scheme)
  nonempty = np.array([[True, True], [True, False]])  # pmi: '' scores 0
  assert np.abs(a - b)[nonempty].min() > 1e-5
  if scheme == "anchor_recon":
    assert np.abs(a_anchor - b_anchor).min() > 1e-5


def test_prompt_images_expand_each_distinct_image_once(scorer):
  # The expansions of a batch's images are what the processor writes for
  # each image alone, and a second batch of the same images (the next step)
  # runs the processor on none of them.
  s, _ = scorer
  calls = []

  class Counting:
    image_token_id, image_token = (s.processor.image_token_id,
                                   s.processor.image_token)

    def __call__(self, **kw):
      calls.append(kw)
      return s.processor(**kw)

  proc, prompts = Counting(), _prompts(seed=40)
  pv, pm = vision.pixels_of(s.processor.image_processor, prompts)
  first = vision.PromptImages(proc, prompts, pv, pm)
  assert len(calls) == 3  # one call per image
  for p, got in zip(prompts, first.expansions):
    for img, ids in zip(vision.pil_images(p), got):
      out = s.processor(text=[s.processor.image_token], images=[[img]],
                        add_special_tokens=False, return_tensors="np")
      assert ids == [int(t) for t in np.asarray(out["input_ids"])[0]]
  again = vision.PromptImages(proc, prompts[::-1], pv[::-1], pm[::-1])
  assert len(calls) == 3 and again.expansions == first.expansions[::-1]
