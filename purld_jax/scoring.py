"""Token sequences -> log-probs (METHOD.md steps 3 and 6).

`token_logps` runs the decoder once and projects to the vocabulary a chunk of
positions at a time, so a [B, T, V] f32 logits array (V = 152k for Qwen) is
never held at once; the chunk body is rematerialised in the backward pass.
`last_logps` gives the next-token distribution after the last position (the
judge's answer slot). Here B is any batch of rows (often B * K flattened) and
T the full row length (prompt + response); rows are left-padded.

The functions take a model object and run inside the caller's jit (a train
step merges (graphdef, params) and calls them); `jitted_token_logps` /
`jitted_last_logps` are ready-jitted versions over (graphdef, state) for host
loops such as `ranking.score_group`. Which params are passed decides the
scorer: the policy snapshot or the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

# Most logits one chunk may hold when `vocab_chunk` is None: 2^27 f32 = 512 MiB.
_AUTO_CHUNK_ELEMENTS = 1 << 27


def _chunk(rows: int, n: int, vocab: int, vocab_chunk: int | None) -> int:
  if vocab_chunk is None:
    vocab_chunk = max(1, _AUTO_CHUNK_ELEMENTS // max(rows * vocab, 1))
  return max(1, min(vocab_chunk, n))


def token_logps(model, tokens: jax.Array, attention_mask: jax.Array, *,
                positions: jax.Array | None = None,
                vocab_chunk: int | None = None) -> jax.Array:
  """Log-prob of each token given the tokens before it.

  Args:
    model: a decoder with `hidden(tokens, positions=, attention_mask=)` ->
      [B, T, D] and `logits(h)` -> f32[..., V] (`models.llama.Llama`).
    tokens: i32[B, T], left-padded.
    attention_mask: bool[B, T], False on padding.
    positions: i32[B, T]; default: the model's (cumsum(mask) - 1).
    vocab_chunk: positions whose logits are materialised at once (B *
      vocab_chunk * V floats); None picks it from a 512 MiB budget.

  Returns:
    f32[B, T]: out[:, t] = log p(tokens[:, t] | tokens[:, <t]); 0 where t = 0,
    where token t is padding, and where token t - 1 is padding (the first
    real token of a row has no context).
  """
  h = model.hidden(tokens, positions=positions, attention_mask=attention_mask)
  b, t, d = h.shape
  n = t - 1
  if n == 0:
    return jnp.zeros((b, t), jnp.float32)
  h_prev, target = h[:, :-1], tokens[:, 1:]
  vocab = jax.eval_shape(model.logits, h_prev[:1, :1]).shape[-1]
  c = _chunk(b, n, vocab, vocab_chunk)
  n_chunks = -(-n // c)
  pad = n_chunks * c - n
  h_prev = jnp.pad(h_prev, ((0, 0), (0, pad), (0, 0)))
  target = jnp.pad(target, ((0, 0), (0, pad)))
  h_c = h_prev.reshape(b, n_chunks, c, d).swapaxes(0, 1)  # [chunks, B, c, D]
  t_c = target.reshape(b, n_chunks, c).swapaxes(0, 1)  # [chunks, B, c]

  @jax.checkpoint
  def one_chunk(args):
    h_bcd, t_bc = args
    logits_bcv = model.logits(h_bcd).astype(jnp.float32)
    picked = jnp.take_along_axis(logits_bcv, t_bc[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits_bcv, axis=-1)

  out = jax.lax.map(one_chunk, (h_c, t_c))  # [chunks, B, c]
  out = out.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :n]
  m = attention_mask.astype(bool)
  out = jnp.where(m[:, 1:] & m[:, :-1], out, 0.0)
  return jnp.concatenate([jnp.zeros((b, 1), jnp.float32), out], axis=1)


def last_logps(model, tokens: jax.Array, attention_mask: jax.Array, *,
               positions: jax.Array | None = None) -> jax.Array:
  """f32[B, V] log p(next token | row) after the last column.

  With left padding the last column is each row's last real token, so this
  is the distribution of the token the row would continue with.
  """
  h = model.hidden(tokens, positions=positions, attention_mask=attention_mask)
  return jax.nn.log_softmax(model.logits(h[:, -1]).astype(jnp.float32),
                            axis=-1)


def seq_logps(token_logps_bt: jax.Array, mask: jax.Array) -> jax.Array:
  """f32[...] sum of log-probs over the masked positions of the last axis.

  Args:
    token_logps_bt: f32[..., T] (e.g. [B, K, T]).
    mask: bool/f32[..., T] positions that count (the response tokens).
  """
  return jnp.sum(token_logps_bt * mask.astype(jnp.float32), axis=-1)


def mean_logps(token_logps_bt: jax.Array, mask: jax.Array) -> jax.Array:
  """f32[...] length-normalised log-prob: the masked mean over the last axis
  (0 for rows with no masked position)."""
  m = mask.astype(jnp.float32)
  return (jnp.sum(token_logps_bt * m, axis=-1)
          / jnp.maximum(jnp.sum(m, axis=-1), 1.0))


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab_chunk"))
def _token_logps_jit(graphdef, state, tokens, attention_mask, *, vocab_chunk):
  return token_logps(nnx.merge(graphdef, state), tokens, attention_mask,
                     vocab_chunk=vocab_chunk)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _last_logps_jit(graphdef, state, tokens, attention_mask):
  return last_logps(nnx.merge(graphdef, state), tokens, attention_mask)


def jitted_token_logps(model, tokens, attention_mask, *,
                       vocab_chunk: int | None = None) -> jax.Array:
  """`token_logps` compiled once per (model structure, shapes)."""
  graphdef, state = nnx.split(model)
  return _token_logps_jit(graphdef, state, tokens, attention_mask,
                          vocab_chunk=vocab_chunk)


def jitted_last_logps(model, tokens, attention_mask) -> jax.Array:
  """`last_logps` compiled once per (model structure, shapes)."""
  graphdef, state = nnx.split(model)
  return _last_logps_jit(graphdef, state, tokens, attention_mask)


def response_logps(model, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                   responses: jax.Array, response_mask: jax.Array, *,
                   vocab_chunk: int | None = None) -> jax.Array:
  """Per-token log-probs of M responses to each of B prompts.

  Each row is [left-padded prompt | right-padded response], so positions
  (cumsum of the mask) run on from the prompt into the response.

  Args:
    model: a decoder (see `token_logps`).
    prompt_tokens: i32[B, P] left-padded; prompt_mask: bool[B, P].
    responses: i32[B, M, T] right-padded; response_mask: bool[B, M, T].
    vocab_chunk: see `token_logps`.

  Returns:
    f32[B, M, T]: log pi(y_t | x, y_<t); 0 outside `response_mask`.
  """
  b, m, t = responses.shape
  p = prompt_tokens.shape[1]
  tokens = jnp.concatenate(
      [jnp.repeat(prompt_tokens, m, axis=0), responses.reshape(b * m, t)], 1)
  mask = jnp.concatenate(
      [jnp.repeat(prompt_mask.astype(bool), m, axis=0),
       response_mask.reshape(b * m, t).astype(bool)], 1)
  lp = token_logps(model, tokens, mask, vocab_chunk=vocab_chunk)[:, p:]
  return jnp.where(response_mask, lp.reshape(b, m, t), 0.0)
