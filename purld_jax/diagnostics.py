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
  # [G, K, K]: candidate i right, j wrong; credit 1 if s_i > s_j, 1/2 if tie.
  pair = r[:, :, None] & ~r[:, None, :]
  diff = s[:, :, None] - s[:, None, :]
  credit = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
  out["pair_accuracy"] = float((credit * pair).sum() / pair.sum())
  return out
