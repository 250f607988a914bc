"""PU-RL with group advantages (METHOD.md steps 5-6, `recipe = "grpo"`).

The label distribution d over the group (the anchor as member K + 1, mass
only on likely positives under `pu.mode = "gate"`: purld_jax/pu.py) gives
advantages A_k = d_k - mean(d) (or over max(std(d), std_floor)); the update is the
PPO-style clipped ratio per token against the sampling policy's own
log-probs (returned by the sampler: no extra pass) with a k3 KL to the
frozen reference weighted by beta_kl. `inner_iterations` updates reuse one
sampled batch. With `ranking.scheme = "oracle"` the scores are verifiable
rewards and this is the oracle-reward GRPO baseline.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from purld_jax import losses
from purld_jax import pu as pu_lib
from purld_jax import scoring
from purld_jax.train import state as state_lib

STAGE = "grpo"


def advantages(scores, anchor_score, *, tau: float, normalize: str,
               mode: str = "gate", delta: float = 0.0, prior: float = 0.5,
               include_anchor: bool = True, anchor_fallback: bool = True,
               std_floor: float = 0.1, valid=None) -> np.ndarray:
  """A f32[B, K] for the candidates from scores [B, K] and s_a [B].

  The label distribution d over the group (the anchor as member K + 1 when
  include_anchor; `pu.listwise`), then A = d - mean(d) over all members
  [/ max(std, std_floor)] (`pu.advantages`); the anchor's own advantage is
  dropped: it is off-policy and never enters the PPO ratio. A group that
  gives no signal (`keep` False) or an invalid prompt gets A = 0.
  """
  scores, anchor_score = jnp.asarray(scores), jnp.asarray(anchor_score)
  d, keep = pu_lib.listwise(scores, anchor_score, mode=mode, tau=tau,
                            delta=delta, prior=prior,
                            include_anchor=include_anchor,
                            anchor_fallback=anchor_fallback)
  adv = pu_lib.advantages(d, normalize=normalize, std_floor=std_floor)
  adv = jnp.where(keep[:, None], adv[:, :scores.shape[-1]], 0.0)
  if valid is not None:
    adv = jnp.where(jnp.asarray(valid)[:, None], adv, 0.0)
  return np.asarray(adv, np.float32)


def _group_advantages(group, config) -> np.ndarray:
  pu, g = config.pu, config.loss.grpo
  return advantages(group.scores, group.anchor_score,
                    tau=config.preference.tau_label, normalize=g.advantage,
                    mode=pu.mode, delta=pu.delta, prior=pu.prior,
                    include_anchor=pu.include_anchor,
                    anchor_fallback=pu.anchor_fallback, std_floor=g.std_floor,
                    valid=group.valid)


def signal(group, config) -> np.ndarray:
  """bool[B] the groups with a non-zero advantage (`rl.oversample`)."""
  return np.any(_group_advantages(group, config) != 0, axis=-1)


def build_batch(group, config) -> dict:
  """Host arrays of one GRPO iteration from a `rollout.Group`."""
  k = group.k
  adv = _group_advantages(group, config)
  return dict(prompt_tokens=group.prompt_tokens,
              prompt_mask=group.prompt_mask,
              responses=group.members[:, :k],
              response_mask=group.member_mask[:, :k],
              old_logps=group.old_logps, advantages=adv, **group.images())


def reference_logps(model, batch: dict, *, vocab_chunk=None,
                    micro_batches: int = 1):
  """f32[B, K, T] the reference's log-probs of the candidates (once per
  iteration, before the inner updates), `micro_batches` slices of the
  prompts at a time (`state.map_micro`)."""
  keys = ("prompt_tokens", "prompt_mask", "responses", "response_mask",
          "pixel_values", "pixel_mask")
  return state_lib.map_micro(
      lambda mb: scoring.response_logps(
          model, mb["prompt_tokens"], mb["prompt_mask"], mb["responses"],
          mb["response_mask"], vocab_chunk=vocab_chunk,
          pixel_values=mb.get("pixel_values"),
          pixel_mask=mb.get("pixel_mask")),
      {k: batch[k] for k in keys if k in batch}, micro_batches)


def train_step(state: state_lib.TrainState, batch: dict, nan_at_step=-1, *,
               eps_low: float, eps_high: float, beta_kl: float,
               aggregation: str, schedule, grad_accum: int = 1,
               micro_batches: int = 1, vocab_chunk: int | None = None):
  """One clipped policy-gradient update. `batch` holds `ref_logps` (from
  `reference_logps`) when beta_kl > 0; `micro_batches` slices of its
  prompts run one at a time (`state.grad_step`). Pure; jit it."""
  max_len = batch["responses"].shape[-1]

  def loss_fn(params, mb):
    lp = scoring.response_logps(state.model(params), mb["prompt_tokens"],
                                mb["prompt_mask"], mb["responses"],
                                mb["response_mask"], vocab_chunk=vocab_chunk,
                                pixel_values=mb.get("pixel_values"),
                                pixel_mask=mb.get("pixel_mask"))
    loss, metrics = losses.grpo(
        lp, mb["old_logps"], mb.get("ref_logps"), mb["response_mask"],
        mb["advantages"], eps_low=eps_low, eps_high=eps_high,
        beta_kl=beta_kl, aggregation=aggregation, max_len=max_len)
    return state_lib.inject_nan(loss, state.step, nan_at_step), metrics

  return state_lib.grad_step(
      state, loss_fn, batch, schedule=schedule, grad_accum=grad_accum,
      micro_batches=micro_batches,
      weight_fn=lambda mb: losses.grpo_weight(mb["response_mask"],
                                              aggregation))


def step_kwargs(config) -> dict:
  g = config.loss.grpo
  return dict(eps_low=g.eps_low, eps_high=g.eps_high, beta_kl=g.beta_kl,
              aggregation=g.aggregation)
