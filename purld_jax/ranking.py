"""Anchor-conditioned self-ranking: scores S(x, a, y_k) f32[B, K] (METHOD.md
step 3).

Three layers:
  (a) `templates.py`: the prompts, and host-side rows built from them
      (`templates.ScoringBatch`: left-padded tokens, attention and target
      masks, rows ordered b * K + k);
  (b) pure jitted score functions of log-prob arrays -> f32[B, K], wrapped
      in stop_gradient (scores are labels, never differentiated);
  (c) `score_group`, the glue that builds the rows, runs the model through
      `scoring` a chunk of rows at a time and applies (b).

The scorer is whichever model the caller passes to `score_group`: the
policy snapshot that sampled the candidates, or the reference
(`nnx.merge(graphdef, ref_params)`): `ranking.scorer` in the config. The
model is reached only through four log-prob functions (`Scorers`): by
default `scoring.jitted_*` on the model (`model_scorers`); a trainer under a
mesh passes its own, jitted with shardings (`sharded.jit_scorers`).

Candidates are token-id lists (`templates.candidate_lists` turns sampler
arrays into them); every scheme first cuts a candidate at its first stop id
(the stop token itself is dropped). An empty candidate gets score 0 from the log-prob
schemes (nothing to average) and is judged as empty text.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from purld_jax import evaluate
from purld_jax import scoring
from purld_jax import templates
from purld_jax.models import tokenizer as tok_lib

SCHEMES = ("judge", "pmi", "anchor_recon", "pairwise_judge", "self_reward",
           "similarity", "oracle", "teacher_judge")
PAIRWISE_AGGREGATIONS = ("bradley_terry", "win_count")
SIMILARITY_METRICS = ("rouge_l", "token_f1")
# The schemes that read the judge's answer words (`ranking.yes_word`, `no_word`).
ANSWER_WORD_SCHEMES = ("judge", "self_reward", "pairwise_judge")
# `ranking.gate`: label-free checks that a candidate gives an answer at all.
ANSWER_GATES = ("none", "number")
# The schemes that rank image prompts (a vision-language student): those
# whose scorer rows keep the prompt's images (pmi, anchor_recon: the
# prompt's image tokens and pixels in every row) and those that read no
# model rows. judge, self_reward and pairwise_judge are refused.
IMAGE_SCHEMES = ("anchor_recon", "pmi", "similarity", "oracle",
                 "teacher_judge")

@dataclasses.dataclass(frozen=True)
class Scorers:
  """The scorer model's log-prob functions over host arrays (outputs are
  anything `np.asarray` takes).

  Attributes:
    token_logps: (tokens i32[R, T], mask bool[R, T]) -> f32[R, T]
      (`scoring.token_logps`).
    last_logps: (tokens, mask) -> f32[R, V] (`scoring.last_logps`).
    response_logps: (prefix i32[G, P], prefix_mask, suffix i32[G, M, S],
      suffix_mask[, pixel_values, pixel_mask]) -> f32[G, M, S]
      (`scoring.response_logps`; the pixels, [G, I, ...], are the images
      of the prefixes' image tokens).
    response_next_logps: same arguments -> f32[G, M, V]
      (`scoring.response_next_logps`).
  """
  token_logps: Callable
  last_logps: Callable
  response_logps: Callable
  response_next_logps: Callable


def model_scorers(model, *, vocab_chunk: int | None = None) -> Scorers:
  """`Scorers` of a model object, via `scoring.jitted_*` (one device)."""
  return Scorers(
      token_logps=functools.partial(scoring.jitted_token_logps, model,
                                    vocab_chunk=vocab_chunk),
      last_logps=functools.partial(scoring.jitted_last_logps, model),
      response_logps=lambda pt, pm, r, rm, pv=None, pxm=None: (
          scoring.jitted_response_logps(model, pt, pm, r, rm,
                                        vocab_chunk=vocab_chunk,
                                        pixel_values=pv, pixel_mask=pxm)),
      response_next_logps=functools.partial(
          scoring.jitted_response_next_logps, model))


# ----------------------------------------------------------------------------
# (b) pure score functions


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


# ----------------------------------------------------------------------------
# (c) glue: run the scorer model over the rows of one group batch


def _rows_in_chunks(fn, arrays, rows_per_call: int) -> np.ndarray:
  """fn(*row_chunk) over chunks of min(rows_per_call, R) rows; the last
  chunk is padded by repeating its last row, so every call has the same
  shape."""
  r = arrays[0].shape[0]
  rows_per_call = min(rows_per_call, r)
  n = -(-r // rows_per_call) * rows_per_call
  idx = np.minimum(np.arange(n), r - 1)
  outs = [np.asarray(fn(*(jnp.asarray(x[idx[s:s + rows_per_call]])
                          for x in arrays)))
          for s in range(0, n, rows_per_call)]
  return np.concatenate(outs, axis=0)[:r]


@dataclasses.dataclass(frozen=True)
class SharedRows:
  """A `templates.ScoringBatch` of G groups of M rows as (shared prefix,
  suffixes).

  The rows of one group (one prompt's candidates) agree on a long head (the
  chat template, the prompt, the anchor): it is run once per group and the
  M suffixes attend to its keys and values (`scoring.response_logps`).

  Attributes:
    prefix: i32[G, P] left-padded; prefix_mask: bool[G, P].
    suffix: i32[G, M, S] right-padded; suffix_mask: bool[G, M, S].
  """
  prefix: np.ndarray
  prefix_mask: np.ndarray
  suffix: np.ndarray
  suffix_mask: np.ndarray


def share_prefixes(batch: templates.ScoringBatch, m: int, *, pad_id: int,
                   pad_multiple: int) -> SharedRows | None:
  """Splits each group of `m` consecutive rows at their longest common
  prefix, kept short enough that every suffix holds its targets and at
  least one token; None when some group would have an empty prefix."""
  r = batch.tokens.shape[0]
  rows = [batch.tokens[i][batch.attention_mask[i]].tolist() for i in range(r)]
  n_target = batch.target_mask.sum(-1)
  heads, tails = [], []
  for g in range(r // m):
    group = rows[g * m:(g + 1) * m]
    first = group[0]
    n = min(len(x) - max(int(n_target[g * m + j]), 1)
            for j, x in enumerate(group))
    lcp = 0
    while lcp < n and all(x[lcp] == first[lcp] for x in group):
      lcp += 1
    if lcp == 0:
      return None
    heads.append(first[:lcp])
    tails.extend(x[lcp:] for x in group)
  round_up = lambda x: -(-x // pad_multiple) * pad_multiple
  prefix, prefix_mask = tok_lib.pad_left(
      heads, pad_id, round_up(max(len(h) for h in heads)))
  s = round_up(max(len(t) for t in tails))
  suffix = np.full((r, s), pad_id, np.int32)
  suffix_mask = np.zeros((r, s), bool)
  for i, t in enumerate(tails):
    suffix[i, :len(t)] = t
    suffix_mask[i, :len(t)] = True
  return SharedRows(prefix, prefix_mask, suffix.reshape(r // m, m, s),
                    suffix_mask.reshape(r // m, m, s))


def _groups_in_chunks(fn, shared: SharedRows, rows_per_call: int):
  """fn(prefix, prefix_mask, suffix, suffix_mask) over chunks of
  max(1, rows_per_call // M) groups (the last padded by repeating its last
  group), concatenated over groups."""
  m = shared.suffix.shape[1]
  return _rows_in_chunks(
      fn, (shared.prefix, shared.prefix_mask, shared.suffix,
           shared.suffix_mask), max(1, rows_per_call // m))


def _image_prefixes(batch, m, images, pad_id, pad_multiple):
  """(SharedRows, pixel_values, pixel_mask) of rows of image prompts (m
  rows a prompt): the prompt's image tokens must all be in the prefix
  (the images are merged in the prefill). Each prompt's rows share a
  prefix when that holds; else each row is its own group, its prefix all
  of its context (the targets come after the image tokens)."""
  b = batch.tokens.shape[0] // m
  need = [images.image_tokens(g) for g in range(b)]
  for per in (m, 1):
    shared = share_prefixes(batch, per, pad_id=pad_id,
                            pad_multiple=pad_multiple)
    if shared is None:
      continue
    got = ((shared.prefix == images.image_token_id)
           & shared.prefix_mask).sum(-1)
    if all(got[g] == need[g * per // m] for g in range(len(got))):
      rep = m // per
      return (shared, np.repeat(images.pixel_values, rep, 0),
              np.repeat(images.pixel_mask, rep, 0))
  raise ValueError("a scoring row's context holds more <image> tokens than "
                   "its prompt's images (an anchor or template with a "
                   "literal <image>?)")


def _token_logps(scorers: Scorers, batch: templates.ScoringBatch, m: int,
                 rows_per_call, pad_id: int, pad_multiple: int, images=None):
  """f32[R, T] `scoring.token_logps` of the rows where targets are (0 on the
  shared prefix, never a target), each group's prefix run once. With
  `images` (`vision.PromptImages`, rows of image prompts) the prefixes
  hold the images' tokens and are run with their pixels."""
  if images is not None:
    shared, pv, pm = _image_prefixes(batch, m, images, pad_id, pad_multiple)
    per = shared.suffix.shape[1]
    lp = _rows_in_chunks(
        scorers.response_logps, (shared.prefix, shared.prefix_mask,
                                 shared.suffix, shared.suffix_mask, pv, pm),
        max(1, rows_per_call // per))
  else:
    shared = share_prefixes(batch, m, pad_id=pad_id,
                            pad_multiple=pad_multiple)
    if shared is None:
      return _rows_in_chunks(scorers.token_logps,
                             (batch.tokens, batch.attention_mask),
                             rows_per_call)
    lp = _groups_in_chunks(scorers.response_logps, shared,
                           rows_per_call)  # [G, M, S]
  r, t = batch.tokens.shape
  lp = lp.reshape(r, -1)
  n = shared.suffix_mask.reshape(r, -1).sum(-1)
  out = np.zeros((r, t), np.float32)
  for i in range(r):  # a suffix is the last n[i] columns of its left-padded row
    out[i, t - n[i]:] = lp[i, :n[i]]
  return out


def _answer_logps(scorers: Scorers, batch: templates.ScoringBatch, m: int,
                  rows_per_call, pad_id: int, pad_multiple: int):
  """f32[R, V] log p(next token) after each row, each group's prefix run
  once."""
  shared = share_prefixes(batch, m, pad_id=pad_id, pad_multiple=pad_multiple)
  if shared is None:
    return _rows_in_chunks(scorers.last_logps,
                           (batch.tokens, batch.attention_mask), rows_per_call)
  lp = _groups_in_chunks(scorers.response_next_logps, shared,
                         rows_per_call)  # [G, M, V]
  return lp.reshape(batch.tokens.shape[0], -1)


def _right_pad(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  t = max(1, max(len(s) for s in seqs))
  tokens = np.zeros((len(seqs), t), np.int32)
  mask = np.zeros((len(seqs), t), bool)
  for r, s in enumerate(seqs):
    tokens[r, :len(s)] = s
    mask[r, :len(s)] = True
  return tokens, mask


def score_group(model, tok, prompts: Sequence[Sequence[dict]],
                anchors: Sequence[str],
                candidates: Sequence[Sequence[Sequence[int]]], *,
                scheme: str = "judge", template: str | None = None,
                score_anchor: bool = True, yes_word: str = "Yes",
                no_word: str = "No", aggregation: str = "bradley_terry",
                bt_iters: int = 100, bt_prior: float = 0.1,
                metric: str = "rouge_l",
                verifier: Callable[[int, str], float] | None = None,
                pmi_stop: bool = False, pair_opponents: int = 0,
                rows_per_call: int = 64,
                vocab_chunk: int | None = None, pad_multiple: int = 16,
                scorers: Scorers | None = None, images=None):
  """Self-ranking scores of a batch of groups (METHOD.md steps 3 and 4).

  Args:
    model: the scorer, a `models.llama.Llama` (the policy snapshot or the
      reference: the caller decides by which params it merges); None when
      `scorers` is given.
    tok: `models.tokenizer.Tokenizer`.
    prompts: B prompt conversations.
    anchors: B anchor texts.
    candidates: B lists of K token-id lists (cut at the first stop id).
    scheme: one of SCHEMES (`ranking.scheme`).
    template: the scheme's template; default its *_TEMPLATE constant.
    score_anchor: also score the anchor as a member, s_a = S(x, a, a), for
      PU calibration (`pu.*`); it is appended as member K.
    yes_word, no_word: the judge's answers (judge, self_reward,
      pairwise_judge).
    aggregation, bt_iters, bt_prior: `pairwise_judge` knobs.
    pair_opponents: `pairwise_judge`: 0 judges every pair of the K (+ anchor)
      members, (M (M - 1) rows per prompt for M members); an even number
      judges each member against that many others
      (`templates.pair_design`, M * pair_opponents rows).
    metric: `similarity` metric.
    verifier: `oracle` callback verifier(b, text) -> reward.
    pmi_stop: `pmi` also scores the stop token that ended a candidate (and
      an end of turn after the anchor), so stopping is a token like any
      other: an empty candidate scores log pi(stop | x, a) - log pi(stop |
      x), not 0. Off: METHOD.md's mean over the response tokens only.
    rows_per_call: most rows per model call (memory knob; every call of
      one `score_group` has the same row count, so a fixed (B, K) compiles
      once per row length).
    vocab_chunk: `scoring.token_logps` knob.
    pad_multiple: row lengths are rounded up to a multiple of this.
    scorers: the model's log-prob functions; default
      `model_scorers(model, vocab_chunk=vocab_chunk)`.
    images: None, or the prompts' images (`vision.PromptImages`, a
      vision-language scorer): the rows of schemes in IMAGE_SCHEMES keep
      each prompt's images in front of its rewritten user turn and are
      scored with its pixels; other model-row schemes are refused.

  Returns:
    (scores np.float32[B, K], anchor_score np.float32[B] or None).
  """
  if scheme not in SCHEMES:
    raise ValueError(f"scheme {scheme!r} not in {SCHEMES}")
  if scheme == "teacher_judge":  # the teacher scores: not a self-ranking
    raise ValueError("scheme 'teacher_judge' is scored by the teacher "
                     "(teacher_judge.TeacherJudge via rollout.collect(judge=))")
  if images is not None and scheme not in IMAGE_SCHEMES:
    raise ValueError(f"ranking.scheme {scheme!r} is not implemented for "
                     "image prompts (its rows would drop the images); use "
                     f"one of {', '.join(IMAGE_SCHEMES)}")
  b = len(candidates)
  k = len(candidates[0])
  groups = [[templates.cut_at_stop(y, tok.stop_ids) for y in g]
            for g in candidates]
  if score_anchor:
    groups = [g + [tok.encode(a)] for g, a in zip(groups, anchors)]
  m = k + 1 if score_anchor else k
  pad = dict(pad_multiple=pad_multiple)
  run = dict(rows_per_call=rows_per_call, pad_id=tok.pad_id,
             pad_multiple=pad_multiple)
  if images is not None:  # rows rebuilt with the prompts' images
    pad["encode_chat"] = lambda i, msgs: images.encode_chat(tok, i, msgs)
    run["images"] = images
  if scorers is None and scheme not in ("similarity", "oracle"):
    scorers = model_scorers(model, vocab_chunk=vocab_chunk)

  if scheme in ANSWER_WORD_SCHEMES:
    yes = templates.answer_token_ids(tok, yes_word)
    no = templates.answer_token_ids(tok, no_word)
    if scheme == "pairwise_judge":
      design = templates.pair_design(m, pair_opponents)
      rows = int(design.sum())
      batch = templates.pairwise_batch(
          tok, prompts, anchors, groups, opponents=pair_opponents,
          template=template or templates.PAIRWISE_TEMPLATE, **pad)
      logps = _answer_logps(scorers, batch, rows, **run)
      l = judge(jnp.asarray(logps).reshape(b, rows, -1),
                yes_ids=yes, no_ids=no)
      s = pairwise_judge(pair_matrix(l, m, pair_opponents),
                         aggregation=aggregation, iters=bt_iters,
                         bt_prior=bt_prior, pair_mask=jnp.asarray(design))
    else:
      default = (templates.JUDGE_TEMPLATE if scheme == "judge"
                 else templates.SELF_REWARD_TEMPLATE)
      batch = templates.judge_batch(tok, prompts, anchors, groups,
                                    template=template or default, **pad)
      logps = _answer_logps(scorers, batch, m, **run)
      s = judge(jnp.asarray(logps).reshape(b, m, -1), yes_ids=yes,
                no_ids=no)
  elif scheme == "pmi":
    if pmi_stop:  # candidates uncut (pmi_batches keeps each one's stop)
      groups = [list(g) + ([tok.encode(a) + [tok.stop_ids[0]]]
                           if score_anchor else [])
                for g, a in zip(candidates, anchors)]
    with_a, plain = templates.pmi_batches(
        tok, prompts, anchors, groups,
        template=template or templates.PMI_TEMPLATE, keep_stop=pmi_stop,
        **pad)
    lw = _token_logps(scorers, with_a, m, **run)
    lo = _token_logps(scorers, plain, m, **run)
    s = pmi(lw.reshape(b, m, -1), lo.reshape(b, m, -1),
            with_a.target_mask.reshape(b, m, -1))
  elif scheme == "anchor_recon":
    batch = templates.recon_batch(
        tok, prompts, anchors, groups,
        template=template or templates.RECON_TEMPLATE, **pad)
    lp = _token_logps(scorers, batch, m, **run)
    s = anchor_recon(lp.reshape(b, m, -1),
                     batch.target_mask.reshape(b, m, -1))
  elif scheme == "similarity":
    y, ym = _right_pad([ids for g in groups for ids in g])
    a, am = _right_pad([tok.encode(x) for x in anchors])
    s = similarity(y.reshape(b, m, -1), ym.reshape(b, m, -1), a, am,
                   metric=metric)
  else:
    if verifier is None:
      raise ValueError("scheme 'oracle' needs a verifier")
    s = oracle([[tok.decode(ids) for ids in g] for g in groups], verifier)
  s = np.asarray(s, np.float32)
  return s[:, :k], (s[:, k] if score_anchor else None)
