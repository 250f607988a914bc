"""PU-RL with label-distribution learning (METHOD.md step 6, `recipe = "ldl"`).

The policy's implied distribution over the group, softmax_k(beta * sum_t
log(pi/pi_ref)(y_k)), is fitted to the label distribution d = softmax(s /
tau_label) (mass only on likely positives and the anchor under `pu.mode =
"gate"`: purld_jax/pu.py) by KL(d || implied). With `pu.include_anchor` the anchor joins the
group as member K+1: it is off-policy, so it enters this loss (its log-ratio
is computed like any member's) and never a PPO ratio.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from purld_jax import losses
from purld_jax import pu as pu_lib
from purld_jax import scoring
from purld_jax.train import state as state_lib

STAGE = "ldl"


def _label_dist(group, config):
  """(d f32[B, M], ok bool[B]): `pu.listwise` over the members, and the
  valid groups it gives a signal."""
  pu = config.pu
  d, keep = pu_lib.listwise(jnp.asarray(group.scores),
                            jnp.asarray(group.anchor_score), mode=pu.mode,
                            tau=config.preference.tau_label, delta=pu.delta,
                            prior=pu.prior,
                            include_anchor=bool(pu.include_anchor),
                            anchor_fallback=pu.anchor_fallback)
  return d, np.asarray(keep) & np.asarray(group.valid, bool)


def signal(group, config) -> np.ndarray:
  """bool[B] the groups with a label distribution (`rl.oversample`)."""
  return _label_dist(group, config)[1]


def build_batch(group, config) -> dict:
  """Host arrays of one LDL step from a `rollout.Group`: d from
  `pu.listwise` over K (+ 1 with the anchor) members; a group that gives no
  signal is masked out."""
  d, ok = _label_dist(group, config)
  m = group.k + 1 if config.pu.include_anchor else group.k
  member_mask = np.ones((len(ok), m), bool) & ok[:, None]
  return dict(prompt_tokens=group.prompt_tokens,
              prompt_mask=group.prompt_mask, members=group.members[:, :m],
              token_mask=group.member_mask[:, :m],
              label_dist=np.asarray(d, np.float32), member_mask=member_mask,
              **group.images())


def _seq_logps(model, batch, vocab_chunk):
  return scoring.response_logps(model, batch["prompt_tokens"],
                                batch["prompt_mask"], batch["members"],
                                batch["token_mask"],
                                vocab_chunk=vocab_chunk,
                                pixel_values=batch.get("pixel_values"),
                                pixel_mask=batch.get("pixel_mask")).sum(-1)


def train_step(state: state_lib.TrainState, ref_params, batch: dict,
               nan_at_step=-1, *, beta: float, schedule, grad_accum: int = 1,
               micro_batches: int = 1, vocab_chunk: int | None = None):
  """One LDL update (the reference scored inside, per micro-batch). Pure;
  jit it."""
  def loss_fn(params, mb):
    ref = jax.lax.stop_gradient(_seq_logps(state.model(ref_params), mb,
                                           vocab_chunk))
    pol = _seq_logps(state.model(params), mb, vocab_chunk)
    loss, metrics = losses.ldl(pol - ref, mb["label_dist"],
                               mb["member_mask"], beta=beta)
    return state_lib.inject_nan(loss, state.step, nan_at_step), metrics

  return state_lib.grad_step(
      state, loss_fn, batch, schedule=schedule, grad_accum=grad_accum,
      micro_batches=micro_batches,
      weight_fn=lambda mb: jnp.sum(jnp.any(mb["member_mask"], axis=-1)))


def step_kwargs(config) -> dict:
  return dict(beta=config.loss.ldl.beta)
