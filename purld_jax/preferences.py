"""From self-ranking scores to training signal (METHOD.md steps 4 and 5).

PU calibration (`calibrate`), pairwise preferences for DPO (`best_vs_worst`,
`margin_pairs`, `pu_pairs`, `anchor_as_chosen`) and listwise signal for
GRPO / LDL (`label_distribution`, `group_advantages`). All are pure jittable
functions of scores f32[B, K] (B prompts, K candidates); none has a Python
loop over B or K.

Conventions:
  * `candidate_mask` bool[B, K] marks real candidates (default all True).
    Masked candidates are never chosen, rejected, positive, or given mass.
  * The anchor, when it is a group member, is member K (the last of K + 1):
    `anchor_as_chosen` names it with index K and `label_distribution(...,
    include_anchor=True)` puts its mass in column K.
  * Ties are broken deterministically toward the lowest index: among equal
    scores the first candidate ranks higher (counts as best, and also as
    worst when argmin is taken), exactly like `jnp.argmax` / `jnp.argmin`.
  * Pairs come as `Pairs(chosen, rejected, mask)`, i32/i32/bool [B, M], with
    a static M per function, so shapes never depend on the data.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

POSITIVE_RULES = ("prior", "anchor")
NORMALIZE = ("std", "center")


class Pairs(NamedTuple):
  """Preference pairs per prompt.

  Attributes:
    chosen: i32[B, M] index of the preferred member (K means the anchor).
    rejected: i32[B, M] index of the dispreferred member.
    mask: bool[B, M] pair present (absent pairs hold index 0).
  """
  chosen: jax.Array
  rejected: jax.Array
  mask: jax.Array


def _valid(scores: jax.Array, candidate_mask: jax.Array | None) -> jax.Array:
  if candidate_mask is None:
    return jnp.ones(scores.shape, bool)
  return candidate_mask.astype(bool)


def ranks(scores: jax.Array, *, candidate_mask: jax.Array | None = None
          ) -> jax.Array:
  """i32[B, K] rank of each candidate, 0 = best, lowest index wins ties.

  rank_k = #{valid j: s_j > s_k} + #{valid j < k: s_j == s_k}; masked
  candidates get rank K. O(K^2) comparisons, K is small.
  """
  valid = _valid(scores, candidate_mask)
  k = scores.shape[-1]
  s_j = scores[..., None, :]  # [B, 1, K] (j)
  s_k = scores[..., :, None]  # [B, K, 1] (k)
  lower = jnp.arange(k)[None, :] < jnp.arange(k)[:, None]  # [k, j]: j < k
  beats = (s_j > s_k) | ((s_j == s_k) & lower[None])
  beats = beats & valid[..., None, :]
  r = jnp.sum(beats, axis=-1, dtype=jnp.int32)
  return jnp.where(valid, r, k)


def calibrate(scores: jax.Array, anchor_score: jax.Array, *,
              center: bool = True, prior: float | None = None,
              rule: str = "prior",
              candidate_mask: jax.Array | None = None):
  """PU calibration: the anchor is the labelled positive (METHOD.md step 4).

  Args:
    scores: f32[B, K] candidate scores s_k.
    anchor_score: f32[B] the anchor's own score s_a = S(x, a, a).
    center: return s_k - s_a (the anchor sits at 0) instead of s_k.
    prior: class prior pi_p, the share of candidates as good as the anchor;
      used by rule "prior".
    rule: how the likely-positive set is drawn:
      "prior": the top ceil(prior * n) valid candidates by score (n valid
        candidates; ties to the lowest index; ceil of prior * n - 1e-6 so
        that float error never adds one); prior None gives no positives.
      "anchor": every valid candidate scoring at least the anchor, s_k >= s_a.
    candidate_mask: bool[B, K].

  Returns:
    calibrated f32[B, K] (scores, centred or not; masked candidates 0) and
    likely_positive bool[B, K] (the rest of the valid candidates are the
    unlabeled set).
  """
  if rule not in POSITIVE_RULES:
    raise ValueError(f"rule {rule!r} not in {POSITIVE_RULES}")
  valid = _valid(scores, candidate_mask)
  cal = scores - anchor_score[:, None] if center else scores
  cal = jnp.where(valid, cal, 0.0)
  if rule == "anchor":
    positive = valid & (scores >= anchor_score[:, None])
  elif prior is None:
    positive = jnp.zeros(scores.shape, bool)
  else:
    n = jnp.sum(valid, axis=-1).astype(jnp.float32)
    n_pos = jnp.ceil(prior * n - 1e-6).astype(jnp.int32)
    positive = ranks(scores, candidate_mask=valid) < n_pos[:, None]
  return cal, positive


# ----------------------------------------------------------------------------
# Pairwise preferences (DPO)


def _best_worst(scores, valid):
  best = jnp.argmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
  worst = jnp.argmin(jnp.where(valid, scores, jnp.inf), axis=-1)
  return best.astype(jnp.int32), worst.astype(jnp.int32)


def best_vs_worst(scores: jax.Array, *, min_gap: float = 0.0,
                  candidate_mask: jax.Array | None = None) -> Pairs:
  """One pair per prompt: the best candidate over the worst (M = 1).

  The pair is present iff s_best - s_worst > min_gap (all-equal groups give
  no pair: there is no preference to learn).

  Args:
    scores: f32[B, K].
    min_gap: smallest score gap that makes a pair.
    candidate_mask: bool[B, K].
  """
  valid = _valid(scores, candidate_mask)
  best, worst = _best_worst(scores, valid)
  gap = (jnp.take_along_axis(scores, best[:, None], axis=-1)
         - jnp.take_along_axis(scores, worst[:, None], axis=-1))
  ok = (gap > min_gap) & jnp.any(valid, axis=-1, keepdims=True)
  return Pairs(best[:, None], worst[:, None], ok)


def pair_index(k: int) -> tuple[np.ndarray, np.ndarray]:
  """The static unordered pairs (i < j) of K members, M = K (K - 1) / 2.

  Returns:
    np.int32[M] i and np.int32[M] j, in np.triu_indices order
    ((0, 1), (0, 2), ..., (1, 2), ...).
  """
  i, j = np.triu_indices(k, 1)
  return i.astype(np.int32), j.astype(np.int32)


def _oriented(valid, swap, keep) -> Pairs:
  """Pairs over the static slots `pair_index(K)`: i over j, or j over i
  where `swap`; present where `keep` and both are valid (bool[B, M])."""
  i, j = pair_index(valid.shape[-1])
  i_bm = jnp.broadcast_to(jnp.asarray(i)[None], swap.shape)
  j_bm = jnp.broadcast_to(jnp.asarray(j)[None], swap.shape)
  chosen = jnp.where(swap, j_bm, i_bm)
  rejected = jnp.where(swap, i_bm, j_bm)
  return Pairs(chosen, rejected, keep & valid[:, i] & valid[:, j])


def margin_pairs(scores: jax.Array, *, margin: float = 0.0,
                 candidate_mask: jax.Array | None = None) -> Pairs:
  """Every pair whose score gap exceeds `margin` (M = K (K - 1) / 2).

  Slot m holds the unordered pair `pair_index(K)[m]`, oriented so that the
  higher score is chosen (i on ties; absent pairs are oriented too);
  present iff |s_i - s_j| > margin and both are valid. margin = 0 keeps
  every strict preference.

  Args:
    scores: f32[B, K].
    margin: >= 0.
    candidate_mask: bool[B, K].
  """
  valid = _valid(scores, candidate_mask)
  i, j = pair_index(scores.shape[-1])
  gap = scores[:, i] - scores[:, j]
  return _oriented(valid, gap < 0, jnp.abs(gap) > margin)


def pu_pairs(likely_positive: jax.Array, *,
             candidate_mask: jax.Array | None = None) -> Pairs:
  """Every (likely-positive, unlabeled) pair (M = K (K - 1) / 2).

  The positive is chosen whatever the scores (ties across the prior
  threshold included); pairs of two positives or two unlabeled are absent.

  Args:
    likely_positive: bool[B, K] from `calibrate`.
    candidate_mask: bool[B, K].
  """
  valid = _valid(likely_positive, candidate_mask)
  pos = likely_positive.astype(bool) & valid
  i, j = pair_index(pos.shape[-1])
  return _oriented(valid, pos[:, j] & ~pos[:, i], pos[:, i] != pos[:, j])


def anchor_as_chosen(scores: jax.Array, *,
                     candidate_mask: jax.Array | None = None) -> Pairs:
  """SPIN-like baseline: the anchor (index K) over the worst candidate (M = 1).

  The caller gathers from member arrays of K + 1 columns, anchor last.

  Args:
    scores: f32[B, K].
    candidate_mask: bool[B, K].
  """
  valid = _valid(scores, candidate_mask)
  _, worst = _best_worst(scores, valid)
  k = scores.shape[-1]
  chosen = jnp.full(worst.shape, k, jnp.int32)
  return Pairs(chosen[:, None], worst[:, None],
               jnp.any(valid, axis=-1, keepdims=True))


def gather_pairs(values: jax.Array, pairs: Pairs):
  """(values at chosen, values at rejected), each f32[B, M].

  Args:
    values: f32[B, K] or f32[B, K + 1] (anchor last) per-member values, e.g.
      summed log-probs under the policy or the reference.
    pairs: `Pairs` with indices into the last axis of `values`.
  """
  return (jnp.take_along_axis(values, pairs.chosen, axis=-1),
          jnp.take_along_axis(values, pairs.rejected, axis=-1))


# ----------------------------------------------------------------------------
# Listwise signal (GRPO / LDL)


def label_distribution(scores: jax.Array, *, tau: float,
                       anchor_score: jax.Array | None = None,
                       include_anchor: bool = False,
                       candidate_mask: jax.Array | None = None) -> jax.Array:
  """d = softmax(s / tau) over the valid members of each group.

  Args:
    scores: f32[B, K].
    tau: label temperature > 0; tau -> 0 puts all mass on the best (ties
      share it), tau -> inf gives the uniform distribution.
    anchor_score: f32[B] s_a; needed when include_anchor.
    include_anchor: the anchor joins as member K (a positive with its own
      score), so d has K + 1 columns.
    candidate_mask: bool[B, K].

  Returns:
    d f32[B, K] or f32[B, K + 1], zero on masked members, rows summing to 1
    (all zero for a row without members).
  """
  valid = _valid(scores, candidate_mask)
  if include_anchor:
    if anchor_score is None:
      raise ValueError("include_anchor needs anchor_score")
    scores = jnp.concatenate([scores, anchor_score[:, None]], axis=-1)
    valid = jnp.concatenate(
        [valid, jnp.ones(anchor_score.shape, bool)[:, None]], axis=-1)
  z = jnp.where(valid, scores / tau, -jnp.inf)
  top = jnp.max(z, axis=-1, keepdims=True)
  z = jnp.where(valid, z - jnp.where(jnp.isfinite(top), top, 0.0), -jnp.inf)
  e = jnp.exp(z)
  return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)


def group_advantages(values: jax.Array, *, normalize: str = "std",
                     eps: float = 1e-6,
                     candidate_mask: jax.Array | None = None) -> jax.Array:
  """Group-relative advantages A_k = (v_k - mean v) [/ (std v + eps)].

  With v = d (a label distribution over the K candidates, summing to 1) the
  group mean is 1/K; raw rewards (oracle) work the same. The recipes use
  `pu.advantages`, which divides by max(std, floor) instead of std + eps
  (docs/METHOD.md step 6). The mean and the population std
  (ddof 0) run over valid members. Values are shifted by the group max
  first (an exact no-op in real arithmetic), so equal values give A = 0
  exactly, not float noise divided by eps.

  Args:
    values: f32[B, K] label distribution d[:, :K] or rewards.
    normalize: "std" (divide by std + eps) or "center" (centre only).
    eps: added to the std.
    candidate_mask: bool[B, K]; masked members get A = 0.
  """
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize {normalize!r} not in {NORMALIZE}")
  valid = _valid(values, candidate_mask)
  m = valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
  top = jnp.max(jnp.where(valid, values, -jnp.inf), axis=-1, keepdims=True)
  v = jnp.where(valid, values - jnp.where(jnp.isfinite(top), top, 0.0), 0.0)
  c = jnp.where(valid, v - jnp.sum(v, axis=-1, keepdims=True) / n, 0.0)
  if normalize == "center":
    return c
  std = jnp.sqrt(jnp.sum(c * c, axis=-1, keepdims=True) / n)
  return c / (std + eps)
