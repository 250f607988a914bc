"""Token sequences -> log-probs (METHOD.md steps 3 and 6).

`token_logps` runs the decoder once and projects to the vocabulary a chunk of
positions at a time, so a [B, T, V] f32 logits array (V = 152k for Qwen) is
never held at once; the chunk body is rematerialised in the backward pass.
`last_logps` gives the next-token distribution after the last position (the
judge's answer slot). Here B is any batch of rows and T the full row length
(prompt + response); rows are left-padded. `response_logps` scores M
responses to each of B prompts ([B, M, T]) with each prompt run once: the
response rows attend to their prompt's keys and values (what the trainers
call, inside jax.grad).

The functions take a model object and run inside the caller's jit (a train
step merges (graphdef, params) and calls them); `jitted_token_logps` /
`jitted_last_logps` are ready-jitted versions over (graphdef, state) for host
loops such as `self_scoring.score_group`. Which params are passed decides the
scorer: the policy snapshot or the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from purld_jax import structs
from purld_jax import vision
from purld_jax.models import layer_stack
from purld_jax.models import layers

# Most logits one chunk may hold when `vocab_chunk` is None: 2^27 f32 = 512 MiB.
_AUTO_CHUNK_ELEMENTS = 1 << 27
_NEG_INF = -1e30  # as in layers.py: masked slots weigh exactly 0


def _chunk(rows: int, n: int, vocab: int, vocab_chunk: int | None) -> int:
  if vocab_chunk is None:
    vocab_chunk = max(1, _AUTO_CHUNK_ELEMENTS // max(rows * vocab, 1))
  return max(1, min(vocab_chunk, n))


def _pick(logits_BCV: jax.Array, target_BC: jax.Array) -> jax.Array:
  """f32[B, C] logits_BCV[b, c, target_BC[b, c]], as a sum of the logits
  masked by (iota over V == target): exact (one term is not zero), and on
  vocab-parallel logits (V split across devices, sharding.py) a local
  masked sum then an all-reduce of [B, C], with no gather along V."""
  v = jax.lax.broadcasted_iota(jnp.int32, logits_BCV.shape, 2)
  return jnp.sum(jnp.where(v == target_BC[..., None], logits_BCV, 0.0),
                 axis=-1)


def _picked_logps(model, h_BND: jax.Array, target_BN: jax.Array,
                  vocab_chunk: int | None) -> jax.Array:
  """f32[B, N] log_softmax(logits(h))[target], a chunk of N at a time.

  Args:
    model: has `logits(h)` -> f32[..., V].
    h_BND: final-norm hidden states; N >= 1.
    target_BN: i32 token whose log-prob each position gives.
    vocab_chunk: see `token_logps`.
  """
  b, n, d = h_BND.shape
  vocab = jax.eval_shape(model.logits, h_BND[:1, :1]).shape[-1]
  c = _chunk(b, n, vocab, vocab_chunk)
  n_chunks = -(-n // c)
  pad = n_chunks * c - n
  h_pad = jnp.pad(h_BND, ((0, 0), (0, pad), (0, 0)))
  t_pad = jnp.pad(target_BN, ((0, 0), (0, pad)))
  h_c = h_pad.reshape(b, n_chunks, c, d).swapaxes(0, 1)  # [chunks, B, c, D]
  t_c = t_pad.reshape(b, n_chunks, c).swapaxes(0, 1)  # [chunks, B, c]

  @jax.checkpoint
  def one_chunk(args):
    h_bcd, t_bc = args
    logits_bcv = model.logits(h_bcd).astype(jnp.float32)
    return _pick(logits_bcv, t_bc) - jax.nn.logsumexp(logits_bcv, axis=-1)

  out = jax.lax.map(one_chunk, (h_c, t_c))  # [chunks, B, c]
  return out.swapaxes(0, 1).reshape(b, n_chunks * c)[:, :n]


def token_logps(model, tokens: jax.Array, attention_mask: jax.Array, *,
                positions: jax.Array | None = None,
                vocab_chunk: int | None = None,
                last: int | None = None, pixel_values=None,
                pixel_mask=None, image_at=None) -> jax.Array:
  """Log-prob of each token given the tokens before it.

  Args:
    model: a decoder with `hidden(tokens, positions=, attention_mask=)` ->
      [B, T, D] and `logits(h)` -> f32[..., V] (`models.llama.Llama`).
    tokens: i32[B, T], left-padded.
    attention_mask: bool[B, T], False on padding.
    positions: i32[B, T]; default: the model's (cumsum(mask) - 1).
    vocab_chunk: positions whose logits are materialised at once (B *
      vocab_chunk * V floats); None picks it from a 512 MiB budget.
    last: score only the last `last` columns (the others are 0): with left
      padding, where right-aligned responses are; the vocabulary projection
      is skipped everywhere else. None = every column.
    pixel_values, pixel_mask, image_at: a vision-language model's images
      of each row ([B, I, C, Y, X], [B, I, Y, X]) and where their tokens
      may be (bool[B, T], e.g. the prompt's columns): `vision.prompt_embeds`.

  Returns:
    f32[B, T]: out[:, t] = log p(tokens[:, t] | tokens[:, <t]); 0 where t = 0,
    where token t is padding, and where token t - 1 is padding (the first
    real token of a row has no context).
  """
  h = _hidden(model, tokens, positions, attention_mask, pixel_values,
              pixel_mask, image_at)
  model = vision.decoder(model)
  b, t, _ = h.shape
  if t == 1:
    return jnp.zeros((b, t), jnp.float32)
  n0 = 1 if last is None else max(1, t - last)  # first scored column
  out = _picked_logps(model, h[:, n0 - 1:-1], tokens[:, n0:], vocab_chunk)
  m = attention_mask.astype(bool)
  out = jnp.where(m[:, n0:] & m[:, n0 - 1:-1], out, 0.0)
  return jnp.concatenate([jnp.zeros((b, n0), jnp.float32), out], axis=1)


def last_logps(model, tokens: jax.Array, attention_mask: jax.Array, *,
               positions: jax.Array | None = None, pixel_values=None,
               pixel_mask=None) -> jax.Array:
  """f32[B, V] log p(next token | row) after the last column.

  With left padding the last column is each row's last real token, so this
  is the distribution of the token the row would continue with.
  """
  h = _hidden(model, tokens, positions, attention_mask, pixel_values,
              pixel_mask)
  model = vision.decoder(model)
  return jax.nn.log_softmax(model.logits(h[:, -1]).astype(jnp.float32),
                            axis=-1)


def _hidden(model, tokens, positions, attention_mask, pixel_values=None,
            pixel_mask=None, image_at=None):
  """Final-norm hidden [B, T, D] of the rows; with images, the vision tower
  once per row and its features at the image tokens (vision.py)."""
  if pixel_values is None:
    return vision.decoder(model).hidden(tokens, positions=positions,
                                        attention_mask=attention_mask)
  if positions is None:
    positions = vision.prompt_positions(model, tokens, attention_mask,
                                        pixel_values, image_at)
  return model.text.hidden(
      embeds=vision.prompt_embeds(model, tokens, pixel_values, pixel_mask,
                                  image_at),
      positions=positions, attention_mask=attention_mask)


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


@functools.partial(jax.jit, static_argnames=("graphdef", "vocab_chunk"))
def _response_logps_jit(graphdef, state, prompt_tokens, prompt_mask,
                        responses, response_mask, *, vocab_chunk,
                        pixel_values=None, pixel_mask=None):
  return response_logps(nnx.merge(graphdef, state), prompt_tokens,
                        prompt_mask, responses, response_mask,
                        vocab_chunk=vocab_chunk, pixel_values=pixel_values,
                        pixel_mask=pixel_mask)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _response_next_logps_jit(graphdef, state, pt, pm, r, rm, pv, pxm):
  return response_next_logps(nnx.merge(graphdef, state), pt, pm, r, rm,
                             pixel_values=pv, pixel_mask=pxm)


def jitted_response_logps(model, prompt_tokens, prompt_mask, responses,
                          response_mask, *, vocab_chunk=None,
                          pixel_values=None, pixel_mask=None) -> jax.Array:
  """`response_logps` compiled once per (model structure, shapes)."""
  graphdef, state = nnx.split(model)
  return _response_logps_jit(graphdef, state, prompt_tokens, prompt_mask,
                             responses, response_mask, vocab_chunk=vocab_chunk,
                             pixel_values=pixel_values, pixel_mask=pixel_mask)


def jitted_response_next_logps(model, prompt_tokens, prompt_mask, responses,
                               response_mask, pixel_values=None,
                               pixel_mask=None) -> jax.Array:
  """`response_next_logps` compiled once per (model structure, shapes)."""
  graphdef, state = nnx.split(model)
  return _response_next_logps_jit(graphdef, state, prompt_tokens, prompt_mask,
                                  responses, response_mask, pixel_values,
                                  pixel_mask)


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
                   vocab_chunk: int | None = None, pixel_values=None,
                   pixel_mask=None) -> jax.Array:
  """Per-token log-probs of M responses to each of B prompts, the prompt run
  once for its M responses.

  Equal to `token_logps` of the rows [left-padded prompt | right-padded
  response] (positions run on from the prompt into the response), without
  the M copies of the prompt: the B prompts are run once (`Llama.extend`,
  keys and values kept), then the B * M response rows attend to their
  prompt's keys and values plus their own, causally (`_response_hidden`).
  A response's first token is predicted from its prompt's last position.
  The last response column is never fed (nothing is predicted from it).
  Differentiable; the prompt's gradient sums over its M responses.

  Args:
    model: a `models.llama.Llama`, an `idefics3.Idefics3` or a
      `qwen2_vl.Qwen2VL`.
    prompt_tokens: i32[B, P] left-padded; prompt_mask: bool[B, P], at least
      one real token per row.
    responses: i32[B, M, T] right-padded; response_mask: bool[B, M, T].
    vocab_chunk: see `token_logps`.
    pixel_values: None, or f32[B, I, C, Y, X] the prompts' images: the
      vision tower runs once per prompt, its features join the prompt's
      prefill (`vision.prompt_embeds`), never M times.
    pixel_mask: None, or [B, I, Y, X] real pixels.

  Returns:
    f32[B, M, T]: log pi(y_t | x, y_<t); 0 outside `response_mask` and where
    the previous response token is padding (as in `token_logps`).
  """
  b, m, t = responses.shape
  pmask = prompt_mask.astype(bool)
  h_BPD, cache, start = _prefill_prompts(model, prompt_tokens, pmask,
                                         pixel_values, pixel_mask)
  model = vision.decoder(model)
  h_last = jnp.repeat(h_BPD[:, -1:], m, axis=0)  # [B * M, 1, D]
  tokens_RT = responses.reshape(b * m, t)
  mask_RT = response_mask.astype(bool).reshape(b * m, t)
  if t > 1:
    pos_RT = _response_positions(start, mask_RT, m)
    h_resp = _response_hidden(model, cache, pmask, tokens_RT[:, :-1],
                              pos_RT[:, :-1], mask_RT[:, :-1], m)
    h_last = jnp.concatenate([h_last, h_resp], axis=1)  # [B * M, T, D]
  lp = _picked_logps(model, h_last, tokens_RT, vocab_chunk)
  prev = jnp.concatenate(
      [jnp.repeat(pmask[:, -1:], m, axis=0), mask_RT[:, :-1]], axis=1)
  return jnp.where(mask_RT & prev, lp, 0.0).reshape(b, m, t)


def response_next_logps(model, prompt_tokens: jax.Array,
                        prompt_mask: jax.Array, responses: jax.Array,
                        response_mask: jax.Array, *, pixel_values=None,
                        pixel_mask=None) -> jax.Array:
  """f32[B, M, V] log p(next token | prompt, response) after each response's
  last real token, the prompt run once for its M responses.

  Equal to `last_logps` of the left-padded rows [prompt | response] (the
  judge's answer distribution when the response ends with the template's
  generation prompt). Every response needs at least one real token, and
  its real tokens must come first (right padding).

  Args:
    model: a `models.llama.Llama`.
    prompt_tokens: i32[B, P] left-padded; prompt_mask: bool[B, P].
    responses: i32[B, M, T] right-padded; response_mask: bool[B, M, T].
    pixel_values, pixel_mask: as `response_logps`.
  """
  b, m, t = responses.shape
  pmask = prompt_mask.astype(bool)
  _, cache, start = _prefill_prompts(model, prompt_tokens, pmask,
                                     pixel_values, pixel_mask)
  model = vision.decoder(model)
  mask_RT = response_mask.astype(bool).reshape(b * m, t)
  h_RTD = _response_hidden(model, cache, pmask, responses.reshape(b * m, t),
                           _response_positions(start, mask_RT, m), mask_RT, m)
  last_R = jnp.sum(mask_RT, axis=-1, dtype=jnp.int32) - 1
  h_RD = jnp.take_along_axis(h_RTD, last_R[:, None, None], axis=1)[:, 0]
  return jax.nn.log_softmax(model.logits(h_RD).astype(jnp.float32),
                            axis=-1).reshape(b, m, -1)


def _prefill_prompts(model, prompt_tokens, pmask_BP, pixel_values=None,
                     pixel_mask=None):
  """(final-norm hidden [B, P, D], KV cache of the B prompts, i32[B] the
  position a response's first token takes: the prompt's largest + 1);
  with images (a vision-language model) the vision tower runs once per
  prompt and its features are merged into the prompt's embeddings (a
  Qwen2.5-VL prompt also gets its M-RoPE positions)."""
  embeds = (None if pixel_values is None else vision.prompt_embeds(
      model, prompt_tokens, pixel_values, pixel_mask))
  mrope = vision.prompt_positions(model, prompt_tokens, pmask_BP,
                                  pixel_values)
  dec = vision.decoder(model)
  cache = dec.init_cache(prompt_tokens.shape[0], prompt_tokens.shape[1])
  h, cache = dec.extend(
      prompt_tokens, cache, attention_mask=pmask_BP, return_hidden=True,
      positions=(layers.default_positions(pmask_BP) if mrope is None
                 else mrope), embeds=embeds)
  start = (jnp.sum(pmask_BP, axis=-1, dtype=jnp.int32) if mrope is None
           else jnp.max(mrope, axis=(0, 2)) + 1)
  return h, cache, start


def _response_positions(start_B, mask_RT, m: int) -> jax.Array:
  """i32[R, T] positions of response tokens: on from their prompt's
  (`start_B`, the first response token's)."""
  return jnp.maximum(
      jnp.repeat(start_B, m)[:, None]
      + jnp.cumsum(mask_RT, axis=-1, dtype=jnp.int32) - 1, 0)


def _response_hidden(model, prefix: structs.KVCache, prompt_mask_BP,
                     tokens_RT, positions_RT, mask_RT, m: int) -> jax.Array:
  """Final-norm hidden [R, T, D] of R = B * M response rows (row b * M + j
  answers prompt b) over the prompts' keys and values in `prefix` ([L, B, P,
  G, H], read once per prompt, never copied M times) and their own.

  The layers' own projections, norms and MLP, as in `layers.Block`, through
  `layer_stack.over_layers` (the model's remat policy and layer scan).
  """
  cfg = model.cfg
  x = model.embed_tokens(tokens_RT)
  inv_freq = layers.rope_inv_freq(cfg)

  def block(layer, x, prefix_kv):
    q, k, v = layer.attn.project(layer.input_norm(x), positions_RT, inv_freq)
    o = _attend(q, k, v, *prefix_kv, prompt_mask_BP, mask_RT, m)
    x = x + layer.attn.output(o)
    return x + layer.mlp(layer.post_attn_norm(x)), None

  x, _ = layer_stack.over_layers(model, block, x, (prefix.k, prefix.v))
  return model.final_norm(x)


def _attend(q_RTNH, k_RTGH, v_RTGH, pk_BPGH, pv_BPGH, pmask_BP, mask_RT,
            m: int) -> jax.Array:
  """[R, T, N, H]: each query over its prompt's slots and its row's own
  slots up to itself, one softmax over both (`layers.Attention`'s math).

  The prompt part is one [M * T * Rq, H] x [H, P] product per (prompt, kv
  head), Rq = N // G query heads per kv head.
  """
  r, t, n, h = q_RTNH.shape
  b, g = pk_BPGH.shape[0], pk_BPGH.shape[2]
  dt = q_RTNH.dtype
  q = q_RTNH.reshape(b, m, t, g, n // g, h)
  k = k_RTGH.reshape(b, m, t, g, h)
  v = v_RTGH.reshape(b, m, t, g, h)
  lp = jnp.einsum("bmtgrh,bpgh->bmgrtp", q, pk_BPGH,
                  preferred_element_type=jnp.float32)
  lo = jnp.einsum("bmtgrh,bmsgh->bmgrts", q, k,
                  preferred_element_type=jnp.float32)
  logits = jnp.concatenate([lp, lo], axis=-1) * (h ** -0.5)
  p = pmask_BP.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  own = causal[None] & mask_RT.reshape(b * m, 1, t)  # [R, T, S]
  keep = jnp.concatenate(
      [jnp.broadcast_to(jnp.repeat(pmask_BP, m, axis=0)[:, None], (r, t, p)),
       own], axis=-1).reshape(b, m, 1, 1, t, p + t)
  logits = jnp.where(keep, logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(dt)
  out = (jnp.einsum("bmgrtp,bpgh->bmtgrh", probs[..., :p], pv_BPGH)
         + jnp.einsum("bmgrts,bmsgh->bmtgrh", probs[..., p:], v))
  return out.reshape(r, t, n, h)
