"""Pure losses of the two stages: SFT NLL, DPO, GRPO and LDL (METHOD.md step 6).

Every loss is a pure function of arrays (log-probs, masks, advantages) and
keyword knobs, returning ``(loss f32[], metrics dict[str, f32[]])``. Nothing
here runs a model: `scoring.py` turns tokens into the log-probs these take.
Axis letters as in `structs.py`: B prompts, K candidates, T response tokens,
M preference pairs (or group members) per prompt.

Masks may be bool or float; they are cast to f32. Reductions are masked means
that return 0 (never NaN) when nothing is selected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
GRPO_AGGREGATIONS = ("token", "sequence", "dr_grpo")


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """sum(x * mask) / max(sum(mask), 1) over `axis` (all axes by default)."""
  m = _f32(mask)
  return jnp.sum(x * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


# ----------------------------------------------------------------------------
# Stage 1: SFT on anchors


def sft_nll(logps: jax.Array, mask: jax.Array):
  """Negative log-likelihood on response tokens only.

  Args:
    logps: f32[B, T] log pi(y_t | x, y_<t) of each target token.
    mask: bool/f32[B, T], True on response tokens (prompt and padding False).

  Returns:
    loss: mean NLL per response token over the whole batch (longer responses
      weigh more, as in token-level SFT).
    metrics: `nll` (= loss), `seq_nll` (mean over sequences of the summed
      NLL of each sequence), `seq_mean_nll` (mean over sequences of each
      sequence's per-token NLL), `ppl` = exp(nll), `tokens` (response tokens
      counted).
  """
  m = _f32(mask)
  nll_tok = -logps * m
  loss = jnp.sum(nll_tok) / jnp.maximum(jnp.sum(m), 1.0)
  n_b = jnp.sum(m, axis=-1)
  has = _f32(n_b > 0)
  seq_nll = jnp.sum(nll_tok, axis=-1)
  metrics = dict(
      nll=loss,
      seq_nll=masked_mean(seq_nll, has),
      seq_mean_nll=masked_mean(seq_nll / jnp.maximum(n_b, 1.0), has),
      ppl=jnp.exp(loss),
      tokens=jnp.sum(m))
  return loss, metrics


# ----------------------------------------------------------------------------
# DPO on pairs


def dpo(pol_chosen: jax.Array, pol_rejected: jax.Array,
        ref_chosen: jax.Array, ref_rejected: jax.Array, *,
        beta: float, loss_type: str = "sigmoid",
        label_smoothing: float = 0.0, pair_mask: jax.Array | None = None,
        reduce: str = "pairs"):
  """DPO and its variants on sequence log-probs.

  h = (pol_chosen - ref_chosen) - (pol_rejected - ref_rejected) per pair.
    sigmoid: -(1 - ls) log sig(beta h) - ls log sig(-beta h)
             (ls = label_smoothing: conservative DPO; ls = 0 is DPO).
    ipo:     (h - 1 / (2 beta))^2.
    hinge:   max(0, 1 - beta h) (SLiC).

  Args:
    pol_chosen, pol_rejected, ref_chosen, ref_rejected: f32[B] (one pair per
      prompt) or f32[B, M] (up to M pairs per prompt, e.g. from
      `preferences.margin_pairs`): summed log-probs of each sequence.
    beta: inverse temperature of the implicit reward.
    loss_type: one of DPO_LOSS_TYPES.
    label_smoothing: probability that a label is flipped (sigmoid only).
    pair_mask: bool[B] or bool[B, M], False on absent pairs; default all True.
    reduce: "pairs" averages over all valid pairs of the batch; "prompts"
      averages within each prompt first, then over prompts with >= 1 pair
      (a prompt with many pairs then weighs as much as one with a single pair).

  Returns:
    loss f32[] and metrics: `loss`, `margin` (mean beta h), `accuracy`
    (share of pairs with h > 0: the policy's implied preference agrees),
    `reward_chosen` / `reward_rejected` (mean beta (pol - ref)), `pairs`.
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"loss_type {loss_type!r} not in {DPO_LOSS_TYPES}")
  if reduce not in ("pairs", "prompts"):
    raise ValueError(f"reduce {reduce!r} not in ('pairs', 'prompts')")
  r_c = pol_chosen - ref_chosen
  r_r = pol_rejected - ref_rejected
  h = r_c - r_r
  if loss_type == "sigmoid":
    per = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
           - label_smoothing * jax.nn.log_sigmoid(-beta * h))
  elif loss_type == "ipo":
    per = (h - 1.0 / (2.0 * beta)) ** 2
  else:
    per = jax.nn.relu(1.0 - beta * h)
  m = jnp.ones(h.shape, jnp.float32) if pair_mask is None else _f32(pair_mask)
  if reduce == "prompts" and h.ndim == 2:
    per_prompt = masked_mean(per, m, axis=-1)
    loss = masked_mean(per_prompt, jnp.sum(m, axis=-1) > 0)
  else:
    loss = masked_mean(per, m)
  metrics = dict(
      loss=loss,
      margin=masked_mean(beta * h, m),
      accuracy=masked_mean(_f32(h > 0), m),
      reward_chosen=masked_mean(beta * r_c, m),
      reward_rejected=masked_mean(beta * r_r, m),
      pairs=jnp.sum(m))
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def dpo_weight(pair_mask: jax.Array, reduce: str = "pairs") -> jax.Array:
  """The denominator of `dpo`'s loss on a batch: valid pairs ("pairs") or
  prompts with >= 1 pair ("prompts"); micro-batches weigh by it
  (`state.grad_step`)."""
  m = _f32(pair_mask)
  if reduce == "prompts" and m.ndim == 2:
    return jnp.sum(_f32(jnp.sum(m, axis=-1) > 0))
  return jnp.sum(m)


def nnpu(pol_pos: jax.Array, ref_pos: jax.Array, pos_mask: jax.Array,
         pol_unl: jax.Array, ref_unl: jax.Array, unl_mask: jax.Array, *,
         beta: float, prior: float):
  """The non-negative PU risk (Kiryo et al., 2017) of the implicit reward
  r = beta (log pi - log pi_ref) of whole sequences, with the logistic loss
  l(z, y) = softplus(-y z) (`pu.mode = "nnpu"`, docs/METHOD.md step 4):

    R+ = mean_P l(r, +1),  R- = mean_U l(r, -1) - prior mean_P l(r, -1),
    risk = prior R+ + max(0, R-).

  The labelled positives P are the anchors, the unlabeled U the candidates,
  `prior` the positive share of U. Where R- < 0 (the unlabeled pushed
  further below than a positive share of them can be) the loss to descend
  is -R- alone (the non-negative correction, gamma = 1, beta = 0), so the
  candidates are pulled back up instead of further down.

  Args:
    pol_pos, ref_pos: f32[N] summed log-probs of the positives under the
      policy and the reference; pos_mask bool[N].
    pol_unl, ref_unl: f32[M] the same of the unlabeled; unl_mask bool[M].
    beta: inverse temperature of the implicit reward.
    prior: in (0, 1).

  Returns:
    the loss to descend f32[] and metrics: `loss` (the risk), `risk_pos`
    (prior R+), `risk_neg` (R-, before the max), `corrected` (1 where R- < 0),
    `reward_chosen` / `reward_rejected` (mean r of P / of U).
  """
  mp, mu = _f32(pos_mask), _f32(unl_mask)
  r_p = beta * (pol_pos - ref_pos)
  r_u = beta * (pol_unl - ref_unl)
  pos_plus = masked_mean(jax.nn.softplus(-r_p), mp)
  pos_minus = masked_mean(jax.nn.softplus(r_p), mp)
  neg = masked_mean(jax.nn.softplus(r_u), mu) - prior * pos_minus
  risk = prior * pos_plus + jnp.maximum(neg, 0.0)
  loss = jnp.where(neg < 0, -neg, risk)
  metrics = dict(loss=risk, risk_pos=prior * pos_plus, risk_neg=neg,
                 corrected=_f32(neg < 0), reward_chosen=masked_mean(r_p, mp),
                 reward_rejected=masked_mean(r_u, mu))
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


# ----------------------------------------------------------------------------
# GRPO on groups


def k3_kl(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
  """Per-token k3 estimator of KL(pi || pi_ref): e^(r-l) - (r - l) - 1 >= 0.

  Args:
    logps, ref_logps: f32[...] log-probs of the sampled tokens under the
      policy (l) and the reference (r).
  """
  d = ref_logps - logps
  return jnp.exp(d) - d - 1.0


def grpo(logps: jax.Array, old_logps: jax.Array | None,
         ref_logps: jax.Array | None, mask: jax.Array,
         advantages: jax.Array, *, eps_low: float = 0.2,
         eps_high: float = 0.2, beta_kl: float = 0.0,
         aggregation: str = "token", max_len: int | None = None):
  """PPO-clipped policy gradient with a k3 KL penalty to the reference.

  Per token: rho = exp(logps - old_logps),
    loss_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
             + beta_kl * k3(logps, ref_logps).
  Only sampled candidates enter here: the anchor is off-policy and must not
  (it may join `ldl` instead).

  Args:
    logps: f32[B, K, T] log pi_theta of each sampled token (differentiated).
    old_logps: f32[B, K, T] log pi_old at sampling time; None means on-policy
      (stop_gradient(logps): rho = 1, gradient A grad log pi).
    ref_logps: f32[B, K, T] log pi_ref; None only when beta_kl == 0.
    mask: bool/f32[B, K, T], True on completion tokens.
    advantages: f32[B, K] per candidate (`preferences.group_advantages`).
    eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] (DAPO
      clip-higher when eps_high > eps_low).
    beta_kl: weight of the k3 KL term.
    aggregation: how token losses become a scalar:
      "token": sum over all tokens / number of tokens (DAPO);
      "sequence": mean over each sequence's tokens, then over sequences
        with >= 1 token (GRPO);
      "dr_grpo": sum over all tokens / (sequences with >= 1 token * max_len)
        (Dr. GRPO: no length bias).
    max_len: the constant of "dr_grpo"; default T.

  Returns:
    loss f32[] and metrics: `loss`, `pg_loss`, `kl` (mean k3 per token),
    `clip_low` / `clip_high` (share of tokens where the lower / upper clip
    is active, i.e. its gradient is cut), `ratio_mean`, `ratio_min`,
    `ratio_max`, `entropy` (mean -logps over tokens: an on-policy estimate
    of the per-token entropy), `adv_mean`, `adv_std`, `tokens`.
  """
  if aggregation not in GRPO_AGGREGATIONS:
    raise ValueError(f"aggregation {aggregation!r} not in {GRPO_AGGREGATIONS}")
  m = _f32(mask)
  if old_logps is None:
    old_logps = jax.lax.stop_gradient(logps)
  a = advantages[..., None]
  ratio = jnp.exp(logps - old_logps)
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = -jnp.minimum(ratio * a, clipped * a)
  if ref_logps is None:
    if beta_kl != 0.0:
      raise ValueError("beta_kl != 0 needs ref_logps")
    kl = jnp.zeros_like(logps)
  else:
    kl = k3_kl(logps, ref_logps)
  per = pg + beta_kl * kl

  n_seq = jnp.sum(m, axis=-1)
  has = _f32(n_seq > 0)
  if aggregation == "token":
    reduce = lambda x: masked_mean(x, m)
  elif aggregation == "sequence":
    reduce = lambda x: masked_mean(masked_mean(x, m, axis=-1), has)
  else:
    t = logps.shape[-1] if max_len is None else max_len
    reduce = lambda x: jnp.sum(x * m) / jnp.maximum(jnp.sum(has) * t, 1.0)
  loss = reduce(per)

  big = jnp.finfo(jnp.float32).max
  sg = jax.lax.stop_gradient
  metrics = dict(
      loss=loss,
      pg_loss=reduce(pg),
      kl=masked_mean(kl, m),
      clip_low=masked_mean(_f32((ratio < 1.0 - eps_low) & (a < 0)), m),
      clip_high=masked_mean(_f32((ratio > 1.0 + eps_high) & (a > 0)), m),
      ratio_mean=masked_mean(ratio, m),
      ratio_min=jnp.min(jnp.where(m > 0, ratio, big)),
      ratio_max=jnp.max(jnp.where(m > 0, ratio, -big)),
      entropy=masked_mean(-logps, m),
      adv_mean=masked_mean(advantages, has),
      adv_std=jnp.sqrt(masked_mean(
          (advantages - masked_mean(advantages, has)) ** 2, has)),
      tokens=jnp.sum(m))
  return loss, jax.tree.map(sg, metrics)


def grpo_weight(mask: jax.Array, aggregation: str = "token") -> jax.Array:
  """The denominator of `grpo`'s loss on a batch: completion tokens
  ("token") or sequences with >= 1 token ("sequence", "dr_grpo"; the
  latter's max_len is a constant); micro-batches weigh by it
  (`state.grad_step`)."""
  m = _f32(mask)
  if aggregation == "token":
    return jnp.sum(m)
  return jnp.sum(_f32(jnp.sum(m, axis=-1) > 0))


# ----------------------------------------------------------------------------
# LDL: fit the label distribution with the policy's implicit group distribution


def _xlogy(x: jax.Array, y: jax.Array) -> jax.Array:
  """x log y with 0 log 0 = 0 (safe gradients where x == 0)."""
  safe = jnp.where(x > 0, y, 1.0)
  return jnp.where(x > 0, x * jnp.log(safe), 0.0)


def ldl(seq_logratio: jax.Array, label_dist: jax.Array,
        member_mask: jax.Array | None = None, *, beta: float):
  """KL(d || q) with q = softmax_m(beta * seq_logratio) over valid members.

  The policy's implicit distribution over the group, q, is fitted to the
  label distribution d (METHOD.md step 6, LDL). The anchor may be a member
  (e.g. member K of K+1): it is off-policy, so its log-ratio enters here and
  never a PPO ratio.

  Args:
    seq_logratio: f32[B, M] sum_t log pi_theta(y_t) - log pi_ref(y_t) of each
      member (differentiated through pi_theta).
    label_dist: f32[B, M] d, zero on masked members, summing to 1 over the
      valid ones (`preferences.label_distribution`); treated as a constant.
    member_mask: bool[B, M], False on absent members; default all True.
    beta: inverse temperature of the implicit distribution.

  Returns:
    loss: mean over prompts with >= 1 member of KL(d || q).
    metrics: `kl` (= loss), `top1_agree` (argmax q == argmax d, lowest
      index on ties), `entropy_label` (H(d)), `entropy_implied` (H(q)).
  """
  if member_mask is None:
    member_mask = jnp.ones(seq_logratio.shape, bool)
  member_mask = member_mask.astype(bool)
  d = jax.lax.stop_gradient(jnp.where(member_mask, label_dist, 0.0))
  # A large finite fill, not -inf: a row with no member stays NaN-free.
  z = jnp.where(member_mask, beta * seq_logratio, -1e30)
  log_q = jax.nn.log_softmax(z, axis=-1)
  log_q = jnp.where(member_mask, log_q, 0.0)
  kl_b = jnp.sum(_xlogy(d, d) - d * log_q, axis=-1)
  has = jnp.any(member_mask, axis=-1)
  loss = masked_mean(kl_b, has)
  q = jnp.where(member_mask, jnp.exp(log_q), 0.0)
  neg = jnp.where(member_mask, 0.0, -jnp.inf)
  agree = jnp.argmax(q + neg, axis=-1) == jnp.argmax(d + neg, axis=-1)
  metrics = dict(
      kl=loss,
      top1_agree=masked_mean(_f32(agree), has),
      entropy_label=masked_mean(-jnp.sum(_xlogy(d, d), axis=-1), has),
      entropy_implied=masked_mean(-jnp.sum(_xlogy(q, q), axis=-1), has))
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
