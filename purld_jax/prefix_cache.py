"""The sampler's KV cache: one prompt prefix shared by K rows; each row's own.

Axis letters (structs.py): L layers, B prompts, K candidates, P prompt
tokens, G kv heads, H head dim, N query heads, V vocab; R = B*K decode rows,
row r = b * K + k; Rq = N // G query heads per kv head; C chunks of `CHUNK`
own slots.

  prefix, own, logits_BV, last_pos = prefix_cache.prefill(
      model, tokens_BP, mask_BP, slots, k)
  logits_RV, own = prefix_cache.decode_step(model, layers, prefix, own,
                                            tok_R, pos_R, col)

`prefill` runs the B prompts once (`Llama.extend` on [B, P]); their keys and
values stay `Prefix` [L, B, G, P, H] and the K rows of a prompt read them
together in one product per (prompt, kv head), so nothing is copied K
times. `decode_step` feeds one token per row (the model's own projections,
norms and MLP) with attention over the shared prompt cache plus the row's
`Own` cache of generated tokens, read a chunk at a time up to column `col`.
Both caches are constrained to the mesh's logical cache axes (sharding.py).
`sampling.sample` drives them inside one jit.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from purld_jax import sharding
from purld_jax.models import layer_stack
from purld_jax.models import layers as layers_lib


@flax.struct.dataclass
class Prefix:
  """The prompts' keys and values, written once, read by their K rows."""

  k: jax.Array  # [L, B, G, P, H]
  v: jax.Array  # [L, B, G, P, H]
  mask: jax.Array  # bool[B, P]


@flax.struct.dataclass
class Own:
  """Keys and values of each row's own generated tokens, in chunks of
  `CHUNK` slots so a step reads only the chunks written so far."""

  k: jax.Array  # [L, R, G, C, H, CHUNK], keys slot-minor for q.k
  v: jax.Array  # [L, R, G, C, CHUNK, H]   (C chunks)


CHUNK = 32
_NEG = -1e30  # finite, as in layers.py: masked slots weigh exactly 0


def _attend(q_RNH, pk_BGPH, pv_BGPH, pmask_BP, own: Own, layer, col):
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


def decode_step(model, layers, prefix: Prefix, own: Own, tok_R, pos_R, col):
  """Feeds one token per row: (logits f32[R, V], own cache with slot col).
  `layers` is `layer_stack.layer_states(model)`, built once per
  `sampling.sample` call.

  The same math as `Llama.extend` with T = 1 (its Block: attention and MLP
  with pre-norms, residuals), on the shared-prefix cache layout, through
  `layer_stack.over_layers` (scanned with `cfg.scan_layers`; never remat: no
  gradient flows through sampling).
  """
  cfg = model.cfg
  x = jnp.take(model.embed[...], tok_R[:, None], axis=0).astype(cfg.dtype)
  inv_freq = layers_lib.rope_inv_freq(cfg)
  zero = jnp.zeros((), jnp.int32)
  c, at = col // CHUNK, col % CHUNK

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


def prefill(model, tokens_BP, mask_BP, slots: int, k: int, embeds=None,
            positions=None):
  """Runs the prompts once: (prefix, empty own cache for B * K rows,
  logits f32[B, V] after the last prompt token, positions i32[B] of the
  last prompt token: the largest of its row, so decoding goes on at + 1).
  `model` is the decoder; `embeds` [B, P, D] (a prompt with images,
  `vision.prompt_embeds`) replace the tokens' embedding rows; `positions`
  (i32[3, B, P] M-RoPE, `vision.prompt_positions`) replace the default."""
  b, p = tokens_BP.shape
  mrope = positions is not None
  if not mrope:
    positions = layers_lib.default_positions(mask_BP)
  cache = model.init_cache(b, p)
  h, cache = model.extend(tokens_BP, cache, positions=positions,
                          attention_mask=mask_BP, return_hidden=True,
                          embeds=embeds)
  logits = model.logits(h[:, -1])
  prefix = Prefix(k=cache.k.swapaxes(2, 3), v=cache.v.swapaxes(2, 3),
                   mask=mask_BP)
  n_layers, _, _, g, h = cache.k.shape
  dt = cache.k.dtype
  c = -(-slots // CHUNK)
  own = Own(k=jnp.zeros((n_layers, b * k, g, c, h, CHUNK), dt),
             v=jnp.zeros((n_layers, b * k, g, c, CHUNK, h), dt))
  last = jnp.max(positions, axis=(0, 2)) if mrope else positions[:, -1]
  return _pin(prefix), _pin(own), logits, last


# Logical axes of the caches (sharding.py): rows like the batch, kv heads
# like kv_heads; a no-op outside `sharding.use_rules`.
_CACHE_NAMES = {
    (Prefix, "k"): ("cache_layers", "cache_batch", "cache_heads",
                     "cache_len", "cache_head_dim"),
    (Prefix, "v"): ("cache_layers", "cache_batch", "cache_heads",
                     "cache_len", "cache_head_dim"),
    (Own, "k"): ("cache_layers", "cache_batch", "cache_heads", None,
                  "cache_head_dim", None),
    (Own, "v"): ("cache_layers", "cache_batch", "cache_heads", None, None,
                  "cache_head_dim"),
}


def _pin(cache):
  """`cache` (Prefix or Own) with its arrays constrained to the mesh."""
  pin = lambda field: sharding.constrain(
      getattr(cache, field), _CACHE_NAMES[(type(cache), field)])
  return cache.replace(k=pin("k"), v=pin("v"))
