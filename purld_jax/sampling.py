"""Prompts -> K candidates each (METHOD step 3): prefill once, decode in a loop.

Axis letters (structs.py): B prompts, K candidates, P prompt tokens (left
padded), T response tokens (= max_new_tokens), V vocab, G kv heads, H head
dim, N query heads, L layers; R = B*K decode rows, row r = b * K + k; Rq =
N // G query heads per kv head.

  tokens, mask = sampling.pad_prompts(token_lists, pad_id)   # bucketed P
  graphdef, params = nnx.split(model)
  cands = sampling.sample(graphdef, params, tokens, mask, key,
                          prompt_index=ids, num_candidates=8,
                          sampling=sampling.SamplingParams(stop_ids=...))

`sample` is one jitted function. The B prompts are prefilled once
(`Llama.extend` on [B, P]); their keys and values stay [B, G, P, H] and the K
rows of a prompt read them together in one product per (prompt, kv head), so
nothing is copied K times. A `lax.while_loop` over a state dataclass (the
structure of the Flax NNX Gemma sampler) then feeds one token per row per step
(`_decode`: the model's own projections, norms and MLP, with attention over
the shared prompt cache plus each row's own cache of generated tokens) until
every row has stopped or T tokens exist. The caches live inside that jit, so
XLA updates them in place (no copy per step: checked in the compiled HLO); they
never cross a call boundary, so there is nothing to donate.

Every token's log-prob under the model (temperature 1, no filter) comes out
with it, so PPO's old-policy log-probs need no second forward pass.

Randomness: row (b, k) at step t uses
  fold_in(fold_in(fold_in(key, prompt_index[b]), k), t),
so a prompt's candidates depend on its own index, not on the batch around it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from purld_jax import sharding
from purld_jax import vision
from purld_jax.models import layer_stack
from purld_jax.models import layers as layers_lib
from purld_jax.models import tokenizer as tokenizer_lib

# Prompt lengths are rounded up to one of these (then to multiples of the
# largest), so a run compiles a handful of shapes.
DEFAULT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each token. Hashable: it is a static argument of `sample`.

  The filters apply in this order, each to what the previous one left:
  temperature, top-k, top-p, min-p.

  Attributes:
    temperature: logits are divided by it; 0 is greedy (argmax).
    top_k: keep the k most likely tokens; 0 keeps all.
    top_p: keep the smallest set of most likely tokens whose probability
      reaches top_p (the most likely token is always kept); 1 keeps all.
    min_p: keep tokens with probability >= min_p * the largest; 0 keeps all.
    max_new_tokens: T, the most tokens a response may have.
    stop_ids: tokens that end a response (EOS, end of turn); the stop token
      is part of the response.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  max_new_tokens: int = 128
  stop_ids: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))
    if self.temperature < 0:
      raise ValueError(f"temperature {self.temperature} < 0")
    if self.top_k < 0:
      raise ValueError(f"top_k {self.top_k} < 0")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p {self.top_p} not in (0, 1]")
    if not 0 <= self.min_p <= 1:
      raise ValueError(f"min_p {self.min_p} not in [0, 1]")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens {self.max_new_tokens} < 1")


@flax.struct.dataclass
class Candidates:
  """K sampled responses per prompt.

  Attributes:
    tokens: i32[B, K, T]; `pad_id` after the end of a response.
    lengths: i32[B, K] tokens in each response (its stop token included).
    finished: bool[B, K] the response ended with a stop token (False: it ran
      out of max_new_tokens).
    logps: f32[B, K, T] log-prob of each token under the model itself
      (temperature 1, no filtering): what PPO's old policy and the scorer
      compute. 0 outside `mask`.
    sample_logps: f32[B, K, T] log-prob under the distribution the token was
      actually drawn from (temperature and filters applied); 0 for greedy
      and outside `mask`.
    mask: bool[B, K, T] real response tokens: the first `lengths` columns.
  """

  tokens: jax.Array
  lengths: jax.Array
  finished: jax.Array
  logps: jax.Array
  sample_logps: jax.Array
  mask: jax.Array


def tokens_before_stop(tokens: np.ndarray, finished: np.ndarray
                       ) -> np.ndarray:
  """i64[...]: answer lengths without the stop token, from counts that
  include a finished answer's (`Candidates.lengths`, a stored member mask).
  """
  return np.asarray(tokens, np.int64) - np.asarray(finished, np.int64)


# ----------------------------------------------------------------------------
# Token choice


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


def filter_logits(logits_RV: jax.Array, sampling: SamplingParams) -> jax.Array:
  """Temperature-scaled logits with filtered-out tokens set to -inf.

  Token i survives top-k if fewer than k tokens are strictly more likely,
  and top-p if the tokens strictly more likely than it hold less than top_p
  (so the most likely token always survives and ties are kept together).

  Args:
    logits_RV: f32[R, V] raw logits.
    sampling: temperature > 0 and the filters.

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


def _plain(sampling: SamplingParams) -> bool:
  """Sampling from the model's own distribution (temperature 1, no filter)."""
  return (sampling.temperature == 1 and not sampling.top_k
          and sampling.top_p == 1 and sampling.min_p == 0)


def choose(logits_RV: jax.Array, keys_R: jax.Array, sampling: SamplingParams):
  """Picks one token per row.

  Args:
    logits_RV: f32[R, V] the model's logits.
    keys_R: [R] one PRNG key per row.
    sampling: the rule.

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


# ----------------------------------------------------------------------------
# The decode step: prompt cache shared by K rows, generated cache per row


@flax.struct.dataclass
class _Prefix:
  """The prompts' keys and values, written once, read by their K rows."""

  k: jax.Array  # [L, B, G, P, H]
  v: jax.Array  # [L, B, G, P, H]
  mask: jax.Array  # bool[B, P]


@flax.struct.dataclass
class _Own:
  """Keys and values of each row's own generated tokens, in chunks of
  `_CHUNK` slots so a step reads only the chunks written so far."""

  k: jax.Array  # [L, R, G, C, H, _CHUNK], keys slot-minor for q.k
  v: jax.Array  # [L, R, G, C, _CHUNK, H]   (C chunks)


_CHUNK = 32
_NEG = -1e30  # finite, as in layers.py: masked slots weigh exactly 0


def _attend(q_RNH, pk_BGPH, pv_BGPH, pmask_BP, own: _Own, layer, col):
  """One query per row over its prompt's slots and its own slots <= col
  (layer `layer` of `own`).

  Rows of a prompt are consecutive (r = b * K + k), so the prompt part is one
  [K * R_q, H] x [H, P] product per (prompt, kv head), never K copies of it.
  The own slots are visited a chunk at a time, only up to col's chunk, with
  a running max and sum (the softmax is over prompt and own slots at once).
  Returns [R, N, H].
  """
  r, n, h = q_RNH.shape
  b, g, p, _ = pk_BGPH.shape
  k, rq, dt = r // b, n // g, q_RNH.dtype
  size = own.k.shape[-1]
  scale = h ** -0.5
  q = q_RNH.reshape(r, g, rq, h)
  # [R, G, Rq, X] <-> [B, G, K * Rq, X]
  to_prompt = lambda x: x.reshape((b, k, g, rq) + x.shape[3:]).swapaxes(
      1, 2).reshape((b, g, k * rq) + x.shape[3:])
  to_rows = lambda x: x.reshape((b, g, k, rq) + x.shape[3:]).swapaxes(
      1, 2).reshape((r, g, rq) + x.shape[3:])
  lp = jnp.einsum("bgqh,bgph->bgqp", to_prompt(q), pk_BGPH,
                  preferred_element_type=jnp.float32) * scale
  lp = jnp.where(pmask_BP[:, None, None, :], lp, _NEG)
  top = jnp.max(lp, axis=-1)
  ep = jnp.exp(lp - top[..., None])
  acc = to_rows(jnp.einsum("bgqp,bgph->bgqh", ep.astype(dt), pv_BGPH))
  total, top = to_rows(jnp.sum(ep, axis=-1)), to_rows(top)

  def chunk(c, carry):
    acc, total, top = carry
    # Only chunk c of this layer is read: no copy of the layer's cache.
    at = (layer, 0, 0, c, 0, 0)
    kc = jax.lax.dynamic_slice(own.k, at, (1, r, g, 1, h, size)).reshape(
        r, g, h, size)
    vc = jax.lax.dynamic_slice(own.v, at, (1, r, g, 1, size, h)).reshape(
        r, g, size, h)
    lo = jnp.einsum("mgrh,mghs->mgrs", q, kc,
                    preferred_element_type=jnp.float32) * scale
    slots = c * size + jnp.arange(size)
    lo = jnp.where((slots <= col)[None, None, None, :], lo, _NEG)
    new_top = jnp.maximum(top, jnp.max(lo, axis=-1))
    eo = jnp.exp(lo - new_top[..., None])
    keep = jnp.exp(top - new_top)
    acc = acc * keep[..., None].astype(dt) + jnp.einsum(
        "mgrs,mgsh->mgrh", eo.astype(dt), vc)
    return acc, total * keep + jnp.sum(eo, axis=-1), new_top

  acc, total, _ = jax.lax.fori_loop(0, col // size + 1, chunk,
                                    (acc, total, top))
  return (acc / total[..., None].astype(dt)).reshape(r, n, h)


def _decode(model, layers, prefix: _Prefix, own: _Own, tok_R, pos_R, col):
  """Feeds one token per row: (logits f32[R, V], own cache with slot col).
  `layers` is `layer_stack.layer_states(model)`, built once per `sample` call.

  The same math as `Llama.extend` with T = 1 (its Block: attention and MLP
  with pre-norms, residuals), on the shared-prefix cache layout, through
  `layer_stack.over_layers` (scanned with `cfg.scan_layers`; never remat: no
  gradient flows through sampling).
  """
  cfg = model.cfg
  x = jnp.take(model.embed[...], tok_R[:, None], axis=0).astype(cfg.dtype)
  inv_freq = layers_lib.rope_inv_freq(cfg)
  zero = jnp.zeros((), jnp.int32)
  c, at = col // _CHUNK, col % _CHUNK

  def block(layer, carry, xs):
    x, own = carry
    i, pk, pv = xs
    q, k, v = layer.attn.project(layer.input_norm(x), pos_R[:, None],
                                 inv_freq)
    # Written in place into the stacked cache (slot col of layer i).
    own = own.replace(
        k=jax.lax.dynamic_update_slice(
            own.k, k[None, :, 0, :, None, :, None].astype(own.k.dtype),
            (i, zero, zero, c, zero, at)),
        v=jax.lax.dynamic_update_slice(
            own.v, v[None, :, 0, :, None, None, :].astype(own.v.dtype),
            (i, zero, zero, c, at, zero)))
    o = _attend(q[:, 0], pk, pv, prefix.mask, own, i, col)
    x = x + layer.attn.output(o[:, None])
    return (x + layer.mlp(layer.post_attn_norm(x)), own), None

  index = jnp.arange(cfg.num_layers, dtype=jnp.int32)
  (x, own), _ = layer_stack.over_layers(model, block, (x, own),
                                        (index, prefix.k, prefix.v),
                                        remat="none", layers=layers)
  return model.logits(model.final_norm(x))[:, 0], _pin(own)


def _prefill(model, tokens_BP, mask_BP, slots: int, k: int, embeds=None):
  """Runs the prompts once: (prefix, empty own cache for B * K rows,
  logits f32[B, V] after the last prompt token, positions i32[B]).
  `model` is the decoder; `embeds` [B, P, D] (a prompt with images,
  `vision.prompt_embeds`) replace the tokens' embedding rows."""
  b, p = tokens_BP.shape
  positions = layers_lib.default_positions(mask_BP)
  cache = model.init_cache(b, p)
  h, cache = model.extend(tokens_BP, cache, positions=positions,
                          attention_mask=mask_BP, return_hidden=True,
                          embeds=embeds)
  logits = model.logits(h[:, -1])
  prefix = _Prefix(k=cache.k.swapaxes(2, 3), v=cache.v.swapaxes(2, 3),
                   mask=mask_BP)
  n_layers, _, _, g, h = cache.k.shape
  dt = cache.k.dtype
  c = -(-slots // _CHUNK)
  own = _Own(k=jnp.zeros((n_layers, b * k, g, c, h, _CHUNK), dt),
             v=jnp.zeros((n_layers, b * k, g, c, _CHUNK, h), dt))
  return _pin(prefix), _pin(own), logits, positions[:, -1]


# Logical axes of the caches (sharding.py): rows like the batch, kv heads
# like kv_heads; a no-op outside `sharding.use_rules`.
_CACHE_NAMES = {
    (_Prefix, "k"): ("cache_layers", "cache_batch", "cache_heads",
                     "cache_len", "cache_head_dim"),
    (_Prefix, "v"): ("cache_layers", "cache_batch", "cache_heads",
                     "cache_len", "cache_head_dim"),
    (_Own, "k"): ("cache_layers", "cache_batch", "cache_heads", None,
                  "cache_head_dim", None),
    (_Own, "v"): ("cache_layers", "cache_batch", "cache_heads", None, None,
                  "cache_head_dim"),
}


def _pin(cache):
  """`cache` (_Prefix or _Own) with its arrays constrained to the mesh."""
  pin = lambda field: sharding.constrain(
      getattr(cache, field), _CACHE_NAMES[(type(cache), field)])
  return cache.replace(k=pin("k"), v=pin("v"))


# ----------------------------------------------------------------------------
# The sampler


@flax.struct.dataclass
class _State:
  """The while_loop carry. R rows, T response columns."""

  step: jax.Array  # i32[] column of the token sampled last
  tokens: jax.Array  # i32[R, T]
  logps: jax.Array  # f32[R, T]
  sample_logps: jax.Array  # f32[R, T]
  done: jax.Array  # bool[R] a stop token was sampled
  positions: jax.Array  # i32[R] RoPE position of the token sampled last
  own: _Own


def _row_keys(key, prompt_index_B, k):
  """[B * K] keys: fold_in(fold_in(key, prompt_index[b]), k)."""
  def per_prompt(i):
    pk = jax.random.fold_in(key, i)
    return jax.vmap(lambda c: jax.random.fold_in(pk, c))(jnp.arange(k))
  keys = jax.vmap(per_prompt)(prompt_index_B)  # [B, K]
  return keys.reshape((-1,) + keys.shape[2:])


def _is_stop(tokens, stop_ids):
  out = jnp.zeros(tokens.shape, bool)
  for s in stop_ids:
    out = out | (tokens == s)
  return out


def _write(state: _State, col, tok, lp, slp, stop_ids, pad_id):
  """Stores column `col` of every row; rows already done get pad and 0."""
  live = ~state.done
  tok = jnp.where(live, tok, pad_id)
  zero = jnp.zeros_like(lp)
  upd = lambda buf, x: jax.lax.dynamic_update_slice(
      buf, x[:, None], (jnp.zeros((), jnp.int32), col))
  return dataclasses.replace(
      state, tokens=upd(state.tokens, tok),
      logps=upd(state.logps, jnp.where(live, lp, zero)),
      sample_logps=upd(state.sample_logps, jnp.where(live, slp, zero)),
      done=state.done | (live & _is_stop(tok, stop_ids)))


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "num_candidates", "sampling", "pad_id"))
def sample(graphdef, params, prompt_tokens, prompt_mask, key, *,
           prompt_index, num_candidates: int, sampling: SamplingParams,
           pad_id: int = 0, pixel_values=None, pixel_mask=None
           ) -> Candidates:
  """K candidates for each of B left-padded prompts.

  Args:
    graphdef, params: `nnx.split(model)` of a `llama.Llama`, or of a
      vision-language `idefics3.Idefics3` (vision.py).
    prompt_tokens: i32[B, P], left-padded (see `pad_prompts`).
    prompt_mask: bool[B, P], True on real tokens; each row needs at least one.
    key: PRNG key.
    prompt_index: i32[B] a stable id per prompt (e.g. its dataset index);
      the only thing the randomness of a prompt's candidates depends on
      besides `key`.
    num_candidates: K.
    sampling: the rule (`SamplingParams`); its max_new_tokens is T.
    pad_id: written after the end of each response.
    pixel_values: None, or f32[B, I, C, Y, X] the prompts' images (a
      vision-language model; all-zero slots are padding): the vision tower
      runs once per prompt and the image features join the prompt prefix
      that the K rows share (`vision.prompt_embeds`).
    pixel_mask: None, or [B, I, Y, X] real pixels.

  Returns:
    `Candidates` with [B, K, T] arrays.
  """
  full = nnx.merge(graphdef, params)
  model = vision.decoder(full)
  embeds = (None if pixel_values is None else vision.prompt_embeds(
      full, prompt_tokens, pixel_values, pixel_mask))
  b, _ = prompt_tokens.shape
  k, t = num_candidates, sampling.max_new_tokens
  r = b * k
  row_keys = _row_keys(key, prompt_index.astype(jnp.int32), k)
  step_keys = lambda step: jax.vmap(lambda rk: jax.random.fold_in(rk, step))(
      row_keys)
  prefix, own, logits_BV, last_pos = _prefill(
      model, prompt_tokens, prompt_mask.astype(bool), max(t - 1, 1), k,
      embeds)
  # Outside the decode loop: with scan_layers the weights are stacked once
  # per call, not once per token.
  layers = layer_stack.layer_states(model)
  state = _State(
      step=jnp.zeros((), jnp.int32),
      tokens=jnp.full((r, t), pad_id, jnp.int32),
      logps=jnp.zeros((r, t), jnp.float32),
      sample_logps=jnp.zeros((r, t), jnp.float32),
      done=jnp.zeros((r,), bool),
      positions=jnp.repeat(last_pos + 1, k), own=own)
  tok, lp, slp = choose(jnp.repeat(logits_BV, k, axis=0), step_keys(0),
                        sampling)
  state = _write(state, 0, tok, lp, slp, sampling.stop_ids, pad_id)

  def cond(s: _State):
    return (s.step + 1 < t) & ~jnp.all(s.done)

  def body(s: _State):
    last = jax.lax.dynamic_index_in_dim(s.tokens, s.step, axis=1,
                                        keepdims=False)
    logits, own = _decode(model, layers, prefix, s.own, last, s.positions,
                          s.step)
    step = s.step + 1
    tok, lp, slp = choose(logits, step_keys(step), sampling)
    s = dataclasses.replace(s, step=step, positions=s.positions + 1, own=own)
    return _write(s, step, tok, lp, slp, sampling.stop_ids, pad_id)

  state = jax.lax.while_loop(cond, body, state)

  cols = jnp.arange(t)[None, :]
  first_stop = jnp.min(jnp.where(_is_stop(state.tokens, sampling.stop_ids),
                                 cols, t), axis=-1)
  lengths = jnp.minimum(first_stop + 1, t)
  mask = cols < lengths[:, None]
  shape = lambda x: x.reshape((b, k) + x.shape[1:])
  return Candidates(
      tokens=shape(jnp.where(mask, state.tokens, pad_id)),
      lengths=shape(lengths.astype(jnp.int32)),
      finished=shape(first_stop < t),
      logps=shape(jnp.where(mask, state.logps, 0.0)),
      sample_logps=shape(jnp.where(mask, state.sample_logps, 0.0)),
      mask=shape(mask))


# ----------------------------------------------------------------------------
# Host-side helpers


def pad_prompts(token_lists: Sequence[Sequence[int]], pad_id: int, *,
                buckets: Sequence[int] | None = DEFAULT_BUCKETS
                ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompts to a bucketed length P.

  P is the smallest bucket holding the longest prompt; past the largest
  bucket, the next multiple of it.

  Returns:
    tokens np.int32[B, P], mask np.bool_[B, P].
  """
  n = max(len(s) for s in token_lists)
  if buckets:
    top = max(buckets)
    p = (tokenizer_lib.bucket_length(n, buckets) if n <= top
         else -(-n // top) * top)
  else:
    p = n
  return tokenizer_lib.pad_left(token_lists, pad_id, length=p)


def generate(model, tokenizer, messages_list: Sequence[Sequence[dict]], *,
             key, num_candidates: int = 1,
             sampling: SamplingParams = SamplingParams(),
             buckets: Sequence[int] | None = DEFAULT_BUCKETS
             ) -> list[list[str]]:
  """Text in, text out: K answers to each chat.

  Args:
    model: a `llama.Llama`.
    tokenizer: a `tokenizer.Tokenizer` (chat template, stop and pad ids).
    messages_list: B chats, each a list of {"role", "content"} dicts.
    key: PRNG key.
    num_candidates: K.
    sampling: the rule; empty stop_ids means the tokenizer's.
    buckets: prompt length buckets (see `pad_prompts`).

  Returns:
    B lists of K decoded answers (special tokens skipped).
  """
  if not sampling.stop_ids:
    sampling = dataclasses.replace(sampling, stop_ids=tokenizer.stop_ids)
  prompts = [tokenizer.encode_chat(m) for m in messages_list]
  tokens, mask = pad_prompts(prompts, tokenizer.pad_id, buckets=buckets)
  graphdef, params = nnx.split(model)
  cands = sample(graphdef, params, jnp.asarray(tokens), jnp.asarray(mask), key,
                 prompt_index=jnp.arange(len(prompts), dtype=jnp.int32),
                 num_candidates=num_candidates, sampling=sampling,
                 pad_id=tokenizer.pad_id)
  toks, lengths = np.asarray(cands.tokens), np.asarray(cands.lengths)
  return [[tokenizer.decode(toks[i, j, :lengths[i, j]])
           for j in range(num_candidates)] for i in range(len(prompts))]
