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
(`prefix_cache.prefill`); their keys and values stay [B, G, P, H] and the K
rows of a prompt read them together, so nothing is copied K times. A
`lax.while_loop` over a state dataclass (the structure of the Flax NNX Gemma
sampler) then feeds one token per row per step (`prefix_cache.decode_step`:
attention over the shared prompt cache plus each row's own cache of
generated tokens) and picks the next (`token_choice.choose`: temperature,
top-k, top-p, min-p) until every row has stopped or T tokens exist. The
caches live inside that jit, so XLA updates them in place (no copy per step:
checked in the compiled HLO); they never cross a call boundary, so there is
nothing to donate.

Here: SamplingParams and Candidates (the public types), `sample` (the loop),
and the host helpers `pad_prompts` and `generate` (text in, text out).

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

from purld_jax import prefix_cache
from purld_jax import token_choice
from purld_jax import vision
from purld_jax.models import layer_stack
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
  own: prefix_cache.Own


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
      vision-language `idefics3.Idefics3` or `qwen2_vl.Qwen2VL` (vision.py).
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
      that the K rows share (`vision.prompt_embeds`). A Qwen2.5-VL model's
      are f32[B, I, Q, K] (vision_qwen.py), its prompts get M-RoPE
      positions and decoding goes on from each row's largest + 1.
    pixel_mask: None, or [B, I, Y, X] real pixels ([B, I] for Qwen2.5-VL).

  Returns:
    `Candidates` with [B, K, T] arrays.
  """
  full = nnx.merge(graphdef, params)
  model = vision.decoder(full)
  embeds = (None if pixel_values is None else vision.prompt_embeds(
      full, prompt_tokens, pixel_values, pixel_mask))
  mrope = vision.prompt_positions(full, prompt_tokens, prompt_mask,
                                  pixel_values)
  b, _ = prompt_tokens.shape
  k, t = num_candidates, sampling.max_new_tokens
  r = b * k
  row_keys = _row_keys(key, prompt_index.astype(jnp.int32), k)
  step_keys = lambda step: jax.vmap(lambda rk: jax.random.fold_in(rk, step))(
      row_keys)
  prefix, own, logits_BV, last_pos = prefix_cache.prefill(
      model, prompt_tokens, prompt_mask.astype(bool), max(t - 1, 1), k,
      embeds, mrope)
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
  tok, lp, slp = token_choice.choose(jnp.repeat(logits_BV, k, axis=0),
                                     step_keys(0), sampling)
  state = _write(state, 0, tok, lp, slp, sampling.stop_ids, pad_id)

  def cond(s: _State):
    return (s.step + 1 < t) & ~jnp.all(s.done)

  def body(s: _State):
    last = jax.lax.dynamic_index_in_dim(s.tokens, s.step, axis=1,
                                        keepdims=False)
    logits, own = prefix_cache.decode_step(model, layers, prefix, s.own,
                                           last, s.positions, s.step)
    step = s.step + 1
    tok, lp, slp = token_choice.choose(logits, step_keys(step), sampling)
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
