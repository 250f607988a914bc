"""purld_jax/scoring.py against a direct log_softmax of the full logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from purld_jax import scoring
from purld_jax.models import tokenizer as tok_lib
from tests import core_fixtures


@pytest.fixture(scope="module")
def model():
  return core_fixtures.random_tiny_model(seed=1)


def _batch(lengths=(9, 6, 2), seed=0):
  rng = np.random.default_rng(seed)
  rows = [list(rng.integers(1, 128, n)) for n in lengths]
  tokens, mask = tok_lib.pad_left(rows, pad_id=0)
  return jnp.asarray(tokens), jnp.asarray(mask)


@jax.jit
def _direct(model, tokens, mask):
  """log_softmax of the whole [B, T, V] logits, gathered, masked."""
  lp = jax.nn.log_softmax(model(tokens, attention_mask=mask), axis=-1)
  picked = jnp.take_along_axis(lp[:, :-1], tokens[:, 1:, None], axis=-1)
  ok = mask[:, 1:] & mask[:, :-1]
  return jnp.pad(jnp.where(ok, picked[..., 0], 0.0), ((0, 0), (1, 0)))


@pytest.mark.parametrize("vocab_chunk", [None, 1, 3, 8, 100])
def test_token_logps_equals_direct_log_softmax(model, vocab_chunk):
  tokens, mask = _batch()
  got = scoring.jitted_token_logps(model, tokens, mask,
                                   vocab_chunk=vocab_chunk)
  assert got.shape == tokens.shape
  assert_allclose(got, _direct(model, tokens, mask), atol=1e-5, rtol=1e-5)
  # column 0 and each row's first real token have no context: 0
  assert_allclose(got[:, 0], 0.0)
  assert_allclose(got[2, :-1], 0.0)  # the 2-token row: only its last counts


@pytest.mark.parametrize("last", [1, 3, 8, 20])
def test_token_logps_last_columns_only(model, last):
  tokens, mask = _batch()  # T = 9
  got = np.asarray(scoring.token_logps(model, tokens, mask, vocab_chunk=2,
                                       last=last))
  want = np.asarray(_direct(model, tokens, mask))
  first = max(1, 9 - last)
  assert_allclose(got[:, first:], want[:, first:], atol=1e-5, rtol=1e-5)
  assert_allclose(got[:, :first], 0.0)


def test_token_logps_gradient_equals_direct():
  model = core_fixtures.random_tiny_model(seed=2, num_layers=1)
  tokens, mask = _batch((7, 4))
  w = mask.astype(jnp.float32)

  def chunked(m):
    return jnp.sum(scoring.token_logps(m, tokens, mask, vocab_chunk=3) * w)

  def direct(m):
    return jnp.sum(_direct(m, tokens, mask) * w)

  g1 = jax.jit(jax.grad(chunked))(model)
  g2 = jax.jit(jax.grad(direct))(model)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_last_logps_is_the_last_column(model):
  tokens, mask = _batch()
  got = scoring.jitted_last_logps(model, tokens, mask)
  logits = jax.jit(lambda m, x, a: m(x, attention_mask=a))(model, tokens, mask)
  want = jax.nn.log_softmax(logits[:, -1], -1)
  assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert_allclose(jnp.sum(jnp.exp(got), -1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("mask, total, mean", [
    ([[0, 1, 1]], [-5.0], [-2.5]),  # -2 - 3; (-2 - 3) / 2
    ([[1, 1, 1]], [-6.0], [-2.0]),  # -1 - 2 - 3; -6 / 3
    ([[0, 0, 0]], [0.0], [0.0]),  # nothing scored: 0, never NaN
])
def test_seq_and_mean_logps_hand(mask, total, mean):
  lp = jnp.array([[-1.0, -2.0, -3.0]])
  m = jnp.array(mask, bool)
  assert_allclose(jax.jit(scoring.seq_logps)(lp, m), total)
  assert_allclose(jax.jit(scoring.mean_logps)(lp, m), mean)


def test_response_logps_equals_unpadded_rows():
  """[prompt | response] rows: each response's log-probs equal a log_softmax
  of the unpadded concatenation, and are 0 outside the response mask."""
  from flax import nnx as _nnx
  from purld_jax.models import llama as _llama
  model = _llama.Llama(_llama.tiny_config(), rngs=_nnx.Rngs(3))
  prompts = [[5, 6, 7], [9]]
  responses = [[[11, 12], [13, 14, 15]], [[16], [17, 18]]]
  pt = np.zeros((2, 3), np.int32)
  pm = np.zeros((2, 3), bool)
  for i, p in enumerate(prompts):
    pt[i, 3 - len(p):], pm[i, 3 - len(p):] = p, True
  rt = np.zeros((2, 2, 3), np.int32)
  rm = np.zeros((2, 2, 3), bool)
  for i, g in enumerate(responses):
    for j, r in enumerate(g):
      rt[i, j, :len(r)], rm[i, j, :len(r)] = r, True
  got = np.asarray(scoring.response_logps(model, jnp.asarray(pt),
                                          jnp.asarray(pm), jnp.asarray(rt),
                                          jnp.asarray(rm)))
  for i, p in enumerate(prompts):
    for j, r in enumerate(responses[i]):
      seq = jnp.asarray([p + r], jnp.int32)
      lsm = jax.nn.log_softmax(model(seq)[0], axis=-1)
      want = [float(lsm[len(p) + n - 1, tok]) for n, tok in enumerate(r)]
      np.testing.assert_allclose(got[i, j, :len(r)], want, atol=1e-5)
      assert (got[i, j, len(r):] == 0).all()


# ----------------------------------------------------------------------------
# response_logps: each prompt run once for its M responses


def _repeated(model, pt, pm, rt, rm, vocab_chunk=None):
  """The oracle: M copies of each prompt, [prompt | response] rows through
  `token_logps`, the response columns kept."""
  b, m, t = rt.shape
  tokens = jnp.concatenate([jnp.repeat(pt, m, 0), rt.reshape(b * m, t)], 1)
  mask = jnp.concatenate([jnp.repeat(pm, m, 0), rm.reshape(b * m, t)], 1)
  lp = scoring.token_logps(model, tokens, mask, vocab_chunk=vocab_chunk)
  return jnp.where(rm, lp[:, pt.shape[1]:].reshape(b, m, t), 0.0)


def _groups(prompt_lens, response_lens, p=6, t=5, seed=0):
  """Left-padded prompts [B, P] and right-padded responses [B, M, T] of the
  given lengths (a length-0 response is all padding)."""
  rng = np.random.default_rng(seed)
  b, m = len(prompt_lens), len(response_lens[0])
  pt, pm = tok_lib.pad_left(
      [list(rng.integers(1, 128, n)) for n in prompt_lens], 0, length=p)
  rt = np.zeros((b, m, t), np.int32)
  rm = np.zeros((b, m, t), bool)
  for i, lens in enumerate(response_lens):
    for j, n in enumerate(lens):
      rt[i, j, :n], rm[i, j, :n] = rng.integers(1, 128, n), True
  return tuple(jnp.asarray(x) for x in (pt, pm, rt, rm))


_RAGGED = dict(prompt_lens=(6, 3, 1),  # full, left-padded, a single token
               response_lens=((5, 2, 0), (1, 5, 3), (4, 4, 5)))


@pytest.mark.parametrize("overrides", [
    {}, dict(qkv_bias=True, qk_norm=True, tie_word_embeddings=True)])
@pytest.mark.parametrize("vocab_chunk", [None, 2])
def test_response_logps_equals_repeated_prompt_rows(overrides, vocab_chunk):
  model = core_fixtures.random_tiny_model(seed=4, **overrides)
  pt, pm, rt, rm = _groups(**_RAGGED)
  fn = jax.jit(scoring.response_logps, static_argnames="vocab_chunk")
  got = fn(model, pt, pm, rt, rm, vocab_chunk=vocab_chunk)
  assert got.shape == rt.shape
  assert_allclose(got, jax.jit(_repeated)(model, pt, pm, rt, rm),
                  atol=1e-5, rtol=1e-5)
  assert_allclose(got[0, 2], 0.0)  # the empty response
  assert_allclose(got[1, 0, 1:], 0.0)  # after a 1-token response


def test_response_logps_hole_in_the_mask_and_one_response(model):
  """M = 1; a mask with a hole: the token after the hole has no context in
  the repeated rows (its predecessor is padding), so it is 0 there too."""
  pt, pm, rt, rm = _groups((4, 2), ((5,), (3,)))
  rm = rm.at[0, 0, 2].set(False)  # response 0: tokens 0 1 _ 3 4
  got = jax.jit(scoring.response_logps)(model, pt, pm, rt, rm)
  assert_allclose(got, jax.jit(_repeated)(model, pt, pm, rt, rm), atol=1e-5,
                  rtol=1e-5)
  assert_allclose(got[0, 0, 2:4], 0.0)


def test_response_logps_single_column(model):
  """T = 1: only the first response token, predicted from the prompt."""
  pt, pm, rt, rm = _groups((4, 2), ((1, 0), (1, 1)), t=1)
  got = jax.jit(scoring.response_logps)(model, pt, pm, rt, rm)
  assert_allclose(got, jax.jit(_repeated)(model, pt, pm, rt, rm), atol=1e-5,
                  rtol=1e-5)


def test_response_logps_gradient_equals_repeated_prompt_rows():
  """Gradients through the shared prompt keys/values (summed over the M
  responses) equal those of M separate copies."""
  model = core_fixtures.random_tiny_model(seed=5)
  pt, pm, rt, rm = _groups(**_RAGGED)
  w = jnp.asarray(np.random.default_rng(1).normal(size=rt.shape), jnp.float32)

  def shared(mdl):
    return jnp.sum(scoring.response_logps(mdl, pt, pm, rt, rm,
                                          vocab_chunk=2) * w)

  def repeated(mdl):
    return jnp.sum(_repeated(mdl, pt, pm, rt, rm) * w)

  v1, g1 = jax.jit(jax.value_and_grad(shared))(model)
  v2, g2 = jax.jit(jax.value_and_grad(repeated))(model)
  assert_allclose(v1, v2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("policy", [
    "full", pytest.param("dots", marks=pytest.mark.slow)])
def test_response_logps_remat_checkpoints_each_layer_same_gradients(policy):
  """`model.remat` reaches the response scorer's own layer loop: one remat
  per layer there (2 layers) and 2 in the prompt prefill (`Llama.extend`),
  beside the vocabulary chunk's own checkpoint;
  value and gradients equal to no remat (same weights: same seed)."""
  from tests.models.test_llama_remat import _remats
  pt, pm, rt, rm = _groups(**_RAGGED)
  w = jnp.asarray(np.random.default_rng(1).normal(size=rt.shape), jnp.float32)

  def run(remat):
    model = core_fixtures.random_tiny_model(seed=5, num_layers=2, remat=remat)
    loss = lambda mdl: jnp.sum(scoring.response_logps(mdl, pt, pm, rt, rm) * w)
    n = _remats(jax.make_jaxpr(loss)(model).jaxpr)
    return n, jax.jit(jax.value_and_grad(loss))(model)

  n0, (v0, g0) = run("none")
  n1, (v1, g1) = run(policy)
  assert n1 - n0 == 4
  assert_allclose(v1, v0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert_allclose(a, b, atol=1e-7, rtol=1e-5)
