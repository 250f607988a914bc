"""LlamaConfig.scan_layers: one lax.scan over stacked layer weights gives
what the unrolled layer loop gives (forward, cache, scoring, gradients,
sampling), and traces the layer once instead of L times."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.testing import assert_allclose, assert_array_equal

from purld_jax import sampling
from purld_jax import scoring
from purld_jax.models import layer_stack
from purld_jax.models import layers as layers_lib
from tests import core_fixtures

LAYERS = 3


def _pair(**overrides):
  """(unrolled, scanned) tiny models with the same weights."""
  make = lambda scan: core_fixtures.random_tiny_model(
      seed=3, num_layers=LAYERS, scan_layers=scan, **overrides)
  return make(False), make(True)


def _batch(seed=0, b=2, t=9):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(1, 128, (b, t)), jnp.int32)
  lead = np.array([0, 4] + [1] * (b - 2))[:b]
  mask = jnp.asarray(np.arange(t)[None] >= lead[:, None])
  return tokens, mask


def test_forward_logits_equal():
  loop, scan = _pair()
  tokens, mask = _batch()
  f = jax.jit(lambda m: m(tokens, attention_mask=mask))
  assert_allclose(f(scan), f(loop), atol=1e-5, rtol=1e-5)


def test_cached_prefill_and_decode_equal():
  loop, scan = _pair()
  tokens, mask = _batch()
  pos = layers_lib.default_positions(mask)

  @jax.jit
  def run(m):
    cache = m.init_cache(2, 12)
    logits, cache = m.extend(tokens, cache, positions=pos,
                             attention_mask=mask)
    nxt = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
    logits2, cache = m.extend(nxt, cache, positions=pos[:, -1:] + 1)
    return logits, logits2, cache

  for got, want in zip(jax.tree.leaves(run(scan)), jax.tree.leaves(run(loop))):
    assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_response_logps_and_gradients_equal(remat):
  """The shared-prefix scorer (the train steps' path) with the prompt
  prefill: value and every parameter's gradient."""
  loop, scan = _pair(remat=remat)
  pt, pm = _batch(seed=1)
  rng = np.random.default_rng(2)
  rt = jnp.asarray(rng.integers(1, 128, (2, 3, 5)), jnp.int32)
  rm = jnp.asarray(np.arange(5)[None, None] < np.array(
      [[5, 2, 1], [3, 5, 4]])[..., None])
  w = jnp.asarray(rng.normal(size=rt.shape), jnp.float32)
  loss = lambda m: jnp.sum(scoring.response_logps(m, pt, pm, rt, rm) * w)
  v0, g0 = jax.jit(jax.value_and_grad(loss))(loop)
  v1, g1 = jax.jit(jax.value_and_grad(loss))(scan)
  assert_allclose(v1, v0, rtol=1e-5)
  s0, s1 = nnx.state(g0), nnx.state(g1)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
    assert_allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_equal(temperature):
  """Same tokens and log-probs; 40 new tokens cross two own-cache chunks."""
  loop, scan = _pair()
  rng = np.random.default_rng(4)
  prompts = [[int(x) for x in rng.integers(1, 128, n)] for n in (5, 3, 9)]
  tokens, mask = sampling.pad_prompts(prompts, 0, buckets=(16,))
  sp = sampling.SamplingParams(max_new_tokens=40, temperature=temperature)

  def run(m):
    g, p = nnx.split(m)
    return jax.tree.map(np.asarray, sampling.sample(
        g, p, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(7),
        prompt_index=jnp.arange(3, dtype=jnp.int32), num_candidates=2,
        sampling=sp, pad_id=0))

  got, want = run(scan), run(loop)
  assert_array_equal(got.tokens, want.tokens)
  assert_array_equal(got.lengths, want.lengths)
  assert_allclose(got.logps, want.logps, atol=1e-5)


def _count(jaxpr, name: str) -> int:
  """Equations of primitive `name`, nested jaxprs included."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for v in eqn.params.values():
      inner = getattr(v, "jaxpr", None)
      if inner is not None:
        n += _count(getattr(inner, "jaxpr", inner), name)
  return n


@pytest.mark.parametrize("scan,grows", [(True, False), (False, True)])
def test_scan_traces_one_layer(scan, grows):
  """With the scan the program does not grow with the depth: the matmuls of
  2 and 4 layers are the same equations (compile time ~ one layer)."""
  tokens, mask = _batch()

  def dots(layers):
    m = core_fixtures.random_tiny_model(num_layers=layers, scan_layers=scan)
    jaxpr = jax.make_jaxpr(jax.grad(
        lambda m: jnp.sum(m(tokens, attention_mask=mask))))(m)
    return _count(jaxpr.jaxpr, "dot_general")

  assert (dots(4) > dots(2)) == grows
  if scan:
    assert dots(4) == dots(2)


def test_over_layers_visits_layers_in_order():
  """A body that records which layer it saw: layer l gets x_l and the
  carry of layer l - 1, in both modes (checked by hand: 10 * l + l)."""
  for scan in (False, True):
    m = core_fixtures.random_tiny_model(num_layers=LAYERS, scan_layers=scan)

    def body(layer, carry, x):
      del layer
      return carry * 10 + x, carry

    xs = jnp.arange(1, LAYERS + 1, dtype=jnp.int32)
    last, seen = layer_stack.over_layers(m, body, jnp.zeros((), jnp.int32), xs)
    assert int(last) == 123
    assert_array_equal(seen, [0, 1, 12])



def test_sampler_stacks_the_weights_once_not_per_token():
  """With the scan the layer weights are stacked before the decode loop
  (`layer_stack.layer_states` in `sampling.sample`), never inside its body."""
  m = core_fixtures.random_tiny_model(num_layers=LAYERS, scan_layers=True)
  g, p = nnx.split(m)
  sp = sampling.SamplingParams(max_new_tokens=4, temperature=1.0)
  jaxpr = jax.make_jaxpr(lambda p: sampling.sample.__wrapped__(
      g, p, jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), bool),
      jax.random.key(0), prompt_index=jnp.arange(2, dtype=jnp.int32),
      num_candidates=2, sampling=sp))(p).jaxpr

  def stacks(jaxpr, in_loop, out):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "stack":
        out[in_loop] += 1
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else [v]):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            stacks(inner, in_loop or eqn.primitive.name == "while", out)
    return out

  found = stacks(jaxpr, False, {False: 0, True: 0})
  assert found[True] == 0
  assert found[False] >= 9  # 9 weights per layer, stacked at least once
