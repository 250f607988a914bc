"""Independent expectations of what one train step does: the direction of
the update, derived by hand from each loss's definition, and the learning
rate schedule, derived from `state.make_schedule`'s docstring formula.

The other train-step tests compare the code with itself (sliced, sharded,
compacted), so a sign error shared by every path passes them. Here:

* DPO / GRPO / LDL: one plain-SGD update (optax.sgd, no clipping, no Adam)
  of the tiny random model on a hand-made batch, at a point where the loss's
  gradient has a closed form (reference = policy, PPO ratio = 1). We score
  the members ourselves (`scoring.response_logps`) before and after and
  check that the quantity the loss should increase increases; and that the
  parameter change equals lr x the gradient of a hand-weighted sum of the
  members' sequence log-probs (the chain rule through the loss done by
  hand: only `response_logps` and `jax.grad` are shared with the code).
* The schedule and the optimizer a stage builds (`optimizer_from_config`)
  span every optimizer update of the stage: rl.steps x inner iterations /
  grad_accum, so the cosine does not reach its floor before the last update.

The three train-step tests share one batch shape, so the scorer and its
gradient compile once.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from numpy.testing import assert_allclose

from purld_jax import scoring
from purld_jax.train import dpo
from purld_jax.train import grpo
from purld_jax.train import ldl
from purld_jax.train import state as state_lib
from tests import core_fixtures
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)

B, M, P, T = 2, 3, 5, 6  # prompts, members per prompt, prompt / member length
LR = 2e-4    # plain SGD: params -= LR * grad; small: first-order regime
# A "rise" is more than this (f32 noise on a sum of 6 log-probs ~ -30: 4e-6).
TOL = 1e-4
_TX = optax.sgd(LR)      # one object: the state's static tx is shared
_SCHEDULE = lambda count: LR


@pytest.fixture(scope="module")
def tiny(jit_cache):  # noqa: F811  (the persistent compilation cache)
  """(graphdef, params, logps, weighted_grad) of a tiny random model:
  logps(params, batch) -> f32[B, M, T] per-token log-probs of the members;
  weighted_grad(params, batch, w) -> grad of sum_bm w[b, m] log pi(y_bm)."""
  graphdef, params = nnx.split(core_fixtures.random_tiny_model(seed=3))

  def logps(params, batch):
    return scoring.response_logps(
        nnx.merge(graphdef, params), batch["prompt_tokens"],
        batch["prompt_mask"], batch["members"], batch["member_mask"])

  def weighted(params, batch, w):
    return jnp.sum(w * logps(params, batch).sum(-1))

  return graphdef, params, jax.jit(logps), jax.jit(jax.grad(weighted))


def _members(seed=0):
  """B left-padded prompts, M right-padded members of various lengths."""
  rng = np.random.default_rng(seed)
  lens = np.array([[6, 4, 5], [3, 6, 2]])
  return dict(
      prompt_tokens=rng.integers(4, 128, (B, P)).astype(np.int32),
      prompt_mask=np.arange(P)[None, :] >= np.array([0, 2])[:, None],
      members=rng.integers(4, 128, (B, M, T)).astype(np.int32),
      member_mask=np.arange(T)[None, None, :] < lens[..., None])


def _seq(logps, params, batch):
  """f64[B, M] summed log-probs of the members, scored by us."""
  return np.asarray(logps(params, batch), np.float64).sum(-1)


def _assert_update_is(old, new, expected):
  """new - old == expected (pytrees), as a direction (cosine) and a size;
  the tolerance covers float32 rounding of params ~0.1 moved by ~1e-3."""
  delta = np.concatenate([np.ravel(np.asarray(n, np.float64) - np.asarray(o))
                          for n, o in zip(jax.tree.leaves(new),
                                          jax.tree.leaves(old))])
  want = np.concatenate([np.ravel(np.asarray(e, np.float64))
                         for e in jax.tree.leaves(expected)])
  assert np.linalg.norm(want) > 0
  cos = delta @ want / (np.linalg.norm(delta) * np.linalg.norm(want))
  assert cos > 0.999, f"update not along the hand-derived direction: {cos}"
  assert_allclose(np.linalg.norm(delta), np.linalg.norm(want), rtol=2e-3)


def _state(graphdef, params):
  return state_lib.TrainState.create(graphdef, params, _TX,
                                     rng=jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------
# DPO


def test_dpo_step_raises_chosen_over_rejected(tiny):
  """Catches chosen and rejected swapped (in losses.dpo or in
  dpo.train_step's gather): the policy's log pi(chosen) - log pi(rejected)
  would fall instead of rise.

  With reference = policy the margin h = (pol_c - ref_c) - (pol_r - ref_r)
  is 0, so d/dh of -log sigmoid(beta h) is -beta/2 and one SGD step with
  reduce "pairs" over N pairs moves the params by
  lr * beta / (2 N) * sum_pairs grad (log pi(chosen) - log pi(rejected)),
  which raises every pair's log-prob gap to first order.
  """
  graphdef, params, logps, weighted_grad = tiny
  beta = 0.5
  # prompt 0: member 0 over 1; prompt 1: member 2 over 0 (not index order).
  chosen, rejected = np.array([[0], [2]]), np.array([[1], [0]])
  batch = dict(_members(), chosen=chosen.astype(np.int32),
               rejected=rejected.astype(np.int32),
               pair_mask=np.ones((B, 1), bool))
  step = jax.jit(functools.partial(
      dpo.train_step, beta=beta, loss_type="sigmoid", label_smoothing=0.0,
      reduce="pairs", schedule=_SCHEDULE))
  new, metrics = step(_state(graphdef, params), params, batch)
  assert float(metrics["skipped"]) == 0.0
  rows = np.arange(B)
  gap = lambda s: s[rows, chosen[:, 0]] - s[rows, rejected[:, 0]]
  before, after = _seq(logps, params, batch), _seq(logps, new.params, batch)
  rise = gap(after) - gap(before)
  assert np.all(rise > TOL), f"log pi(chosen) - log pi(rejected): {rise}"
  # The update itself, from the loss's gradient at h = 0 worked by hand.
  w = np.zeros((B, M), np.float32)
  w[rows, chosen[:, 0]] += beta / (2 * B)
  w[rows, rejected[:, 0]] -= beta / (2 * B)
  grad = weighted_grad(params, batch, w)
  _assert_update_is(params, new.params, jax.tree.map(lambda g: LR * g, grad))


def test_nnpu_step_raises_the_anchor_over_the_candidates(tiny):
  """Catches the anchors and the candidates swapped in pu.mode "nnpu" (the
  positive and unlabeled sides of losses.nnpu): the anchor's log-prob
  would fall relative to the candidates'.

  Member 2 is each prompt's anchor, members 0 and 1 its candidates (the
  pairs make_pairs gives under nnpu). With reference = policy every
  implicit reward r is 0, so R- = log 2 - prior log 2 > 0 (no correction)
  and d risk / d r is -prior / B for each of the B anchors (prior/2 from
  R+, prior/2 from R-'s positive part) and +1 / (2 N_u) for each of the N_u
  candidates: one SGD step moves the params by lr beta (prior / B
  grad log pi(anchor) - 1 / (2 N_u) sum grad log pi(candidate)).
  """
  graphdef, params, logps, weighted_grad = tiny
  beta, prior = 0.5, 0.3
  batch = dict(_members(seed=2), chosen=np.full((B, 2), 2, np.int32),
               rejected=np.tile(np.arange(2, dtype=np.int32), (B, 1)),
               pair_mask=np.ones((B, 2), bool))
  step = jax.jit(functools.partial(
      dpo.train_step, beta=beta, loss_type="sigmoid", label_smoothing=0.0,
      reduce="pairs", schedule=_SCHEDULE, pu_mode="nnpu", prior=prior))
  new, metrics = step(_state(graphdef, params), params, batch)
  assert float(metrics["corrected"]) == 0.0
  before, after = _seq(logps, params, batch), _seq(logps, new.params, batch)
  gap = lambda s: s[:, 2] - s[:, :2].mean(-1)
  rise = gap(after) - gap(before)
  assert np.all(rise > TOL), f"log pi(anchor) - log pi(candidates): {rise}"
  w = np.zeros((B, M), np.float32)
  w[:, 2] = beta * prior / B
  w[:, :2] = -beta / (2 * 2 * B)
  grad = weighted_grad(params, batch, w)
  _assert_update_is(params, new.params, jax.tree.map(lambda g: LR * g, grad))


# ----------------------------------------------------------------------------
# GRPO


def test_grpo_step_follows_the_advantages(tiny):
  """Catches negated advantages in grpo.train_step's loss (or a flipped
  sign of the policy-gradient term): the positive-advantage candidate's
  log-prob would fall and the negative one's rise.

  With old_logps = the current log-probs the ratio is 1 (inside the clip
  range), beta_kl = 0, and the token-aggregated loss
  -sum_kt A_k ratio_kt / N_tokens has gradient
  -sum_k A_k grad log pi(y_k) / N_tokens: one SGD step moves the params by
  lr / N_tokens * sum_k A_k grad log pi(y_k), raising the +1 candidate's
  summed log-prob and lowering the -1 candidate's (first order).
  """
  graphdef, params, logps, weighted_grad = tiny
  members = _members(seed=1)
  adv = np.array([[1.0, -1.0, 0.0], [0.0, -1.0, 1.0]], np.float32)
  batch = dict(prompt_tokens=members["prompt_tokens"],
               prompt_mask=members["prompt_mask"],
               responses=members["members"],
               response_mask=members["member_mask"],
               old_logps=np.asarray(logps(params, members)),
               advantages=adv)
  step = jax.jit(functools.partial(
      grpo.train_step, eps_low=0.2, eps_high=0.2, beta_kl=0.0,
      aggregation="token", schedule=_SCHEDULE))
  new, metrics = step(_state(graphdef, params), batch)
  assert float(metrics["skipped"]) == 0.0
  assert_allclose([metrics["ratio_min"], metrics["ratio_max"]], 1.0,
                  atol=1e-5)  # on-policy: the clip is not active
  before, after = _seq(logps, params, members), _seq(logps, new.params,
                                                     members)
  change = after - before
  pos, neg = adv > 0, adv < 0
  assert np.all(change[pos] > TOL), f"+1 candidates: {change[pos]}"
  assert np.all(change[neg] < -TOL), f"-1 candidates: {change[neg]}"
  rows = np.arange(B)
  gap = change[rows, adv.argmax(-1)] - change[rows, adv.argmin(-1)]
  assert np.all(gap > 0)
  # The update itself: lr / N_tokens * sum_k A_k grad log pi(y_k).
  n_tokens = members["member_mask"].sum()
  grad = weighted_grad(params, members, adv / n_tokens)
  _assert_update_is(params, new.params, jax.tree.map(lambda g: LR * g, grad))


# ----------------------------------------------------------------------------
# LDL


def _kl(d, q):
  """KL(d || q) per row (0 log 0 = 0)."""
  safe = np.where(d > 0, d, 1.0)
  return np.sum(np.where(d > 0, d * np.log(safe / q), 0.0), axis=-1)


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def test_ldl_step_moves_implied_toward_labels(tiny):
  """Catches a negated log-ratio in ldl.train_step (`ref - pol` for
  `pol - ref`) or a flipped LDL loss: the implied distribution would move
  away from the labels.

  The implied distribution is q = softmax_m(beta (log pi - log pi_ref)(y_m)),
  computed here from our own scores of policy and reference. With
  reference = policy it starts uniform (1/M); d KL(d || q) / d logratio_m =
  beta (q_m - d_m), so one SGD step on the mean over B prompts moves the
  params by lr * beta / B * sum_bm (d_bm - 1/M) grad log pi(y_bm): q moves
  toward d, KL(d || q) falls below KL(d || uniform), and the member d is
  concentrated on gains probability.
  """
  graphdef, params, logps, weighted_grad = tiny
  beta = 2.0
  members = _members(seed=2)
  d = np.array([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]], np.float32)
  batch = dict(prompt_tokens=members["prompt_tokens"],
               prompt_mask=members["prompt_mask"],
               members=members["members"],
               token_mask=members["member_mask"], label_dist=d,
               member_mask=np.ones((B, M), bool))
  step = jax.jit(functools.partial(ldl.train_step, beta=beta,
                                   schedule=_SCHEDULE))
  new, metrics = step(_state(graphdef, params), params, batch)
  assert float(metrics["skipped"]) == 0.0
  ref = _seq(logps, params, members)          # the reference = the start
  implied = _softmax(beta * (_seq(logps, new.params, members) - ref))
  uniform = np.full((B, M), 1.0 / M)
  kl_before, kl_after = _kl(d, uniform), _kl(d, implied)
  assert np.all(kl_after < kl_before - TOL), (kl_before, kl_after)
  top = d.argmax(-1)
  assert np.all(implied[np.arange(B), top] > 1.0 / M), implied
  # The update itself: lr * beta / B * sum_bm (d_bm - 1/M) grad log pi(y_bm).
  grad = weighted_grad(params, members, beta * (d - 1.0 / M) / B)
  _assert_update_is(params, new.params, jax.tree.map(lambda g: LR * g, grad))


# ----------------------------------------------------------------------------
# The schedule of a stage

STEPS, INNER = 6, 3          # rl.steps, loss.grpo.inner_iterations
PEAK, END_RATIO, WARMUP_FRAC = 1e-3, 0.1, 0.2
# Optimizer updates of the stage and its warmup, counted by hand:
# 6 steps x 3 inner updates = 18 batches; grad_accum 2 -> 9 updates.
# warmup = ceil(0.2 x 18) = ceil(3.6) = 4; ceil(0.2 x 9) = ceil(1.8) = 2.
UPDATES = {1: 18, 2: 9}
WARMUP = {1: 4, 2: 2}


def _opt(grad_accum):
  from configs import common
  c = common.opt()
  c.grad_accum, c.end_lr_ratio = grad_accum, END_RATIO
  c.weight_decay, c.clip_norm = 0.0, 1.0
  return c


def _expected_lr(t, *, updates, warmup):
  """make_schedule's docstring formula, t = updates applied before this
  one (0 for the stage's first update, updates - 1 for its last)."""
  end = PEAK * END_RATIO
  if t < warmup:
    return PEAK * (t + 1) / warmup
  frac = min(max((t - warmup) / (updates - warmup), 0.0), 1.0)
  return end + (PEAK - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def test_stage_updates_count_grad_accum():
  """Catches a stage length that ignores grad_accum (optax.MultiSteps makes
  one update per grad_accum batches) or the inner iterations (each is one
  update of its own): updates = steps x inner // grad_accum, at least 1."""
  assert state_lib.stage_updates(STEPS, updates_per_step=INNER,
                                 grad_accum=1) == 18
  assert state_lib.stage_updates(STEPS, updates_per_step=INNER,
                                 grad_accum=2) == 9
  # 7 batches, 2 per update: the 7th is accumulated and never applied.
  assert state_lib.stage_updates(7, grad_accum=2) == 3
  assert state_lib.stage_updates(1, grad_accum=4) == 1  # the docstring's floor


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_stage_schedule_spans_every_update(grad_accum):
  """Catches a schedule built over rl.steps instead of rl.steps x inner
  iterations / grad_accum (the cosine would reach its floor at update 6 of
  18, a third of the way, and stay there), a warmup counted over the wrong
  length, and one that ignores grad_accum (at grad_accum 2 the stage would
  stop under a third of the way down the cosine, far above the floor).

  Convention (make_schedule's docstring): schedule(t) is the learning rate
  of the update made after t updates, t = 0 .. U - 1 for a stage of U
  updates. Linear warmup peak (t + 1) / w for t < w = ceil(warmup_frac U),
  then cosine from the peak at t = w to the floor end = peak x end_lr_ratio
  at t = U, one past the last update: every applied update's rate is above
  the floor, the last one's just above it, and the floor itself is only
  reached when the stage is over (t = U, and beyond).
  """
  updates, warmup = UPDATES[grad_accum], WARMUP[grad_accum]
  assert warmup == math.ceil(updates / 5)  # WARMUP_FRAC = 1 / 5, exactly
  _, schedule = state_lib.optimizer_from_config(
      _opt(grad_accum), learning_rate=PEAK, warmup_frac=WARMUP_FRAC,
      total_steps=STEPS, updates_per_step=INNER)
  lrs = np.array([float(schedule(t)) for t in range(updates + 2)])
  want = [_expected_lr(t, updates=updates, warmup=warmup)
          for t in range(updates + 2)]
  assert_allclose(lrs, want, rtol=1e-5)
  floor = PEAK * END_RATIO
  # Warmup: `warmup` updates on the ramp peak (t + 1) / warmup, the peak
  # reached at its last one (t = warmup - 1) and held at t = warmup.
  assert_allclose(lrs[:warmup], PEAK * np.arange(1, warmup + 1) / warmup,
                  rtol=1e-6)
  assert np.all(lrs[:warmup - 1] < PEAK) and lrs[warmup] == pytest.approx(PEAK)
  # Every update of the stage is above the floor; the last is near it.
  assert np.all(lrs[:updates] > floor * (1 + 1e-4)), lrs
  assert np.all(np.diff(lrs[warmup:updates]) < 0)
  assert lrs[updates - 1] - floor < 0.1 * (PEAK - floor)
  assert_allclose(lrs[updates:], floor, rtol=1e-6)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_stage_optimizer_applies_the_schedule(grad_accum):
  """Catches the same mistakes end to end, on the optimizer a stage builds:
  fed the stage's STEPS x INNER batches, it makes exactly
  stage_updates(...) updates (one per grad_accum batches, MultiSteps), at
  the rates schedule(0), ..., schedule(U - 1), the last above the floor and
  near it.

  With a constant gradient g, Adam's bias-corrected moments are g and g^2,
  so each applied update is -lr * g / (|g| + eps) = -lr: the parameter
  change of each batch reads off the learning rate that was used (0 on a
  batch that is only accumulated).
  """
  updates, warmup = UPDATES[grad_accum], WARMUP[grad_accum]
  tx, _ = state_lib.optimizer_from_config(
      _opt(grad_accum), learning_rate=PEAK, warmup_frac=WARMUP_FRAC,
      total_steps=STEPS, updates_per_step=INNER)
  params = {"w": jnp.ones((2, 2), jnp.float32)}
  grads = {"w": jnp.full((2, 2), 0.1, jnp.float32)}  # norm 0.2: not clipped
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  applied = []
  for _ in range(STEPS * INNER):
    upd, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, upd)
    applied.append(-float(np.asarray(upd["w"]).mean()))
  applied = np.array(applied)
  used = applied[applied != 0]
  assert len(used) == updates == state_lib.stage_updates(
      STEPS, updates_per_step=INNER, grad_accum=grad_accum)
  # MultiSteps applies on the last batch of each group of grad_accum.
  assert np.all(applied[grad_accum - 1::grad_accum] > 0)
  want = [_expected_lr(t, updates=updates, warmup=warmup)
          for t in range(updates)]
  assert_allclose(used, want, rtol=1e-4)
  floor = PEAK * END_RATIO
  assert np.all(used > floor * (1 + 1e-4))
  assert used[-1] - floor < 0.1 * (PEAK - floor)
