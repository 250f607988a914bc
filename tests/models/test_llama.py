"""Decoder invariants on a tiny random model: cache == full, padding, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from purld_jax.models import layers
from purld_jax.models import llama
from purld_jax.models import tokenizer as tok_lib


def _model(**kw):
  return llama.Llama(llama.tiny_config(**kw), rngs=nnx.Rngs(0))


def _rows(lengths, v=128, seed=0):
  rng = np.random.default_rng(seed)
  return [list(rng.integers(1, v, n)) for n in lengths]


@pytest.mark.parametrize("kw", [{}, dict(qkv_bias=True), dict(qk_norm=True),
                                dict(tie_word_embeddings=True)])
def test_cached_decode_equals_full_forward(kw):
  """Prefill a left-padded batch, then decode one token at a time."""
  model = _model(**kw)
  rows = _rows([7, 3, 5])
  full_tokens, full_mask = tok_lib.pad_left(rows, pad_id=0)
  full = np.asarray(model(jnp.asarray(full_tokens),
                          attention_mask=jnp.asarray(full_mask)))
  prefill_len = 4  # the first 4 columns, then 3 single-token steps
  tokens, mask = jnp.asarray(full_tokens), jnp.asarray(full_mask)
  positions = layers.default_positions(mask)
  cache = model.init_cache(3, 8)
  logits, cache = model.extend(tokens[:, :prefill_len], cache,
                               positions=positions[:, :prefill_len],
                               attention_mask=mask[:, :prefill_len])
  steps = [logits]
  step = jax.jit(lambda m, t, c, p: m.extend(t, c, positions=p))
  for t in range(prefill_len, 7):
    logits, cache = step(model, tokens[:, t:t + 1], cache, positions[:, t:t + 1])
    steps.append(logits)
  got = np.asarray(jnp.concatenate(steps, axis=1))
  real = np.asarray(mask)
  np.testing.assert_allclose(got[real], full[real], atol=1e-5, rtol=0)
  assert int(cache.end) == 7


def test_left_padding_does_not_change_a_row():
  model = _model()
  row = _rows([5])[0]
  alone = np.asarray(model(jnp.asarray([row], jnp.int32)))[0]
  tokens, mask = tok_lib.pad_left([row, _rows([9], seed=1)[0]], pad_id=0)
  padded = np.asarray(model(jnp.asarray(tokens),
                            attention_mask=jnp.asarray(mask)))[0]
  np.testing.assert_allclose(padded[-5:], alone, atol=1e-5, rtol=0)
  assert np.isfinite(padded).all()  # padded query rows stay finite


def test_pad_token_values_do_not_matter():
  model = _model()
  rows = _rows([3, 6])
  a, mask = tok_lib.pad_left(rows, pad_id=0)
  b, _ = tok_lib.pad_left(rows, pad_id=77)
  la = model(jnp.asarray(a), attention_mask=jnp.asarray(mask))
  lb = model(jnp.asarray(b), attention_mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(la)[mask], np.asarray(lb)[mask],
                             atol=1e-6, rtol=0)


def test_bf16_compute_close_to_f32():
  f32 = _model()
  bf16 = _model(dtype=jnp.bfloat16)  # same seed: same f32 params
  tokens = jnp.asarray(_rows([6]), jnp.int32)
  a, b = np.asarray(f32(tokens)), np.asarray(bf16(tokens))
  assert b.dtype == np.float32  # logits always come back in f32
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_param_dtype_is_storage_dtype():
  model = _model(param_dtype=jnp.bfloat16)
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}


def test_num_params_matches_state():
  for kw in [{}, dict(qkv_bias=True, qk_norm=True), dict(mlp_bias=True,
                                                         o_bias=True),
             dict(tie_word_embeddings=True)]:
    model = _model(**kw)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == model.cfg.num_params(), kw


def test_params_carry_logical_axis_names():
  model = _model()
  q = model.layers[0].attn.q_proj
  assert q.get_metadata()["out_sharding"] == ("embed", "q_heads", "head_dim")
  assert model.embed.get_metadata()["out_sharding"] == ("vocab",
                                                        "table_embed")


def test_rope_llama3_scaling_by_hand():
  """Frequencies below the low band are divided by factor, above kept.

  head_dim 4, theta 100: inv = [1, 0.1] (100^0 and 100^-0.5), wavelengths
  2pi ~ 6.28 and 62.8. With orig 16, low 1, high 4: low_wavelen = 16,
  high_wavelen = 4. 6.28 is in [4, 16]: smooth = (16/6.28 - 1)/3 = 0.5157,
  inv' = (1 - s)/8 + s = 0.5761. 62.8 > 16: inv' = 0.1/8 = 0.0125.
  """
  cfg = llama.tiny_config(head_dim=4, rope_theta=100.0,
                          rope_scaling=("llama3", 8.0, 1.0, 4.0, 16.0))
  s = (16 / (2 * np.pi) - 1) / 3
  np.testing.assert_allclose(np.asarray(layers.rope_inv_freq(cfg)),
                             [(1 - s) / 8 + s, 0.0125], rtol=1e-5)


def test_embed_tokens_in_chunks_equals_one_lookup(monkeypatch):
  """Over `_LOOKUP_ELEMENTS` the lookup runs a slice of T at a time (5
  tokens of 3 rows x 32 wide in chunks of 2, the last one padded)."""
  model = _model()
  tokens = jnp.asarray(np.arange(15).reshape(3, 5) * 7 % 128, jnp.int32)
  want = jnp.take(model.embed.value, tokens, axis=0)
  monkeypatch.setattr(llama, "_LOOKUP_ELEMENTS", 2 * 3 * 32)
  assert llama.lookup_chunk(3, 5, 32) == 2
  np.testing.assert_array_equal(model.embed_tokens(tokens), want)
