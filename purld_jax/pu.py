"""The anchor as the labelled positive (docs/METHOD.md step 4, `pu.*`).

The anchor a is the one labelled positive of a group; the K candidates are
unlabeled. `pu.mode`:

  gate (default): likely positives P = {k : s_k >= s_a - delta}, at most the
    top ceil(prior * n) of the n valid candidates. Training signal moves
    toward P (and the anchor) only: a DPO pair's chosen is in P and its
    rejected outside P; a label distribution has mass on P and the anchor
    only. A group with P empty gives the pair anchor-over-worst (or, in a
    listwise group, all mass on the anchor) when `anchor_fallback`, else
    nothing: never a preference between two unlabeled candidates.
  shift: scores minus s_a and nothing else (an ablation: a shift changes no
    argmax, pair or softmax).
  nnpu (recipe dpo only): no ranking at all; the non-negative PU risk of
    the implicit reward, anchors positive, candidates unlabeled
    (`losses.nnpu`, train/dpo.py), pu.prior the class prior (an ablation).

Pure jittable functions of scores f32[B, K] and s_a f32[B]; masks as in
preferences.py (member K is the anchor).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from purld_jax import preferences

MODES = ("gate", "shift", "nnpu")
PAIR_RULES = ("best_vs_worst", "margin", "pu", "anchor_as_chosen")
Pairs = preferences.Pairs


def gate_positives(scores: jax.Array, anchor_score: jax.Array, *,
                   delta: float, prior: float,
                   candidate_mask: jax.Array | None = None) -> jax.Array:
  """bool[B, K]: valid, s_k >= s_a - delta, and among the top ceil(prior n).

  Args:
    scores: f32[B, K] candidate scores.
    anchor_score: f32[B] s_a = S(x, a, a).
    delta: >= 0, how far below the anchor a likely positive may score.
    prior: in [0, 1], the largest share of the n valid candidates in P
      (ceil(prior n - 1e-6): float error never adds one).
    candidate_mask: bool[B, K] real candidates.
  """
  valid = preferences._valid(scores, candidate_mask)  # pylint: disable=protected-access
  n = jnp.sum(valid, axis=-1).astype(jnp.float32)
  cap = jnp.ceil(prior * n - 1e-6).astype(jnp.int32)
  above = valid & (scores >= anchor_score[:, None] - delta)
  top = preferences.ranks(scores, candidate_mask=valid) < cap[:, None]
  return above & top


def _fallback(scores, valid, positive, anchor_fallback):
  """The anchor-over-worst pair (M = 1) where P is empty and fallback is on."""
  worst = jnp.argmin(jnp.where(valid, scores, jnp.inf), axis=-1)
  empty = ~jnp.any(positive, axis=-1) & jnp.any(valid, axis=-1)
  k = scores.shape[-1]
  return Pairs(jnp.full(worst.shape, k, jnp.int32)[:, None],
               worst.astype(jnp.int32)[:, None],
               (empty & anchor_fallback)[:, None])


def gated_pairs(scores: jax.Array, positive: jax.Array, *, rule: str,
                margin: float = 0.0, anchor_fallback: bool = True,
                candidate_mask: jax.Array | None = None) -> Pairs:
  """DPO pairs under the gate: chosen in P, rejected outside P.

  rule "best_vs_worst" (M = 1): the best candidate (in P, as P is the top)
    over the worst candidate outside P, present if their gap > margin; P
    empty: anchor (index K) over the worst (if anchor_fallback).
  rule "pu" / "margin" (M = K (K - 1) / 2 + 1): every (P, not P) pair whose
    gap exceeds margin (margin 0 under "pu": every such pair), then one
    slot for the anchor-over-worst fallback.

  Args:
    scores: f32[B, K].
    positive: bool[B, K] from `gate_positives`.
    rule: see above ("anchor_as_chosen" is the mode-free baseline, not here).
    margin: >= 0.
    anchor_fallback: P empty -> anchor over worst (else no pair).
    candidate_mask: bool[B, K].
  """
  valid = preferences._valid(scores, candidate_mask)  # pylint: disable=protected-access
  pos = positive & valid
  unl = valid & ~pos
  fb = _fallback(scores, valid, pos, anchor_fallback)
  if rule == "best_vs_worst":
    best = jnp.argmax(jnp.where(pos, scores, -jnp.inf), axis=-1)
    worst = jnp.argmin(jnp.where(unl, scores, jnp.inf), axis=-1)
    s_best = jnp.take_along_axis(scores, best[:, None], axis=-1)
    s_worst = jnp.take_along_axis(scores, worst[:, None], axis=-1)
    ok = (jnp.any(pos, -1) & jnp.any(unl, -1))[:, None] & (
        s_best - s_worst > margin)
    has_p = jnp.any(pos, axis=-1, keepdims=True)
    return Pairs(jnp.where(has_p, best[:, None].astype(jnp.int32),
                           fb.chosen),
                 jnp.where(has_p, worst[:, None].astype(jnp.int32),
                           fb.rejected),
                 jnp.where(has_p, ok, fb.mask))
  if rule not in ("pu", "margin"):
    raise ValueError(f"gated pairs: rule {rule!r} not in best_vs_worst, pu,"
                     " margin")
  p = preferences.pu_pairs(pos, candidate_mask=valid)
  i, j = preferences.pair_index(scores.shape[-1])
  gap = jnp.abs(scores[:, i] - scores[:, j])
  p = p._replace(mask=p.mask & (gap > margin))
  return Pairs(*(jnp.concatenate([a, b], axis=-1) for a, b in zip(p, fb)))


def gated_distribution(scores: jax.Array, anchor_score: jax.Array,
                       positive: jax.Array, *, tau: float,
                       include_anchor: bool = True,
                       anchor_fallback: bool = True,
                       candidate_mask: jax.Array | None = None):
  """The label distribution under the gate: softmax(s / tau) over P (and the
  anchor, member K, when include_anchor); unlabeled candidates get 0.

  Returns:
    d f32[B, K + 1] (or [B, K] without the anchor) and keep bool[B]: False
    for a group that gives no signal (P empty and no fallback, or P empty
    without the anchor as a member); d is all zero there.
  """
  valid = preferences._valid(scores, candidate_mask)  # pylint: disable=protected-access
  pos = positive & valid
  has_p = jnp.any(pos, axis=-1)
  d = preferences.label_distribution(
      scores, tau=tau, anchor_score=anchor_score,
      include_anchor=include_anchor, candidate_mask=pos)
  keep = has_p | (include_anchor & anchor_fallback)
  keep = keep & jnp.any(valid, axis=-1)
  return jnp.where(keep[:, None], d, 0.0), keep


def advantages(d: jax.Array, *, normalize: str = "center",
               std_floor: float = 0.1,
               member_mask: jax.Array | None = None) -> jax.Array:
  """A = d - mean(d) over a group's members [/ max(std(d), std_floor)].

  The floor keeps a group whose values barely differ from being blown up to
  unit-size advantages by noise (std 0.01 -> A of at most ~0.1 / floor).

  Args:
    d: f32[B, M] label distribution (or rewards) over the members.
    normalize: "center" or "std".
    std_floor: > 0, the smallest divisor under "std".
    member_mask: bool[B, M]; masked members get A = 0 and leave the mean.
  """
  if normalize not in preferences.NORMALIZE:
    raise ValueError(f"normalize {normalize!r} not in "
                     f"{preferences.NORMALIZE}")
  c = preferences.group_advantages(d, normalize="center",
                                   candidate_mask=member_mask)
  if normalize == "center":
    return c
  valid = preferences._valid(d, member_mask)  # pylint: disable=protected-access
  n = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1)
  std = jnp.sqrt(jnp.sum(c * c, axis=-1, keepdims=True) / n)
  return c / jnp.maximum(std, std_floor)


def listwise(scores: jax.Array, anchor_score: jax.Array, *, mode: str,
             tau: float, delta: float = 0.0, prior: float = 0.5,
             include_anchor: bool = True, anchor_fallback: bool = True,
             candidate_mask: jax.Array | None = None):
  """(d f32[B, M], keep bool[B]) of a group under `pu.mode`; M = K + 1 with
  the anchor as member K when include_anchor, else K.

  shift: d = softmax((s - s_a) / tau) over all members (the anchor at 0);
  gate: `gated_distribution` over the likely positives (and the anchor).
  """
  valid = preferences._valid(scores, candidate_mask)  # pylint: disable=protected-access
  if mode == "shift":
    cal = scores - anchor_score[:, None]
    d = preferences.label_distribution(
        cal, tau=tau, anchor_score=jnp.zeros_like(anchor_score),
        include_anchor=include_anchor, candidate_mask=valid)
    return d, jnp.any(valid, axis=-1)
  if mode != "gate":
    raise ValueError(f"pu.mode {mode!r} not in {MODES}")
  pos = gate_positives(scores, anchor_score, delta=delta, prior=prior,
                       candidate_mask=valid)
  return gated_distribution(scores, anchor_score, pos, tau=tau,
                            include_anchor=include_anchor,
                            anchor_fallback=anchor_fallback,
                            candidate_mask=valid)
