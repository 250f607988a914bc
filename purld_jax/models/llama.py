"""One Flax NNX decoder for Llama 2/3.x, SmolLM2, Qwen2/2.5 and Qwen3.

Axis letters (see structs.py): B batch, T tokens of this call, S cache slots,
L layers, V vocab, D width, N query heads, G kv heads, H head dim, F mlp,
R = N // G query heads per kv head.

The families differ only in switches of `LlamaConfig`:
  Llama 2/3.x, SmolLM2  no biases, rope scaling "llama3" for 3.1+
  Qwen2 / 2.5           q/k/v biases (`qkv_bias`)
  Qwen3                 RMSNorm on q and k per head (`qk_norm`)

Three entry points share one `_forward`:
  `model(tokens, positions, attention_mask)` -> logits f32[B, T, V]
  `model.hidden(...)`                        -> final-norm hidden [B, T, D]
  `model.extend(tokens, cache, ...)`         -> (logits, cache): writes T
    tokens into the cache at `cache.end`; prefill (empty cache, T = P) and
    decode (T = 1) are both this call.
Each also takes `embeds=` [B, T, D] in place of the tokens' embedding rows
(a vision-language model's merged text and image embeddings, idefics3.py);
without it the tokens are looked up as always (`embed_tokens`).

Every parameter carries logical axis names (`sharding_names` metadata):
weights use vocab, table_embed (D of the embedding table and lm_head),
embed, q_heads, kv_heads, head_dim, mlp. `LlamaConfig.lora` adds LoRA
adapters (`nnx.LoRAParam`) beside the projections: models/lora.py.

Beside this file: llama_config.py (`LlamaConfig`, `tiny_config`, both
re-exported here), layers.py (RoPE, RMSNorm, Attention, MLP, Block,
`default_positions`), layer_stack.py (`over_layers`, `layer_states`, the
remat policies).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from purld_jax import sharding
from purld_jax import structs
from purld_jax.models import layer_stack
from purld_jax.models import layers
from purld_jax.models import llama_config

# Re-exported: most callers build configs as `llama.LlamaConfig(...)`.
LlamaConfig = llama_config.LlamaConfig
tiny_config = llama_config.tiny_config

_ACT = ("act_batch", "act_len", "act_embed")
_TABLE = ("vocab", "table_embed")  # the embedding table [V, D]


class Llama(nnx.Module):
  """The decoder. See the module docstring for the three entry points."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.param_dtype
    self.embed = layers.param(rngs, (cfg.vocab_size, cfg.hidden_size), _TABLE,
                              pd)
    self.layers = nnx.List([layers.Block(cfg, rngs=rngs)
                            for _ in range(cfg.num_layers)])
    self.final_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                     name="embed", param_dtype=pd, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.param(rngs, (cfg.hidden_size, cfg.vocab_size),
                                 _TABLE[::-1], pd)

  # -- helpers ---------------------------------------------------------------

  def init_cache(self, batch: int, size: int, dtype=None) -> structs.KVCache:
    """An empty cache of `size` slots for `batch` rows."""
    cfg = self.cfg
    shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return structs.KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                           mask=jnp.zeros((batch, size), bool),
                           end=jnp.zeros((), jnp.int32))

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """f32[..., V] logits from final-norm hidden states [..., D].

    Vocab-parallel under a mesh (sharding.py): the result is split on V
    like the table's rows (`act_vocab`) and on the leading axis by
    `logits_batch`, so each device multiplies the hidden states of its
    rows (gathered across the V axes: small) by its own table rows; the
    table is never gathered.
    """
    dt = self.cfg.dtype
    lead = ("logits_batch",) + (None,) * (h_BTD.ndim - 2)
    h = sharding.constrain(h_BTD.astype(dt), lead + ("act_embed",))
    if self.cfg.tie_word_embeddings:
      out = jnp.einsum("...d,vd->...v", h, self.embed.value.astype(dt),
                       preferred_element_type=jnp.float32)
    else:
      out = jnp.einsum("...d,dv->...v", h, self.lm_head.value.astype(dt),
                       preferred_element_type=jnp.float32)
    return sharding.constrain(out, lead + ("act_vocab",))

  def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
    """[B, T, D] embedding rows of i32 tokens, in the compute dtype.

    Under a mesh the table is split on V (sharding.py): each device gathers
    the rows it holds (zero elsewhere) for every row of its data shard, and
    the results are summed over the V shards, then cut to its own rows
    (XLA's gather partitioning). That sum is data / (data x fsdp) of the
    batch per device (all of it with data = 1: Llama 3.1 8B on fsdp 16 x
    tensor 2, 1 GiB f32 per copy), so it runs `_LOOKUP_ELEMENTS` at a time
    over T (`lookup_chunk`).
    """
    table, dt = self.embed.value, self.cfg.dtype

    def lookup(tok_BC):
      return sharding.constrain(jnp.take(table, tok_BC, axis=0).astype(dt),
                                _ACT)

    b, t = tokens_BT.shape
    c = lookup_chunk(b, t, self.cfg.hidden_size)
    if c == t:
      return lookup(tokens_BT)
    n = -(-t // c)
    tok = jnp.pad(tokens_BT, ((0, 0), (0, n * c - t)))
    x = jax.lax.map(lookup, tok.reshape(b, n, c).swapaxes(0, 1))
    return sharding.constrain(x.swapaxes(0, 1).reshape(b, n * c, -1)[:, :t],
                              _ACT)

  def _forward(self, tokens_BT, positions_BT, attention_mask_BT, cache,
               embeds_BTD=None):
    cfg = self.cfg
    if embeds_BTD is None:
      b, t = tokens_BT.shape
    else:
      b, t = embeds_BTD.shape[:2]
    if attention_mask_BT is None:
      attention_mask_BT = jnp.ones((b, t), bool)
    attention_mask_BT = attention_mask_BT.astype(bool)
    if positions_BT is None:
      if cache is not None:
        raise ValueError("a cached forward needs explicit positions")
      positions_BT = layers.default_positions(attention_mask_BT)
    if embeds_BTD is None:
      x = self.embed_tokens(tokens_BT)
    else:
      x = sharding.constrain(embeds_BTD.astype(cfg.dtype), _ACT)
    inv_freq = layers.rope_inv_freq(cfg)
    if cache is None:
      causal = jnp.tril(jnp.ones((t, t), bool))
      mask = causal[None] & attention_mask_BT[:, None, :]
      write_at = jnp.zeros((), jnp.int32)
      slot_mask = None
    else:
      write_at = cache.end
      slot_mask = jax.lax.dynamic_update_slice(
          cache.mask, attention_mask_BT, (jnp.zeros((), jnp.int32), write_at))
      slots = jnp.arange(cache.size)
      q_slot = write_at + jnp.arange(t)
      causal = slots[None, :] <= q_slot[:, None]  # [T, S]
      mask = causal[None] & slot_mask[:, None, :]

    def layer_step(layer, x, kv):
      kc, vc = (None, None) if kv is None else kv
      x, kc, vc = layer(x, positions_BT, inv_freq, kc, vc, mask, write_at)
      x = sharding.constrain(x, _ACT)
      return x, (None if kv is None else (kc, vc))

    x, new_kv = layer_stack.over_layers(
        self, layer_step, x, None if cache is None else (cache.k, cache.v))
    h = self.final_norm(x)
    if cache is None:
      return h, None
    new_cache = structs.KVCache(k=new_kv[0], v=new_kv[1],
                                mask=slot_mask, end=cache.end + t)
    return h, new_cache

  # -- entry points ----------------------------------------------------------

  def hidden(self, tokens=None, *, positions=None, attention_mask=None,
             embeds=None):
    """Final-norm hidden states [B, T, D] (no vocab projection)."""
    return self._forward(tokens, positions, attention_mask, None, embeds)[0]

  def __call__(self, tokens=None, *, positions=None, attention_mask=None,
               embeds=None):
    """Logits f32[B, T, V] of a plain (uncached) forward.

    Args:
      tokens: i32[B, T]; ignored (may be None) when `embeds` is given.
      positions: i32[B, T]; default
        `layers.default_positions(attention_mask)`. With
        `cfg.mrope_section`, also M-RoPE's i32[3, B, T] (qwen2_vl.py).
      attention_mask: bool[B, T], False on padding; default all True.
      embeds: optional [B, T, D] input embeddings used instead of the
        tokens' rows of the table (cast to the compute dtype).
    """
    return self.logits(self.hidden(tokens, positions=positions,
                                   attention_mask=attention_mask,
                                   embeds=embeds))

  def extend(self, tokens, cache: structs.KVCache, *, positions,
             attention_mask=None, return_hidden: bool = False, embeds=None):
    """Cached forward: writes T tokens into the cache at `cache.end`.

    Args:
      tokens: i32[B, T]; ignored (may be None) when `embeds` is given.
      cache: the cache, with `cache.end + T <= S`.
      positions: i32[B, T] RoPE positions of these tokens (M-RoPE:
        i32[3, B, T], qwen2_vl.py).
      attention_mask: bool[B, T] which of these tokens are real.
      return_hidden: return final-norm hidden states instead of logits.
      embeds: optional [B, T, D] input embeddings in place of the tokens'
        (a prompt with images, idefics3.py).

    Returns:
      (f32[B, T, V] logits or [B, T, D] hidden, the updated cache).
    """
    h, cache = self._forward(tokens, positions, attention_mask, cache, embeds)
    return (h if return_hidden else self.logits(h)), cache


# Most embedding values one lookup chunk holds over all rows: 2^24 (64 MiB
# of f32 over the devices of a data shard; `Llama.embed_tokens`).
_LOOKUP_ELEMENTS = 1 << 24


def lookup_chunk(rows: int, length: int, width: int) -> int:
  """Positions of [rows, length] tokens embedded at once (width D): all of
  them when rows * length * D <= _LOOKUP_ELEMENTS, else a slice of T."""
  return max(1, min(length, _LOOKUP_ELEMENTS // max(rows * width, 1)))


@functools.lru_cache(maxsize=8)
def abstract_model(cfg: LlamaConfig):
  """(graphdef, param shapes) of `Llama(cfg)` without allocating weights.

  The shapes are a nested dict of `jax.ShapeDtypeStruct` in NNX's pure-dict
  layout; `nnx.merge(graphdef, arrays_like_shapes)` builds a model. Cached:
  tracing the initialiser of a 30-layer model takes seconds.
  """
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(state))
  return graphdef, shapes
