"""How well the self-ranking agrees with an oracle, where one exists.

The method's core claim is that the student, reading the anchor, ranks its
own candidates in an order that matches their true quality. On verifiable
prompts the oracle (exact answer match) says which candidates are right, so
each PU-RL batch can report, next to its loss, how much of the ranking is
signal (host-side numpy; logged per step by train/pu_rl.py):

  sample_accuracy   share of the candidates that are right;
  mixed_groups      share of the prompts with both a right and a wrong
                    candidate (the only ones where a ranking can be right
                    or wrong);
  top_right         among mixed prompts, share whose top-scored candidate
                    is right (a random ranking scores the share of right
                    candidates);
  pair_accuracy     among (right, wrong) candidate pairs of a prompt, share
                    scored right > wrong (ties count half; 0.5 = chance).

`kendall_tau_rows` (tau-b, ties handled) is the rank correlation of scores
with correctness per prompt, for the studies (rollout_store.agreement).
`shorter_preferred` asks the same of length: how often a scheme scores the
shorter of two candidates higher (experiments/rerank.py).
"""

from __future__ import annotations

import numpy as np


def ranking_vs_oracle(scores: np.ndarray, correct: np.ndarray,
                      valid: np.ndarray | None = None) -> dict[str, float]:
  """Agreement of scores f[B, K] with oracle correctness f/bool[B, K].

  `valid` bool[B] drops filler prompts. Metrics over no prompt or pair are
  NaN (logged as such, never as a fake 0).
  """
  scores = np.asarray(scores, np.float64)
  right = np.asarray(correct) > 0.5
  if valid is not None:
    keep = np.asarray(valid, bool)
    scores, right = scores[keep], right[keep]
  out = dict(sample_accuracy=float(right.mean()) if right.size else np.nan)
  mixed = right.any(-1) & ~right.all(-1)
  out["mixed_groups"] = float(mixed.mean()) if len(mixed) else np.nan
  if not mixed.any():
    out.update(top_right=np.nan, pair_accuracy=np.nan)
    return out
  s, r = scores[mixed], right[mixed]
  out["top_right"] = float(r[np.arange(len(s)), s.argmax(-1)].mean())
  pair = r[:, :, None] & ~r[:, None, :]  # [G, K, K]: i right, j wrong
  out["pair_accuracy"] = float((_pair_credit(s) * pair).sum() / pair.sum())
  return out


def _pair_credit(s: np.ndarray) -> np.ndarray:
  """f64[B, K, K] from scores f[B, K]: 1 where s_i > s_j, 1/2 where
  s_i == s_j, else 0."""
  diff = s[:, :, None] - s[:, None, :]
  return np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))


def kendall_tau_rows(x: np.ndarray, y: np.ndarray,
                     valid: np.ndarray | None = None) -> np.ndarray:
  """Kendall's tau-b of each row pair of f[B, K] x and y: f64[B].

  tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2)) over the n0 = K (K - 1) / 2
  pairs of a row: C concordant, D discordant, n1 / n2 the pairs tied in x /
  in y (a pair tied in either is neither C nor D; as scipy.stats.kendalltau).
  NaN where x or y is constant on the row (e.g. all candidates right), and
  on rows with `valid` bool[B] False.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  upper = np.triu(np.ones((x.shape[-1],) * 2, bool), k=1)
  sx = np.sign(x[:, :, None] - x[:, None, :])[:, upper]  # [B, n0]
  sy = np.sign(y[:, :, None] - y[:, None, :])[:, upper]
  den = np.sqrt((sx != 0).sum(-1) * (sy != 0).sum(-1).astype(np.float64))
  with np.errstate(invalid="ignore", divide="ignore"):
    tau = np.where(den > 0, (sx * sy).sum(-1) / den, np.nan)
  if valid is not None:
    tau = np.where(np.asarray(valid, bool), tau, np.nan)
  return tau


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
  """Kendall's tau-b of two orderings f[K] (`kendall_tau_rows`)."""
  return float(kendall_tau_rows(np.asarray(x)[None], np.asarray(y)[None])[0])


def shorter_preferred(scores: np.ndarray, lengths: np.ndarray,
                      valid: np.ndarray | None = None, *,
                      ties: str = "half") -> np.ndarray:
  """Per prompt, the share of its candidate pairs of unequal length whose
  shorter member scores higher: f64[B].

  Args:
    scores: f[B, K] a scheme's scores (or oracle correctness).
    lengths: i[B, K] candidate lengths (tokens).
    valid: bool[B]; False rows are NaN.
    ties: "half" counts a pair scored equal as 1/2; "skip" leaves it out
      (for correctness: of the (right, wrong) pairs of unequal length, the
      share whose right member is the shorter).

  Returns:
    f64[B]: over the pairs (i, j) with lengths[i] < lengths[j], credit 1 if
    s_i > s_j, 1/2 if s_i == s_j, else 0, averaged; 0.5 is indifference to
    length. NaN where no pair counts (every candidate the same length).
  """
  if ties not in ("half", "skip"):
    raise ValueError(f"ties={ties!r}: 'half' or 'skip'")
  s = np.asarray(scores, np.float64)
  n = np.asarray(lengths)
  shorter = n[:, :, None] < n[:, None, :]  # [B, K, K]: i shorter than j
  credit = _pair_credit(s)
  if ties == "skip":
    shorter = shorter & (credit != 0.5)
  pairs = shorter.sum((1, 2))
  with np.errstate(invalid="ignore", divide="ignore"):
    out = np.where(pairs > 0, (credit * shorter).sum((1, 2)) / pairs, np.nan)
  if valid is not None:
    out = np.where(np.asarray(valid, bool), out, np.nan)
  return out


def pairs_vs_oracle(chosen: np.ndarray, rejected: np.ndarray,
                    mask: np.ndarray, right: np.ndarray) -> dict[str, float]:
  """The verifier's verdict on the preference pairs a DPO step trains on.

  Args:
    chosen, rejected: i[B, M] member indices (K = the anchor).
    mask: bool[B, M] present pairs.
    right: bool[B, K + 1] the members' correctness, the anchor last.

  Returns: over present pairs (NaN without one), pair_right_over_wrong and
  pair_wrong_over_right (chosen right and rejected wrong, or the reverse;
  same-correctness pairs are neither) and pair_anchor_chosen (the share
  whose chosen is the anchor).
  """
  m = np.asarray(mask, bool)
  right = np.asarray(right, bool)
  n = int(m.sum())
  if not n:
    return dict(pair_right_over_wrong=np.nan, pair_wrong_over_right=np.nan,
                pair_anchor_chosen=np.nan)
  ch = np.take_along_axis(right, np.asarray(chosen), -1)
  rj = np.take_along_axis(right, np.asarray(rejected), -1)
  return dict(
      pair_right_over_wrong=float((m & ch & ~rj).sum() / n),
      pair_wrong_over_right=float((m & ~ch & rj).sum() / n),
      pair_anchor_chosen=float((m & (np.asarray(chosen)
                                     == right.shape[-1] - 1)).sum() / n))
