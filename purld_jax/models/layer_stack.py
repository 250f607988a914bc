"""Running the decoder's L layers: a Python loop or one `lax.scan` over
their stacked parameters, each layer under the remat policy.

Axis letters (see structs.py): L layers; the stacked states carry L as their
leading axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from purld_jax import sharding

REMAT_POLICIES = ("none", "full", "dots")


def remat_policy(name: str):
  """The `jax.checkpoint` policy of a `LlamaConfig.remat` name (None for
  "none": no checkpointing)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat {name!r} is not one of {REMAT_POLICIES}")
  return {"none": None,
          "full": jax.checkpoint_policies.nothing_saveable,
          "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
          }[name]


def layer_states(model):
  """(the layers' shared graph definition, their states): stacked on a
  leading axis L with `model.cfg.scan_layers` (each call stacks a copy of
  the weights: build it once outside a loop that runs the layers many
  times, as the sampler's decode does), else a list of L states."""
  splits = [nnx.split(layer) for layer in model.layers]
  states = [state for _, state in splits]
  if model.cfg.scan_layers:
    states = _stack_layers(model, states)
  return splits[0][0], states


def over_layers(model, body, carry, xs=None, *, remat: str | None = None,
                layers=None):
  """Runs `body(layer, carry, x_l) -> (carry, y_l)` through the L layers.

  With `model.cfg.scan_layers`, one `lax.scan` over the layers' parameters
  stacked on a leading axis (the layers share one graph definition), else a
  Python loop. Each layer's step runs under `jax.checkpoint` with the remat
  policy (`remat`, default `model.cfg.remat`). Both give the same values.

  Args:
    model: a `llama.Llama`.
    body: a pure function of (a `layers.Block`, carry, x_l).
    carry: a pytree threaded through the layers.
    xs: None or a pytree of arrays with leading axis L; layer l sees x_l.
    remat: overrides `model.cfg.remat`.
    layers: `layer_states(model)`, when the caller built it already.

  Returns:
    (the last carry, the y_l stacked on a leading axis L; None if every y_l
    is None).
  """
  policy = remat_policy(model.cfg.remat if remat is None else remat)
  layer_def, states = layers if layers is not None else layer_states(model)

  def step(state, c, x):
    return body(nnx.merge(layer_def, state), c, x)

  if policy is not None:
    step = jax.checkpoint(step, policy=policy, prevent_cse=False)
  if model.cfg.scan_layers:
    return jax.lax.scan(lambda c, sx: step(sx[0], c, sx[1]), carry,
                        (states, xs))
  ys = []
  for l, state in enumerate(states):
    x = None if xs is None else jax.tree.map(lambda a, l=l: a[l], xs)
    carry, y = step(state, carry, x)
    ys.append(y)
  if all(y is None for y in ys):
    return carry, None
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _stack_layers(model, states):
  """The layers' states stacked on a leading axis L, each stack constrained
  to the parameter's own sharding (`sharding_names`) with L unsharded: an
  FSDP-sharded weight stays sharded in the stack, not gathered whole."""
  names = sharding.logical_axes(model.layers[0])

  def stack(path, *leaves):
    node = names
    for key in path:
      if isinstance(key, jax.tree_util.DictKey):
        node = node[key.key]
    return sharding.constrain(jnp.stack(leaves), (None,) + tuple(node))

  return jax.tree_util.tree_map_with_path(stack, *states)
