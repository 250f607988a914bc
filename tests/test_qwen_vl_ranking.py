"""Ranking schemes on image prompts with a Qwen2.5-VL scorer (tiny random,
models/tiny_qwen_vl.py): pmi and anchor_recon rebuild each prompt's rows
with its images and equal a hand-built plain forward of the whole row
(`Qwen2VL.__call__` with `qwen2_vl.rope_index` positions, the model's
transformers-parity path); the scores move with the image."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from purld_jax import prompts as prompts_lib
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


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
  d = tiny_qwen_vl.ensure(tmp_path_factory.mktemp("qwen") / "tiny")
  s = student_lib.make(path=d, dtype_name="float32",
                       param_dtype_name="float32", init_seed=0, cache_dir="",
                       workdir=d)
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
  """Per-token log-probs of `target` after `messages` rendered with the
  prompt's images: one plain forward of the whole row."""
  cfg = model.cfg
  text = s.tokenizer.render_chat(
      vision.with_image_parts(messages, len(prompt.images)))
  ids, pv, _ = vision_qwen.encode(s.processor, text,
                                  vision.pil_images(prompt))
  row = np.asarray([list(ids) + list(target)], np.int32)
  grid = [[1, 4, 4]] * len(pv)
  logits = model(jnp.asarray(row), jnp.asarray(pv.reshape(-1, pv.shape[-1])),
                 qwen2_vl_vision.vision_inputs(grid, cfg.vision),
                 positions=jnp.asarray(qwen2_vl.rope_index(row, None, grid,
                                                           cfg)))
  lp = jax.nn.log_softmax(logits[0].astype(jnp.float32), -1)
  n, t = len(target), row.shape[1]
  return np.asarray([lp[t - n - 1 + j, target[j]] for j in range(n)])


@pytest.mark.slow  # ~60 s; the Idefics3 twin and the image-change test stay fast
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
        row = templates._with_last_user(  # pylint: disable=protected-access
            msgs, templates.RECON_TEMPLATE.format(prompt=last,
                                                  draft=tok.decode(y)))
        want = _row_logps(s, model, p, row, tok.encode(ANCHORS[b])).mean()
      elif not y:
        want = 0.0
      else:
        row = templates._with_last_user(  # pylint: disable=protected-access
            msgs, templates.PMI_TEMPLATE.format(prompt=last,
                                                reference=ANCHORS[b]))
        want = (_row_logps(s, model, p, row, y)
                - _row_logps(s, model, p, msgs, y)).mean()
      got = scores[b, j] if j < 2 else s_a[b]
      np.testing.assert_allclose(got, want, atol=2e-4, rtol=0,
                                 err_msg=f"{scheme} b={b} member {j}")


def test_scores_change_with_the_image(scorer):
  s, model = scorer
  (a, a_anchor), _ = _scores(s, model, _prompts(10), "anchor_recon")
  (b, b_anchor), _ = _scores(s, model, _prompts(50), "anchor_recon")
  assert np.abs(a - b).min() > 1e-5
  assert np.abs(a_anchor - b_anchor).min() > 1e-5
