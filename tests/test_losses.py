"""Hand-computed and property tests of purld_jax/losses.py."""

import functools
import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

from purld_jax import losses

SETTINGS = hypothesis.settings(max_examples=25, deadline=None)
LOG1P_EXP_M1 = math.log1p(math.exp(-1.0))  # log(1 + e^-1) = 0.3132617


def _finite(shape, lo=-8.0, hi=0.0):
  return hnp.arrays(np.float32, shape, elements=st.floats(
      lo, hi, width=32, allow_nan=False, allow_infinity=False))


# ----------------------------------------------------------------------------
# SFT


def test_sft_nll_hand():
  logps = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -4.0, 0.0],
                     [-9.0, -9.0, -9.0]])
  mask = jnp.array([[0, 1, 1], [1, 0, 0], [0, 0, 0]], bool)
  loss, m = jax.jit(losses.sft_nll)(logps, mask)
  # response tokens -2, -3 | -0.5 | none: nll = 5.5 / 3 = 1.83333
  assert_allclose(loss, 5.5 / 3, rtol=1e-6)
  # per sequence (the empty row is left out): sums 5, 0.5 -> 2.75;
  # per-token means 2.5, 0.5 -> 1.5
  assert_allclose(m["seq_nll"], 2.75, rtol=1e-6)
  assert_allclose(m["seq_mean_nll"], 1.5, rtol=1e-6)
  assert_allclose(m["ppl"], math.exp(5.5 / 3), rtol=1e-6)
  assert_allclose(m["tokens"], 3.0)


def test_sft_nll_gradient_only_on_response_tokens():
  logps = jnp.array([[-1.0, -2.0, -3.0]])
  mask = jnp.array([[0, 1, 1]], bool)
  g = jax.jit(jax.grad(lambda lp: losses.sft_nll(lp, mask)[0]))(logps)
  # d/dlogp of -(lp1 + lp2) / 2: 0 on the prompt token, -1/2 on the others
  assert_allclose(g, [[0.0, -0.5, -0.5]])


# ----------------------------------------------------------------------------
# DPO


@pytest.mark.parametrize("loss_type, beta, label_smoothing, expected", [
    # h = (-1 + 1.5) - (-2 + 1.5) = 1
    ("sigmoid", 1.0, 0.0, LOG1P_EXP_M1),  # log(1 + e^-1) = 0.31326
    # 0.9 log(1 + e^-1) + 0.1 log(1 + e^1); log(1 + e) = 1 + log(1 + e^-1)
    ("sigmoid", 1.0, 0.1, LOG1P_EXP_M1 + 0.1),
    ("sigmoid", 2.0, 0.0, math.log1p(math.exp(-2.0))),  # beta h = 2
    ("ipo", 1.0, 0.0, 0.25),  # (1 - 1 / 2)^2
    ("ipo", 0.25, 0.0, 1.0),  # (1 - 1 / 0.5)^2
    ("hinge", 1.0, 0.0, 0.0),  # max(0, 1 - 1)
    ("hinge", 0.5, 0.0, 0.5),  # max(0, 1 - 0.5)
])
def test_dpo_hand(loss_type, beta, label_smoothing, expected):
  pc, pr = jnp.array([-1.0]), jnp.array([-2.0])
  rc, rr = jnp.array([-1.5]), jnp.array([-1.5])
  fn = jax.jit(functools.partial(losses.dpo, beta=beta, loss_type=loss_type,
                                 label_smoothing=label_smoothing))
  loss, m = fn(pc, pr, rc, rr)
  assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)
  assert_allclose(m["margin"], beta * 1.0, rtol=1e-6)
  assert_allclose(m["accuracy"], 1.0)
  assert_allclose(m["reward_chosen"], beta * 0.5, rtol=1e-6)  # -1 + 1.5
  assert_allclose(m["reward_rejected"], -beta * 0.5, rtol=1e-6)


@pytest.mark.parametrize("reduce, expected", [
    # per-pair losses at beta 1: h=1 -> 0.31326, h=0 -> log 2 = 0.69315
    # pairs: (0.31326 + 0.69315 + 0.69315) / 3
    ("pairs", (LOG1P_EXP_M1 + 2 * math.log(2)) / 3),
    # prompts: mean((0.31326 + 0.69315) / 2, 0.69315)
    ("prompts", ((LOG1P_EXP_M1 + math.log(2)) / 2 + math.log(2)) / 2),
])
def test_dpo_pair_mask(reduce, expected):
  # [B=2, M=2]; the masked pair holds a huge margin that must not count
  pc = jnp.array([[1.0, 0.0], [0.0, 100.0]])
  zeros = jnp.zeros((2, 2))
  mask = jnp.array([[True, True], [True, False]])
  loss, m = jax.jit(functools.partial(losses.dpo, beta=1.0, reduce=reduce))(
      pc, zeros, zeros, zeros, pair_mask=mask)
  assert_allclose(loss, expected, rtol=1e-6)
  assert_allclose(m["pairs"], 3.0)
  assert_allclose(m["accuracy"], 1.0 / 3.0, rtol=1e-6)  # only h=1 is > 0


def test_dpo_gradient_sign():
  pc, pr = jnp.array([-1.0]), jnp.array([-2.0])
  rc, rr = jnp.array([-1.5]), jnp.array([-1.5])
  g_c, g_r = jax.jit(jax.grad(
      lambda a, b: losses.dpo(a, b, rc, rr, beta=1.0)[0], argnums=(0, 1)))(
          pc, pr)
  # dL/dh = -sigmoid(-h) = -1 / (1 + e) = -0.268941 at h = 1
  assert_allclose(g_c, [-1.0 / (1.0 + math.e)], rtol=1e-6)
  assert_allclose(g_r, [1.0 / (1.0 + math.e)], rtol=1e-6)


@SETTINGS
@hypothesis.given(_finite((4,)), _finite((4,)), st.sampled_from([0.1, 1.0]),
                  st.sampled_from([0.0, 0.2]))
def test_dpo_is_log2_when_policy_is_reference(chosen, rejected, beta, ls):
  # h = 0: -(1 - ls) log sig(0) - ls log sig(0) = log 2 for every ls
  loss, m = losses.dpo(chosen, rejected, chosen, rejected, beta=beta,
                       label_smoothing=ls)
  assert_allclose(loss, math.log(2), rtol=1e-6)
  assert_allclose(m["margin"], 0.0, atol=1e-6)


def _softplus(x):
  return math.log1p(math.exp(x))


def test_nnpu_hand():
  # beta 1, prior 0.25; positives r = 1, -1 (and a masked 9); unlabeled
  # r = 0, 2 (and a masked -9).
  #   R+ = mean softplus(-r_p) = (sp(-1) + sp(1)) / 2, and the same for
  #   mean_P softplus(r_p); R- = (sp(0) + sp(2)) / 2 - 0.25 R+ > 0.
  pp, mp = jnp.array([1.0, -1.0, 9.0]), jnp.array([True, True, False])
  pu_, mu = jnp.array([0.0, 2.0, -9.0]), jnp.array([True, True, False])
  zero = jnp.zeros(3)
  loss, m = losses.nnpu(pp, zero, mp, pu_, zero, mu, beta=1.0, prior=0.25)
  r_plus = (_softplus(-1) + _softplus(1)) / 2
  neg = (_softplus(0) + _softplus(2)) / 2 - 0.25 * r_plus
  assert_allclose(loss, 0.25 * r_plus + neg, rtol=1e-6)
  assert_allclose(m["risk_neg"], neg, rtol=1e-6)
  assert float(m["corrected"]) == 0.0
  assert_allclose(m["reward_chosen"], 0.0, atol=1e-7)
  assert_allclose(m["reward_rejected"], 1.0, rtol=1e-6)


def test_nnpu_gradient_signs_and_the_non_negative_correction():
  ref = jnp.zeros(2)
  mask = jnp.ones(2, bool)
  grad = jax.jit(jax.grad(lambda p, u: losses.nnpu(
      p, ref, mask, u, ref, mask, beta=1.0, prior=0.5)[0], argnums=(0, 1)))
  # At r = 0: the anchors' log-probs are pushed up, the candidates' down:
  # d/dr_p = -prior sig(0) / 2 - prior sig(0) / 2 = -0.25 each,
  # d/dr_u = sig(0) / 2 = 0.25 each.
  g_p, g_u = grad(jnp.zeros(2), jnp.zeros(2))
  assert_allclose(g_p, [-0.25, -0.25], rtol=1e-6)
  assert_allclose(g_u, [0.25, 0.25], rtol=1e-6)
  # Candidates already far below (r_u = -6) while the anchors sit at 0:
  # R- = sp(-6) - 0.5 log 2 < 0, so the loss is -R-: the candidates are
  # pulled back up (d/dr_u = -sig(-6) / 2 < 0) and the anchors get only
  # R-'s share (d/dr_p = +prior sig(0) / 2 = 0.125), no R+ term.
  low = jnp.full(2, -6.0)
  loss, m = losses.nnpu(jnp.zeros(2), ref, mask, low, ref, mask, beta=1.0,
                        prior=0.5)
  assert float(m["corrected"]) == 1.0
  assert_allclose(loss, 0.5 * math.log(2) - _softplus(-6), rtol=1e-5)
  assert_allclose(m["loss"], 0.5 * math.log(2), rtol=1e-5)  # the risk itself
  g_p, g_u = grad(jnp.zeros(2), low)
  sig6 = 1 / (1 + math.exp(6))
  assert_allclose(g_u, [-sig6 / 2] * 2, rtol=1e-5)
  assert_allclose(g_p, [0.125, 0.125], rtol=1e-6)


# ----------------------------------------------------------------------------
# GRPO


def _ratios_case():
  # B=1, K=4, T=1; ratios 1.5, 1.5, 0.5, 0.5 against advantages +1, -1, +1, -1
  logps = jnp.log(jnp.array([1.5, 1.5, 0.5, 0.5]))[None, :, None]
  old = jnp.zeros((1, 4, 1))
  adv = jnp.array([[1.0, -1.0, 1.0, -1.0]])
  return logps, old, jnp.ones((1, 4, 1), bool), adv


@pytest.mark.parametrize("eps_high, loss_expected, clip_high", [
    # -min(rho A, clip(rho) A): -min(1.5, 1.2) = -1.2 | -min(-1.5, -1.2) = 1.5
    # | -min(0.5, 0.8) = -0.5 | -min(-0.5, -0.8) = 0.8 -> mean 0.6 / 4
    (0.2, 0.15, 0.25),
    # clip-higher 0.6: the first token is no longer clipped: -1.5 -> 0.3 / 4
    (0.6, 0.075, 0.0),
])
def test_grpo_clipping_hand(eps_high, loss_expected, clip_high):
  logps, old, mask, adv = _ratios_case()
  fn = jax.jit(functools.partial(losses.grpo, eps_low=0.2, eps_high=eps_high))
  loss, m = fn(logps, old, None, mask, adv)
  assert_allclose(loss, loss_expected, rtol=1e-5)
  assert_allclose(m["clip_high"], clip_high)
  assert_allclose(m["clip_low"], 0.25)  # rho 0.5 < 0.8 with A < 0
  assert_allclose(m["ratio_mean"], 1.0, rtol=1e-6)
  assert_allclose(m["ratio_min"], 0.5, rtol=1e-6)
  assert_allclose(m["ratio_max"], 1.5, rtol=1e-6)


def test_grpo_clipped_tokens_have_no_gradient():
  logps, old, mask, adv = _ratios_case()
  g = jax.jit(jax.grad(
      lambda lp: losses.grpo(lp, old, None, mask, adv)[0]))(logps)
  # clipped tokens 0 and 3: 0; token 1: d(rho)/dlogp = rho = 1.5 over 4
  # tokens; token 2: -rho / 4 = -0.125
  assert_allclose(g[0, :, 0], [0.0, 0.375, -0.125, 0.0], rtol=1e-6)


@pytest.mark.parametrize("aggregation, max_len, expected", [
    # on-policy, per-token loss -A: tokens -1, -1 (A=1), +1 (A=-1)
    ("token", None, -1.0 / 3.0),  # (-1 - 1 + 1) / 3
    ("sequence", None, 0.0),  # mean(-1, +1)
    ("dr_grpo", 4, -1.0 / 8.0),  # (-1 - 1 + 1) / (2 sequences * 4)
    ("dr_grpo", None, -1.0 / 6.0),  # max_len defaults to T = 3
])
def test_grpo_aggregation_hand(aggregation, max_len, expected):
  logps = jnp.full((1, 2, 3), -1.0)
  mask = jnp.array([[[1, 1, 0], [1, 0, 0]]], bool)
  adv = jnp.array([[1.0, -1.0]])
  fn = jax.jit(functools.partial(losses.grpo, aggregation=aggregation,
                                 max_len=max_len))
  loss, m = fn(logps, None, None, mask, adv)
  assert_allclose(loss, expected, rtol=1e-6, atol=1e-7)
  assert_allclose(m["entropy"], 1.0)  # mean -logp
  assert_allclose(m["tokens"], 3.0)


def test_grpo_k3_kl_hand():
  # pi = 0.5, pi_ref = 0.25: d = log(0.25 / 0.5); k3 = 0.5 - log 0.5 - 1
  logps = jnp.full((1, 1, 1), math.log(0.5))
  ref = jnp.full((1, 1, 1), math.log(0.25))
  mask = jnp.ones((1, 1, 1), bool)
  adv = jnp.zeros((1, 1))
  k3 = 0.5 + math.log(2.0) - 1.0  # 0.193147
  fn = lambda lp: losses.grpo(lp, None, ref, mask, adv, beta_kl=0.1)
  (loss, m), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(logps)
  assert_allclose(m["kl"], k3, rtol=1e-6)
  assert_allclose(loss, 0.1 * k3, rtol=1e-6)
  # d k3 / d logp = 1 - e^(r - l) = 1 - 0.5; times beta_kl 0.1
  assert_allclose(g[0, 0, 0], 0.05, rtol=1e-6)


@jax.jit
def _equal_scores_path(logps, score):
  from purld_jax import preferences  # the path scores -> d -> A -> grad
  scores = jnp.full((2, 3), score, jnp.float32)
  d = preferences.label_distribution(scores, tau=0.7)
  adv = preferences.group_advantages(d)
  mask = jnp.ones((2, 3, 4), bool)
  g = jax.grad(lambda lp: losses.grpo(lp, None, None, mask, adv)[0])(logps)
  return adv, g


@SETTINGS
@hypothesis.given(_finite((2, 3, 4)), st.floats(-3.0, 3.0))
def test_grpo_equal_scores_give_no_policy_gradient(logps, score):
  adv, g = _equal_scores_path(logps, score)
  assert_allclose(adv, 0.0, atol=0.0)
  assert_allclose(g, 0.0, atol=0.0)


def test_grpo_gradient_sign_follows_advantage():
  logps = jnp.full((1, 2, 2), -1.0)
  mask = jnp.ones((1, 2, 2), bool)
  adv = jnp.array([[1.0, -1.0]])
  g = jax.jit(jax.grad(
      lambda lp: losses.grpo(lp, None, None, mask, adv)[0]))(logps)
  # descent raises log-probs of A > 0, lowers A < 0: grad = -A / 4 per token
  assert_allclose(g, [[[-0.25, -0.25], [0.25, 0.25]]])


# ----------------------------------------------------------------------------
# LDL


@pytest.mark.parametrize("pad", [False, True])
def test_ldl_hand(pad):
  # q = softmax(0, log 3) = (1/4, 3/4); d = (1/2, 1/2)
  lr = jnp.array([[0.0, math.log(3.0)]])
  d = jnp.array([[0.5, 0.5]])
  mask = jnp.ones((1, 2), bool)
  if pad:  # a masked third member with garbage values changes nothing
    lr = jnp.concatenate([lr, jnp.array([[50.0]])], axis=-1)
    d = jnp.concatenate([d, jnp.array([[0.3]])], axis=-1)
    mask = jnp.array([[True, True, False]])
  fn = lambda x: losses.ldl(x, d, mask, beta=1.0)
  (loss, m), g = jax.jit(jax.value_and_grad(fn, has_aux=True))(lr)
  # KL = 0.5 log(0.5 / 0.25) + 0.5 log(0.5 / 0.75) = 0.5 log(4 / 3)
  assert_allclose(loss, 0.5 * math.log(4.0 / 3.0), rtol=1e-6)
  assert_allclose(m["top1_agree"], 0.0)  # argmax q = 1, argmax d = 0 (tie)
  assert_allclose(m["entropy_label"], math.log(2.0), rtol=1e-6)
  h_q = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.562335
  assert_allclose(m["entropy_implied"], h_q, rtol=1e-6)
  # dKL/dz = beta (q - d) = (-1/4, 1/4): the member with d > q is pushed up
  assert_allclose(g[0, :2], [-0.25, 0.25], rtol=1e-5)
  if pad:
    assert_allclose(g[0, 2], 0.0)


@functools.partial(jax.jit, static_argnames="beta")
def _ldl_at_and_near_label(logits, noise, *, beta):
  d = jax.nn.softmax(logits, axis=-1)
  mask = jnp.ones(d.shape, bool)
  at_d = jnp.log(d) / beta + 1.7  # q = d (a shift is free)
  fn = lambda x: losses.ldl(x, d, mask, beta=beta)[0]
  loss, g = jax.value_and_grad(fn)(at_d)
  return loss, g, fn(at_d + noise)


@SETTINGS
@hypothesis.given(_finite((2, 5), -3.0, 3.0), _finite((2, 5), -1.0, 1.0),
                  st.sampled_from([0.5, 2.0]))
def test_ldl_minimal_where_implied_equals_label(logits, noise, beta):
  loss, g, perturbed = _ldl_at_and_near_label(logits, noise, beta=beta)
  assert_allclose(loss, 0.0, atol=1e-5)
  assert_allclose(g, 0.0, atol=1e-5)
  assert perturbed >= loss - 1e-6


def test_ldl_no_member_row_is_finite():
  lr = jnp.zeros((2, 3))
  d = jnp.array([[0.2, 0.3, 0.5], [0.0, 0.0, 0.0]])
  mask = jnp.array([[True, True, True], [False, False, False]])
  fn = lambda x: losses.ldl(x, d, mask, beta=1.0)[0]
  loss, g = jax.jit(jax.value_and_grad(fn))(lr)
  assert np.isfinite(loss) and np.all(np.isfinite(g))
  assert_allclose(g[1], 0.0)
