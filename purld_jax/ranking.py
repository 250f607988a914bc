"""Anchor-conditioned self-ranking schemes: scores S(x, a, y_k) f32[B, K]
(METHOD.md step 3).

What the schemes are: their names and options (SCHEMES, IMAGE_SCHEMES,
ANSWER_GATES, ...), and pure functions of log-prob arrays or texts ->
f32[B, K] (`judge`, `pmi`, `anchor_recon`, `pairwise_judge`, `similarity`,
`oracle`; the jitted ones wrapped in stop_gradient: scores are labels,
never differentiated), plus the host-side post-processing of scores
(`length_debias`, `gate_passes`, `answer_gate`).

The rest of the self-ranking lives beside it: `templates.py` builds the
scoring rows (`templates.ScoringBatch`: left-padded tokens, attention and
target masks, rows ordered b * K + k) and `self_scoring.py`
(`self_scoring.score_group`) runs the scorer model over them and applies
the functions here.

Candidates are token-id lists (`templates.candidate_lists` turns sampler
arrays into them); every scheme first cuts a candidate at its first stop id
(the stop token itself is dropped). An empty candidate gets score 0 from
the log-prob schemes (nothing to average) and is judged as empty text.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from purld_jax import evaluate
from purld_jax import scoring
from purld_jax import templates

SCHEMES = ("judge", "pmi", "anchor_recon", "pairwise_judge", "self_reward",
           "similarity", "oracle", "teacher_judge")
PAIRWISE_AGGREGATIONS = ("bradley_terry", "win_count")
SIMILARITY_METRICS = ("rouge_l", "token_f1")
# The schemes that read the judge's answer words (`ranking.yes_word`, `no_word`).
ANSWER_WORD_SCHEMES = ("judge", "self_reward", "pairwise_judge")
# `ranking.gate`: label-free checks that a candidate gives an answer at all.
ANSWER_GATES = ("none", "number")
# The schemes whose scorer runs model rows (`templates` builds them).
ROW_SCHEMES = ("judge", "pmi", "anchor_recon", "pairwise_judge",
               "self_reward")
# The schemes that rank image prompts (a vision-language student): those
# whose scorer rows keep the prompt's images (ROW_SCHEMES: the prompt's
# image tokens and pixels in every row, `vision.PromptImages`; judge rows
# hold them where the prompt's text begins in the template) and those that
# read no model rows. A scheme not listed is refused on image prompts.
IMAGE_SCHEMES = ("anchor_recon", "pmi", "judge", "self_reward",
                 "pairwise_judge", "similarity", "oracle", "teacher_judge")


# ----------------------------------------------------------------------------
# pure score functions


@functools.partial(jax.jit, static_argnames=("yes_ids", "no_ids"))
def judge(answer_logps: jax.Array, *, yes_ids: tuple[int, ...],
          no_ids: tuple[int, ...]) -> jax.Array:
  """s = log p(Yes) - log p(No) at the judge's answer slot.

  Args:
    answer_logps: f32[B, K, V] next-token log-probs after each judge row
      (any leading axes work: [B, K(K-1), V] for pairwise rows).
    yes_ids, no_ids: token ids of the answers
      (`templates.answer_token_ids`); the variants' probabilities are summed.

  Returns:
    f32[B, K].
  """
  yes = jax.nn.logsumexp(answer_logps[..., jnp.asarray(yes_ids)], axis=-1)
  no = jax.nn.logsumexp(answer_logps[..., jnp.asarray(no_ids)], axis=-1)
  return jax.lax.stop_gradient(yes - no)


def self_reward(answer_logps: jax.Array, *, yes_ids: tuple[int, ...],
                no_ids: tuple[int, ...]) -> jax.Array:
  """The judge on templates.SELF_REWARD_TEMPLATE rows (no anchor): a baseline.
  f32[B, K, V] -> f32[B, K]."""
  return judge(answer_logps, yes_ids=yes_ids, no_ids=no_ids)


@jax.jit
def pmi(logps_anchor: jax.Array, logps_plain: jax.Array,
        target_mask: jax.Array) -> jax.Array:
  """s = mean_t [log pi(y_t | x, a, y_<t) - log pi(y_t | x, y_<t)].

  Args:
    logps_anchor: f32[B, K, T] token log-probs of the with-anchor rows.
    logps_plain: f32[B, K, T] the same candidate tokens without the anchor.
    target_mask: bool[B, K, T] candidate tokens (same columns in both).

  Returns:
    f32[B, K] (0 for an empty candidate).
  """
  return jax.lax.stop_gradient(
      scoring.mean_logps(logps_anchor - logps_plain, target_mask))


@jax.jit
def anchor_recon(logps: jax.Array, target_mask: jax.Array) -> jax.Array:
  """s = mean_t log pi(a_t | x, y_k, a_<t).

  Args:
    logps: f32[B, K, T] token log-probs of the draft rows.
    target_mask: bool[B, K, T] the anchor's tokens.

  Returns:
    f32[B, K].
  """
  return jax.lax.stop_gradient(scoring.mean_logps(logps, target_mask))


def pair_matrix(pair_scores: jax.Array, k: int,
                opponents: int = 0) -> jax.Array:
  """f32[B, R] in `templates.ordered_pairs(K, opponents)` order ->
  f32[B, K, K] with out[b, i, j] = score of the row showing y_i as A and y_j
  as B (0 on the diagonal and on pairs the design leaves out)."""
  i, j = templates.ordered_pairs(k, opponents)
  out = jnp.zeros(pair_scores.shape[:-1] + (k, k), pair_scores.dtype)
  return out.at[..., i, j].set(pair_scores)


@functools.partial(jax.jit,
                   static_argnames=("aggregation", "iters", "bt_prior"))
def pairwise_judge(pair_logits: jax.Array, *,
                   aggregation: str = "bradley_terry", iters: int = 100,
                   bt_prior: float = 0.1,
                   candidate_mask: jax.Array | None = None,
                   pair_mask: jax.Array | None = None) -> jax.Array:
  """Per-candidate scores from judge logits on ordered pairs.

  Both orders cancel position bias: z_ij = (l_ij - l_ji) / 2 (a constant
  bias toward A drops out), and p_ij = sigmoid(z_ij) is the soft outcome
  "i beats j" (p_ij + p_ji = 1).

  Args:
    pair_logits: f32[B, K, K], l[b, i, j] = judge score (log p(Yes) -
      log p(No)) of "is A better than B" with A = y_i, B = y_j; the diagonal
      is ignored (`pair_matrix` builds it).
    aggregation:
      "win_count": s_i = sum_j p_ij, the expected number of wins;
      "bradley_terry": s_i = log pi_i - mean_j log pi_j of the Bradley-Terry
        strengths fitted to the soft outcomes by `iters` MM steps
        (Hunter 2004), pi_i <- W_i / sum_j n_ij / (pi_i + pi_j).
    iters: MM steps.
    bt_prior: weight of one virtual tie of every member against a
      unit-strength player (keeps strengths finite and the fit unique;
      0 gives the plain MLE, exact log-odds for two members).
    candidate_mask: bool[B, K]; masked members neither compare nor score
      (their score is 0).
    pair_mask: bool[K, K] (or [B, K, K]), symmetric: the pairs that were
      judged (`templates.pair_design`); default all. Pairs left out count
      as no comparison (n_ij = 0), not as ties.

  Returns:
    f32[B, K].
  """
  if aggregation not in PAIRWISE_AGGREGATIONS:
    raise ValueError(f"aggregation {aggregation!r} not in "
                     f"{PAIRWISE_AGGREGATIONS}")
  k = pair_logits.shape[-1]
  valid = (jnp.ones(pair_logits.shape[:-1], bool) if candidate_mask is None
           else candidate_mask.astype(bool))
  n = (valid[..., :, None] & valid[..., None, :]
       & ~jnp.eye(k, dtype=bool)[None])  # [B, K, K]
  if pair_mask is not None:
    pm = jnp.asarray(pair_mask, bool)
    n = n & (pm[None] if pm.ndim == 2 else pm)
  n = n.astype(jnp.float32)
  z = 0.5 * (pair_logits - jnp.swapaxes(pair_logits, -1, -2))
  p = jax.nn.sigmoid(z) * n
  if aggregation == "win_count":
    return jax.lax.stop_gradient(jnp.where(valid, jnp.sum(p, -1), 0.0))
  vf = valid.astype(jnp.float32)
  wins = jnp.sum(p, axis=-1) + 0.5 * bt_prior  # [B, K]

  def mm(_, log_pi):
    pi = jnp.exp(log_pi)
    denom = (jnp.sum(n / (pi[..., :, None] + pi[..., None, :]), axis=-1)
             + bt_prior / (pi + 1.0))
    new = jnp.log(jnp.maximum(wins, 1e-30)) - jnp.log(
        jnp.maximum(denom, 1e-30))
    new = jnp.where(valid, new, 0.0)
    # geometric mean 1 over valid members (matters when bt_prior = 0)
    centre = jnp.sum(new * vf, -1, keepdims=True) / jnp.maximum(
        jnp.sum(vf, -1, keepdims=True), 1.0)
    return jnp.where(valid, new - centre, 0.0)

  log_pi = jax.lax.fori_loop(0, iters, mm, jnp.zeros(valid.shape))
  centre = jnp.sum(log_pi * vf, -1, keepdims=True) / jnp.maximum(
      jnp.sum(vf, -1, keepdims=True), 1.0)
  return jax.lax.stop_gradient(jnp.where(valid, log_pi - centre, 0.0))


@functools.partial(jax.jit, static_argnames=("metric",))
def similarity(cand_tokens: jax.Array, cand_mask: jax.Array,
               anchor_tokens: jax.Array, anchor_mask: jax.Array, *,
               metric: str = "rouge_l") -> jax.Array:
  """Lexical similarity of each candidate to the anchor, on token ids.

  Not self-ranking: a baseline. With n_y, n_a the token counts:
    rouge_l:  2 LCS(y, a) / (n_y + n_a) (ROUGE-L F1: 2 P R / (P + R) with
              P = LCS / n_y, R = LCS / n_a);
    token_f1: 2 overlap / (n_y + n_a), overlap the multiset intersection.
  0 when both are empty.

  Args:
    cand_tokens: i32[B, K, T] candidate ids; cand_mask bool[B, K, T].
    anchor_tokens: i32[B, T_a] anchor ids; anchor_mask bool[B, T_a].
    metric: one of SIMILARITY_METRICS.

  Returns:
    f32[B, K].
  """
  if metric not in SIMILARITY_METRICS:
    raise ValueError(f"metric {metric!r} not in {SIMILARITY_METRICS}")
  b, k, t = cand_tokens.shape
  ym = cand_mask.astype(bool)
  a = jnp.broadcast_to(anchor_tokens[:, None, :],
                       (b, k) + anchor_tokens.shape[1:])
  am = jnp.broadcast_to(anchor_mask.astype(bool)[:, None, :], a.shape)
  n_y = jnp.sum(ym, -1).astype(jnp.float32)
  n_a = jnp.sum(am, -1).astype(jnp.float32)
  if metric == "rouge_l":
    # dp[j] = LCS(y_<=i, a_<=j); dp_i[j] = max(dp_i[j-1], dp_i-1[j],
    # dp_i-1[j-1] + match) = cummax_j of max(dp_i-1[j], dp_i-1[j-1] + match)
    def row(dp, inp):
      y_i, m_i = inp  # [B, K]
      match = ((y_i[..., None] == a) & m_i[..., None] & am).astype(jnp.int32)
      diag = jnp.pad(dp[..., :-1], ((0, 0), (0, 0), (1, 0)))
      return jax.lax.cummax(jnp.maximum(dp, diag + match), axis=2), None
    dp, _ = jax.lax.scan(row, jnp.zeros(a.shape, jnp.int32),
                         (jnp.moveaxis(cand_tokens, -1, 0),
                          jnp.moveaxis(ym, -1, 0)))
    common = dp[..., -1].astype(jnp.float32)
  else:
    # y_t counts iff it is among the first count_a(y_t) copies of its id in y
    same = ((cand_tokens[..., :, None] == cand_tokens[..., None, :])
            & ym[..., None, :]
            & jnp.tril(jnp.ones((t, t), bool), -1)[None, None])
    earlier = jnp.sum(same, -1)  # [B, K, T] copies of y_t before t
    in_a = jnp.sum((cand_tokens[..., :, None] == a[..., None, :])
                   & am[..., None, :], -1)
    common = jnp.sum(ym & (earlier < in_a), -1).astype(jnp.float32)
  return jax.lax.stop_gradient(2.0 * common / jnp.maximum(n_y + n_a, 1.0))


def oracle(texts: Sequence[Sequence[str]],
           verifier: Callable[[int, str], float]) -> np.ndarray:
  """Verifiable reward (host side): np.float32[B, K], s = verifier(b, text).

  Not available in the real setting: an upper bound for ablations. The
  verifier closes over what it checks against (e.g. gold answers).
  """
  return np.asarray([[float(verifier(b, t)) for t in group]
                     for b, group in enumerate(texts)], np.float32)


def length_debias(scores: np.ndarray, lengths: np.ndarray,
                  valid: np.ndarray | None = None, *,
                  anchor_score: np.ndarray | None = None,
                  anchor_length: np.ndarray | None = None):
  """Removes the linear trend of score on length inside groups
  (`ranking.length_debias`), one slope for the whole batch (host side).

  beta = sum_{b,k} (s_bk - mean_b s)(n_bk - mean_b n)
         / sum_{b,k} (n_bk - mean_b n)^2     over valid rows b,
  s'_bk = s_bk - beta (n_bk - mean_b n),     means over b's K candidates.

  The slope is pooled over the batch because a group of K = 2 alone fits
  any line exactly; centring inside each group keeps the comparison within
  a prompt (a prompt whose answers are long is not penalised against one
  whose answers are short). Only the order inside a group matters to the
  losses, and it changes only where lengths differ. The anchor, when
  given, is shifted by the same line: s'_a = s_a - beta (n_a - mean_b n).
  beta is 0 when no valid group has two lengths.

  Caution: a linear fit only removes a linear trend, and candidates tied
  in s are split by length (by the sign of beta): on a 0/1 score such as
  the oracle's, the debiased order of the wrong answers is their length
  order (experiments/README.md measures both on the stored pool).

  Args:
    scores: f[B, K] a scheme's scores.
    lengths: i[B, K] candidate tokens before the stop.
    valid: bool[B] rows fitted and shifted (default all); others unchanged.
    anchor_score: f[B] s_a, or None.
    anchor_length: i[B] the anchor's tokens; needed with anchor_score.

  Returns:
    (scores f32[B, K], anchor_score f32[B] or None, beta float).
  """
  s = np.asarray(scores, np.float64)
  n = np.asarray(lengths, np.float64)
  if s.shape != n.shape or s.ndim != 2:
    raise ValueError(f"scores {s.shape} and lengths {n.shape}: want the "
                     "same [B, K]")
  v = (np.ones(s.shape[0], bool) if valid is None
       else np.asarray(valid, bool))
  mean_n = n.mean(1, keepdims=True)
  dn = np.where(v[:, None], n - mean_n, 0.0)
  ds = np.where(v[:, None], s - s.mean(1, keepdims=True), 0.0)
  var = float((dn * dn).sum())
  beta = float((ds * dn).sum() / var) if var > 0 else 0.0
  out = (s - beta * dn).astype(np.float32)
  if anchor_score is None:
    return out, None, beta
  if anchor_length is None:
    raise ValueError("anchor_score needs anchor_length")
  da = np.where(v, np.asarray(anchor_length, np.float64) - mean_n[:, 0], 0.0)
  return (out, (np.asarray(anchor_score, np.float64) - beta * da)
          .astype(np.float32), beta)


def gate_passes(texts: Sequence[Sequence[str]], anchors: Sequence[str], *,
                gate: str) -> np.ndarray:
  """Which candidates pass the answer gate `gate` (`ranking.gate`), host side.

  A gate reads only the candidate and the anchor, never a reference answer:
  it is as available in the real setting as the anchor is.
    "none": every candidate passes.
    "number": a candidate passes when it holds a number
      (`evaluate.last_number`), or when the anchor holds none (then the gate
      cannot tell what an answer looks like, and stays open). Meant for
      tasks whose answers are numbers: a bare "No" or "I don't know" fails,
      and so does a number in words ("nine"), which the last-number
      verifier would score wrong as well.

  Args:
    texts: B lists of K decoded candidates (cut at their stop token).
    anchors: B anchor texts.
    gate: one of ANSWER_GATES.

  Returns:
    bool[B, K].
  """
  if gate not in ANSWER_GATES:
    raise ValueError(f"gate {gate!r} not in {ANSWER_GATES}")
  if len(texts) != len(anchors):
    raise ValueError(f"{len(texts)} candidate groups for {len(anchors)} "
                     "anchors")
  if gate == "none":
    return np.ones((len(texts), len(texts[0]) if texts else 0), bool)
  has_number = lambda text: evaluate.last_number(text) is not None
  rows = []
  for group, anchor in zip(texts, anchors):
    gate_open = not has_number(anchor)
    rows.append([gate_open or has_number(t) for t in group])
  return np.array(rows, bool).reshape(len(texts), -1)


def answer_gate(scores: np.ndarray, passed: np.ndarray,
                anchor_score: np.ndarray, valid: np.ndarray | None = None, *,
                margin: float = 1.0) -> np.ndarray:
  """Ranks the candidates that fail the answer gate below every other
  member of their group, the anchor included (host side).

    floor_b = min(s_a, min_{k passed} s_bk)
    s'_bk   = s_bk               if passed_bk
              floor_b - margin   otherwise

  so a failed candidate is the group's worst whatever the scheme paid it,
  and failed candidates tie with each other: DPO's best-vs-worst rejects
  one of them, a group that fails throughout gives no pair (all equal),
  and GRPO's listwise targets put the least mass on them. The passing
  candidates and s_a keep their scores, hence their order.

  Args:
    scores: f[B, K] a scheme's scores.
    passed: bool[B, K] from `gate_passes`.
    anchor_score: f[B] s_a.
    valid: bool[B] rows to gate (default all); filler rows are unchanged.
    margin: how far below the floor a failed candidate sits (> 0).

  Returns:
    f32[B, K].
  """
  s = np.asarray(scores, np.float64)
  ok = np.asarray(passed, bool)
  if s.shape != ok.shape or s.ndim != 2:
    raise ValueError(f"scores {s.shape} and passed {ok.shape}: want the "
                     "same [B, K]")
  if not margin > 0:
    raise ValueError(f"margin={margin!r}: must be > 0")
  v = (np.ones(s.shape[0], bool) if valid is None
       else np.asarray(valid, bool))
  floor = np.minimum(np.asarray(anchor_score, np.float64),
                     np.where(ok, s, np.inf).min(axis=1))
  gated = np.where(ok | ~v[:, None], s, floor[:, None] - margin)
  return gated.astype(np.float32)
