"""purld_jax/sampling.py on a tiny random model, against the uncached forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.testing import assert_allclose, assert_array_equal

from purld_jax import prefix_cache
from purld_jax import sampling
from purld_jax import token_choice
from purld_jax.models import llama
from purld_jax.models import tokenizer as tok_lib

SP = sampling.SamplingParams
# One response length and group size (few compiles); T > 32 so the decode
# reads its own keys in two chunks (prefix_cache.CHUNK).
T, K = 40, 3


@pytest.fixture(scope="module")
def model():
  return llama.Llama(llama.tiny_config(), rngs=nnx.Rngs(0))


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [[int(x) for x in rng.integers(1, 128, n)] for n in lengths]


PROMPTS = _prompts([5, 3, 9])  # bucketed to P = 16


def _run(model, sp, prompts=PROMPTS, *, key=0, index=None, buckets=(16,)):
  tokens, mask = sampling.pad_prompts(prompts, 0, buckets=buckets)
  index = np.arange(len(prompts)) if index is None else np.asarray(index)
  graphdef, params = nnx.split(model)
  out = sampling.sample(graphdef, params, jnp.asarray(tokens),
                        jnp.asarray(mask), jax.random.key(key),
                        prompt_index=jnp.asarray(index, jnp.int32),
                        num_candidates=K, sampling=sp, pad_id=0)
  return jax.tree.map(np.asarray, out)


@jax.jit
def _full_log_softmax(model, tokens, mask):
  return jax.nn.log_softmax(model(tokens, attention_mask=mask), axis=-1)


def _reference(model, rows):
  """log_softmax [len(rows), 64, V] of one uncached forward, left-padded to
  64 columns (and 16 rows, so it compiles once)."""
  padded = list(rows) + [[1]] * (16 - len(rows))
  tokens, mask = tok_lib.pad_left(padded, 0, length=64)
  return np.asarray(_full_log_softmax(model, jnp.asarray(tokens),
                                      jnp.asarray(mask)))[:len(rows)]


def _greedy_reference(model, prompts, n):
  """n argmax steps, each a full uncached forward of everything so far."""
  seqs = [list(p) for p in prompts]
  for _ in range(n):
    lp = _reference(model, seqs)
    for seq, row in zip(seqs, lp):
      seq.append(int(np.argmax(row[-1])))
  return [seq[len(p):] for seq, p in zip(seqs, prompts)]


def _assert_logps_match_forward(model, out, prompts=PROMPTS):
  """out.logps = log_softmax of the full forward at the sampled tokens."""
  rows, where = [], []
  for b, prompt in enumerate(prompts):
    for k in range(K):
      rows.append(prompt + list(out.tokens[b, k, :out.lengths[b, k]]))
      where.append((b, k))
  lp = _reference(model, rows)
  for (b, k), row, full in zip(where, rows, lp):
    n = out.lengths[b, k]
    resp = np.asarray(row[-n:])
    want = full[-n - 1:-1][np.arange(n), resp]
    assert_allclose(out.logps[b, k, :n], want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def greedy_reference(model):
  return _greedy_reference(model, PROMPTS, T)


@pytest.fixture(scope="module")
def greedy_stop(greedy_reference):
  """A stop id: the 3rd greedy token of prompt 0."""
  return greedy_reference[0][2]


@pytest.fixture(scope="module")
def greedy(model, greedy_stop):
  return _run(model, SP(temperature=0, max_new_tokens=T,
                        stop_ids=(greedy_stop,)))


@pytest.fixture(scope="module")
def plain(model):
  return _run(model, SP(max_new_tokens=T))


FILTERED = SP(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05,
              max_new_tokens=T)


@pytest.fixture(scope="module")
def filtered(model):
  return _run(model, FILTERED)


# ----------------------------------------------------------------------------
# Greedy


def test_greedy_equals_step_by_step_argmax(greedy, greedy_reference,
                                          greedy_stop):
  """Each row is the argmax chain of the full forward, up to and with its
  first stop token (prompt 0 stops by column 3), pad after."""
  assert T > prefix_cache.CHUNK  # the decode crosses a chunk of its own keys
  for b, want in enumerate(greedy_reference):
    n = want.index(greedy_stop) + 1 if greedy_stop in want else T
    assert n <= 3 or b
    for k in range(K):
      assert_array_equal(greedy.tokens[b, k, :n], want[:n])
      assert (greedy.tokens[b, k, n:] == 0).all()
    assert_array_equal(greedy.lengths[b], [n] * K)
    assert_array_equal(greedy.finished[b], [n < T or want[-1] == greedy_stop]
                       * K)
  assert (greedy.sample_logps == 0).all()


def test_greedy_and_logps_with_every_family_switch():
  """Qwen2 biases, Qwen3 q/k norms, o/mlp biases, tied embeddings at once."""
  cfg = llama.tiny_config(qkv_bias=True, qk_norm=True, o_bias=True,
                          mlp_bias=True, tie_word_embeddings=True,
                          num_layers=1)
  model = llama.Llama(cfg, rngs=nnx.Rngs(1))
  out = _run(model, SP(temperature=0, max_new_tokens=T))
  want = _greedy_reference(model, PROMPTS, T)
  assert_array_equal(out.tokens, np.repeat(np.asarray(want)[:, None], K, 1))
  _assert_logps_match_forward(model, out)


def test_top_k_one_equals_greedy(model, greedy, greedy_stop):
  out = _run(model, SP(top_k=1, max_new_tokens=T, stop_ids=(greedy_stop,)),
             key=3)
  assert_array_equal(out.tokens, greedy.tokens)
  assert_allclose(out.logps, greedy.logps, atol=1e-6)
  # One token is left, so the sampling distribution puts all mass on it.
  assert_allclose(out.sample_logps, 0.0, atol=1e-5)


def test_vanishing_temperature_picks_the_argmax(model):
  """The token choice on the model's logits after each prompt: temperature
  -> 0 draws the argmax, whatever the key (64 keys a row)."""
  sp = SP(temperature=1e-5)
  tokens, mask = sampling.pad_prompts(PROMPTS, 0, buckets=(16,))
  logits = np.asarray(jax.jit(lambda m, t, k: m(t, attention_mask=k))(
      model, jnp.asarray(tokens), jnp.asarray(mask)))[:, -1]  # [3, V]
  rows = jnp.asarray(np.repeat(logits, 64, axis=0))
  keys = jax.random.split(jax.random.key(5), rows.shape[0])
  tok, lp, slp = jax.jit(token_choice.choose, static_argnums=2)(rows, keys,
                                                             sp)
  assert_array_equal(tok, np.repeat(logits.argmax(-1), 64))
  assert_allclose(slp, 0.0, atol=1e-5)


# ----------------------------------------------------------------------------
# Log-probs


@pytest.mark.parametrize("which", ["greedy", "plain", "filtered"])
def test_logps_equal_full_forward_log_softmax(model, which, request):
  """Model log-probs at temperature 1, whatever the sampling rule."""
  _assert_logps_match_forward(model, request.getfixturevalue(which))


def test_logps_equal_scoring_token_logps(model, plain):
  scoring = pytest.importorskip("purld_jax.scoring")
  if not hasattr(scoring, "jitted_token_logps"):
    pytest.skip("scoring.jitted_token_logps not there")
  rows = [p + list(plain.tokens[b, k]) for b, p in enumerate(PROMPTS)
          for k in range(K)]
  tokens, mask = tok_lib.pad_left(rows, 0)
  got = np.asarray(scoring.jitted_token_logps(model, jnp.asarray(tokens),
                                              jnp.asarray(mask)))
  assert_allclose(plain.logps.reshape(-1, T), got[:, -T:], atol=1e-4, rtol=0)


def test_sample_logps_are_the_filtered_distribution(plain, filtered):
  """At temperature 1 without filters the two log-probs coincide."""
  assert_allclose(plain.sample_logps, plain.logps, atol=1e-5)
  # 20 of 128 near-uniform tokens kept, at temperature 0.7: each kept token
  # has a larger share of the filtered distribution than of the model's.
  m = filtered.mask
  assert (filtered.sample_logps[m] > filtered.logps[m]).all()
  assert (filtered.sample_logps[~m] == 0).all()


# ----------------------------------------------------------------------------
# Randomness


def test_same_key_same_outputs_other_key_other_outputs(model, plain):
  again = _run(model, SP(max_new_tokens=T))
  jax.tree.map(assert_array_equal, again, plain)
  other = _run(model, SP(max_new_tokens=T), key=1)
  assert (other.tokens != plain.tokens).any()


def test_candidates_of_a_prompt_differ_at_temperature_one(plain):
  for b in range(len(PROMPTS)):
    assert len({tuple(r) for r in plain.tokens[b]}) == K


def test_prompt_candidates_do_not_depend_on_the_batch(model, filtered):
  """Prompt 0 alone (B = 1, P = 8) gets the candidates it got in the batch
  of three (P = 16): same index, same draws, whatever the padding."""
  alone = _run(model, FILTERED, PROMPTS[:1], index=[0], buckets=(8,))
  assert_array_equal(alone.tokens[0], filtered.tokens[0])
  assert_array_equal(alone.lengths[0], filtered.lengths[0])
  assert_allclose(alone.logps[0], filtered.logps[0], atol=1e-5)
  # Prompt 0 under index 1 draws other candidates.
  moved = _run(model, FILTERED, PROMPTS[:1], index=[1], buckets=(8,))
  assert (moved.tokens[0] != alone.tokens[0]).any()


# ----------------------------------------------------------------------------
# Stop tokens


HALF = tuple(range(64))  # half the vocabulary stops


@pytest.fixture(scope="module")
def stopped(model):
  return _run(model, SP(max_new_tokens=T, stop_ids=HALF))


def test_nothing_after_a_stop_token_is_in_the_mask(stopped):
  """Most rows end early, each right at its first stop token."""
  out = stopped
  assert out.finished.sum() > 6  # a row runs T tokens unstopped w.p. ~ 2^-T
  cols = np.arange(T)
  for b in range(len(PROMPTS)):
    for k in range(K):
      n, toks = out.lengths[b, k], out.tokens[b, k]
      is_stop = np.isin(toks[:n], HALF)
      assert_array_equal(out.mask[b, k], cols < n)
      assert not is_stop[:-1].any()
      assert is_stop[-1] == out.finished[b, k]
      assert (toks[n:] == 0).all()
      assert (out.logps[b, k, n:] == 0).all()
      assert (out.logps[b, k, :n] < 0).all()


# ----------------------------------------------------------------------------
# Filters by hand


_P5 = np.array([0.5, 0.2, 0.15, 0.1, 0.05], np.float32)


@pytest.mark.parametrize("sp, kept", [
    (SP(top_k=3), [0, 1, 2]),
    (SP(top_p=0.6), [0, 1]),  # mass before each: 0, .5, .7, .85, .95
    (SP(top_p=0.75), [0, 1, 2]),
    (SP(top_p=1.0), [0, 1, 2, 3, 4]),
    (SP(min_p=0.35), [0, 1]),  # floor .35 * .5 = .175
    (SP(min_p=0.25), [0, 1, 2]),  # floor .125
    # Within the top 4 (mass .95): .526 .211 .158 .105, before 0 .526 .737 .895
    (SP(top_k=4, top_p=0.8), [0, 1, 2]),
    (SP(top_k=4, min_p=0.25), [0, 1, 2]),
    # Temperature 2: p ~ sqrt(_P5) = .707 .447 .387 .316 .224, sum 2.081,
    # so .340 .215 .186 .152 .107; before: 0 .340 .555 .741 .893.
    (SP(temperature=2.0, top_p=0.6), [0, 1, 2]),
])
def test_filter_logits_by_hand(sp, kept):
  logits = jnp.asarray(np.log(_P5)[None])
  out = np.asarray(token_choice.filter_logits(logits, sp))[0]
  assert_array_equal(np.flatnonzero(np.isfinite(out)), kept)
  assert_allclose(out[kept], np.log(_P5[kept]) / sp.temperature, rtol=1e-6)


def test_draw_follows_the_filtered_distribution():
  """20k draws of the top-p 0.75 distribution .5/.85, .2/.85, .15/.85."""
  n = 20000
  logits = jnp.broadcast_to(jnp.asarray(np.log(_P5))[None], (n, 5))
  keys = jax.random.split(jax.random.key(0), n)
  tok, lp, slp = jax.jit(token_choice.choose, static_argnums=2)(
      logits, keys, SP(top_p=0.75))
  freq = np.bincount(np.asarray(tok), minlength=5) / n
  assert_allclose(freq, [0.5 / .85, 0.2 / .85, 0.15 / .85, 0, 0], atol=0.015)
  assert_allclose(np.asarray(lp), np.log(_P5)[np.asarray(tok)], rtol=1e-5)
  assert_allclose(np.asarray(slp), np.log(_P5 / 0.85)[np.asarray(tok)],
                  rtol=1e-5)


# ----------------------------------------------------------------------------
# Helpers


@pytest.mark.parametrize("lengths, buckets, p", [
    ([5, 3], (8, 16), 8), ([9, 3], (8, 16), 16), ([20], (8, 16), 32),
    ([20], None, 20)])
def test_pad_prompts_buckets(lengths, buckets, p):
  tokens, mask = sampling.pad_prompts(_prompts(lengths), 0, buckets=buckets)
  assert tokens.shape == (len(lengths), p)
  assert_array_equal(mask.sum(1), lengths)
  assert mask[:, -1].all()  # left-padded


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0),
                                 dict(min_p=1.5), dict(max_new_tokens=0),
                                 dict(top_k=-2)])
def test_sampling_params_reject_bad_values(bad):
  with pytest.raises(ValueError):
    SP(**bad)


@dataclasses.dataclass(frozen=True)
class _FakeTokenizer:
  """Chat = one token per character; decode = letters. Stops as `stopped`."""
  stop_ids: tuple = HALF
  pad_id: int = 0

  def encode_chat(self, messages):
    return [1 + ord(c) % 127 for m in messages for c in m["content"]]

  def decode(self, ids):
    return "".join(chr(97 + int(i) % 26) for i in ids)


def test_generate_returns_k_strings_per_chat(model, stopped):
  """Same chats as the `stopped` token batch, so the same answers."""
  fake = _FakeTokenizer()
  chats = [[{"role": "user",
             "content": "".join(chr(t - 1) for t in p)}] for p in PROMPTS]
  assert [fake.encode_chat(c) for c in chats] == PROMPTS
  out = sampling.generate(model, fake, chats, key=jax.random.key(0),
                          num_candidates=K, sampling=SP(max_new_tokens=T),
                          buckets=(16,))
  want = [[fake.decode(stopped.tokens[b, k, :stopped.lengths[b, k]])
           for k in range(K)] for b in range(len(PROMPTS))]
  assert out == want
