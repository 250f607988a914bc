"""Token choice: one token per decode row from its logits (METHOD step 3).

Axis letters (structs.py): R rows, V vocab.

  tok, lp, slp = token_choice.choose(logits_RV, keys_R, rule)

`rule` is a `sampling.SamplingParams` (only its temperature, top_k, top_p
and min_p are read; this module does not import sampling.py, which imports
it). `filter_logits` applies temperature, top-k, top-p and min-p in that
order, by bisection over the logits' bit patterns (no sort); `choose` draws
by a two-level inverse CDF (blocks of 256 tokens) with one uniform per row,
or takes the argmax at temperature 0, and returns the token with its
log-prob under the model (temperature 1, unfiltered) and under the
distribution it was drawn from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _order_key(x: jax.Array) -> jax.Array:
  """i32 with the order of the f32 `x` (-inf lowest), for exact bisection."""
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  return jnp.where(i < 0, i ^ 0x7FFFFFFF, i)


def _threshold(key_RV: jax.Array, weight_RV: jax.Array, limit) -> jax.Array:
  """i32[R, 1]: per row the smallest t with sum(weight[key > t]) < limit.

  Tokens with key >= t are then exactly those whose strictly larger tokens
  weigh less than `limit`. A 32-step bisection over the i32 keys: about 32
  passes over [R, V], far cheaper on CPU than XLA's sort.
  """
  lo = jnp.min(key_RV, axis=-1, keepdims=True) - 1  # keys are > -2^31
  hi = jnp.max(key_RV, axis=-1, keepdims=True)  # weight above it is 0

  def halve(_, bounds):
    lo, hi = bounds
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo+hi)/2), no overflow
    above = jnp.sum(jnp.where(key_RV > mid, weight_RV, 0), axis=-1,
                    keepdims=True)
    ok = above < limit
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def filter_logits(logits_RV: jax.Array, sampling) -> jax.Array:
  """Temperature-scaled logits with filtered-out tokens set to -inf.

  Token i survives top-k if fewer than k tokens are strictly more likely,
  and top-p if the tokens strictly more likely than it hold less than top_p
  (so the most likely token always survives and ties are kept together).

  Args:
    logits_RV: f32[R, V] raw logits.
    sampling: a `sampling.SamplingParams` with temperature > 0 (its
      temperature, top_k, top_p and min_p are read).

  Returns:
    f32[R, V]; its log_softmax is the sampling distribution.
  """
  x = logits_RV.astype(jnp.float32) / sampling.temperature
  neg = jnp.asarray(-jnp.inf, x.dtype)
  if sampling.top_k and sampling.top_k < x.shape[-1]:
    key = _order_key(x)
    t = _threshold(key, jnp.ones((), jnp.int32), sampling.top_k)
    x = jnp.where(key >= t, x, neg)
  if sampling.top_p < 1:
    key = _order_key(x)
    t = _threshold(key, jax.nn.softmax(x, axis=-1), sampling.top_p)
    x = jnp.where(key >= t, x, neg)
  if sampling.min_p > 0:
    floor = jnp.max(x, axis=-1, keepdims=True) + jnp.log(sampling.min_p)
    x = jnp.where(x >= floor, x, neg)
  return x


_BLOCK = 256  # tokens per block of the two-level inverse CDF


def _last_positive(w_RX: jax.Array) -> jax.Array:
  """i32[R]: index of the last positive entry of each row."""
  return w_RX.shape[-1] - 1 - jnp.argmax((w_RX > 0)[:, ::-1], axis=-1)


def _draw(keys_R: jax.Array, w_RV: jax.Array) -> jax.Array:
  """i32[R]: one draw per row from unnormalised weights w >= 0 (some > 0).

  Inverse CDF with one uniform per row, in two levels (blocks of 256, then
  within the block) so no cumulative sum runs over the whole vocabulary.
  Zero-weight tokens are never drawn, whatever the rounding.
  """
  r, v = w_RV.shape
  nb = -(-v // _BLOCK)
  w = jnp.pad(w_RV, ((0, 0), (0, nb * _BLOCK - v))).reshape(r, nb, _BLOCK)
  block_mass = jnp.sum(w, axis=-1)  # [R, nb]
  cum = jnp.cumsum(block_mass, axis=-1)
  u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_R)
  target = u * cum[:, -1]  # in [0, total)
  blk = jnp.sum(cum <= target[:, None], axis=-1)
  blk = jnp.minimum(blk, _last_positive(block_mass))
  before = jnp.take_along_axis(cum - block_mass, blk[:, None], axis=-1)[:, 0]
  w_blk = jnp.take_along_axis(w, blk[:, None, None], axis=1)[:, 0]  # [R, 256]
  inner = jnp.sum(jnp.cumsum(w_blk, axis=-1) <= (target - before)[:, None],
                  axis=-1)
  inner = jnp.minimum(inner, _last_positive(w_blk))
  return (blk * _BLOCK + inner).astype(jnp.int32)


def _plain(sampling) -> bool:
  """Sampling from the model's own distribution (temperature 1, no filter)."""
  return (sampling.temperature == 1 and not sampling.top_k
          and sampling.top_p == 1 and sampling.min_p == 0)


def choose(logits_RV: jax.Array, keys_R: jax.Array, sampling):
  """Picks one token per row.

  Args:
    logits_RV: f32[R, V] the model's logits.
    keys_R: [R] one PRNG key per row.
    sampling: the rule, a `sampling.SamplingParams` (its temperature, top_k,
      top_p and min_p are read).

  Returns:
    (token i32[R], model log-prob f32[R] at temperature 1 unfiltered,
     sampling log-prob f32[R], 0 for greedy).
  """
  logits = logits_RV.astype(jnp.float32)
  top = jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits - top)
  lse = top[:, 0] + jnp.log(jnp.sum(weights, axis=-1))
  pick = lambda x, tok: jnp.take_along_axis(x, tok[:, None], axis=-1)[:, 0]
  if sampling.temperature == 0:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tok, top[:, 0] - lse, jnp.zeros_like(lse)
  if _plain(sampling):
    tok = _draw(keys_R, weights)
    lp = pick(logits, tok) - lse
    return tok, lp, lp
  x = filter_logits(logits, sampling)
  x_top = jnp.max(x, axis=-1, keepdims=True)
  x_weights = jnp.exp(x - x_top)
  tok = _draw(keys_R, x_weights)
  x_lse = x_top[:, 0] + jnp.log(jnp.sum(x_weights, axis=-1))
  return tok, pick(logits, tok) - lse, pick(x, tok) - x_lse
