"""LlamaConfig.remat: each layer checkpointed, gradients unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.testing import assert_allclose

from purld_jax.models import layer_stack
from purld_jax.models import llama


def _setup():
  cfg = llama.tiny_config(num_layers=2)
  _, shapes = llama.abstract_model(cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: (0.02 * rng.standard_normal(x.shape) if len(x.shape) > 1
                 else np.ones(x.shape)).astype(np.float32), shapes)
  tokens = jnp.asarray(rng.integers(0, 128, (2, 7)), jnp.int32)
  mask = jnp.asarray(np.arange(7)[None] >= np.array([[0], [3]]))
  return cfg, params, tokens, mask


def _loss(cfg, params, tokens, mask):
  model = nnx.merge(llama.abstract_model(cfg)[0], params)
  logits = model(tokens, attention_mask=mask)
  return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)


def _remats(jaxpr) -> int:
  """remat equations in a jaxpr, nested jaxprs included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "remat2"
    for v in eqn.params.values():
      inner = getattr(v, "jaxpr", None)
      if inner is not None:
        n += _remats(getattr(inner, "jaxpr", inner))
  return n


@pytest.mark.parametrize("policy,count", [("none", 0), ("full", 2),
                                          ("dots", 2)])
def test_remat_wraps_each_layer(policy, count):
  cfg, params, tokens, mask = _setup()
  jaxpr = jax.make_jaxpr(lambda p: _loss(cfg.replace(remat=policy), p,
                                         tokens, mask))(params)
  assert _remats(jaxpr.jaxpr) == count  # one per layer, 2 layers


def test_remat_leaves_gradients_unchanged():
  cfg, params, tokens, mask = _setup()
  grad = lambda c: jax.jit(jax.value_and_grad(
      lambda p: _loss(c, p, tokens, mask)))(params)
  want_loss, want = grad(cfg)
  got_loss, got = grad(cfg.replace(remat="full"))
  assert_allclose(got_loss, want_loss, rtol=1e-6)
  jax.tree.map(lambda g, w: assert_allclose(g, w, atol=1e-7, rtol=1e-5),
               got, want)


def test_unknown_policy_is_named():
  with pytest.raises(ValueError, match="remat 'some' is not one of"):
    layer_stack.remat_policy("some")
