"""Pure arithmetic of `benchmarks.device_check`: peaks per device kind,
MFU, the bytes a sampler decode step reads, logits parity.

Axis letters (purld_jax/structs.py): B prompts, K candidates, R = B*K rows,
P prompt tokens, T new tokens, L layers, G kv heads, H head dim, V vocab.
"""

from __future__ import annotations

import numpy as np

# (upper-case substrings of jax's device_kind, all present; first match
# wins), dense bf16 FLOP/s, HBM bytes/s: vendor datasheets.
PEAKS = (
    (("GH200",), None, None),  # not tabled: n/a
    (("H100", "PCIE"), 756e12, 2.0e12),
    (("H100", "NVL"), 835e12, 3.9e12),
    (("H100",), 989e12, 3.35e12),  # SXM
    (("H200",), 989e12, 4.8e12),
    (("A100", "40GB"), 312e12, 1.555e12),
    (("A100",), 312e12, 2.0e12),
)


def peak_of(device_kind: str) -> tuple[float | None, float | None]:
  """(dense bf16 FLOP/s, HBM bytes/s) of a jax device_kind; (None, None)
  when it is not in PEAKS (CPU included)."""
  kind = device_kind.upper()
  for keys, flops, bw in PEAKS:
    if all(k in kind for k in keys):
      return flops, bw
  return None, None


def mfu(n_params: float, tokens: float, seconds: float,
        peak_flops: float | None) -> float | None:
  """6 * n_params * tokens / seconds / peak_flops (None without a peak)."""
  return 6.0 * n_params * tokens / seconds / peak_flops if peak_flops else None


def decode_bytes(cfg, b: int, k: int, p: int, t: int, *, weight_bytes: int,
                 cache_bytes: int, chunk: int = 32) -> float:
  """Bytes one sampler decode step reads, averaged over its T - 1 steps.

  The weights once (an untied input table is only gathered, R rows: left
  out); the B prompts' keys and values [L, B, G, P, H] x 2 once for their K
  rows; each of the R = B*K rows' own keys and values [L, R, G, slots, H] x
  2, where step s (column s, 0 <= s < T - 1) reads its own slots a chunk
  of `chunk` (`prefix_cache.CHUNK`) at a time up to column s's chunk.
  """
  weights = cfg.num_params() - (0 if cfg.tie_word_embeddings
                                else cfg.vocab_size * cfg.hidden_size)
  per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
  own = np.mean([(s // chunk + 1) * chunk for s in range(max(t - 1, 1))])
  return (weight_bytes * weights
          + cache_bytes * per_slot * (b * p + b * k * own))


def bandwidth_fraction(step_bytes: float, seconds: float,
                       peak_bw: float | None) -> float | None:
  """step_bytes / seconds / peak_bw (None without a peak)."""
  return step_bytes / seconds / peak_bw if peak_bw else None


def compare(out_BTV: np.ndarray, ref_BTV: np.ndarray) -> tuple[float, float]:
  """(max |out - ref|, fraction of the B*T positions whose argmax over V
  agrees) of two f32[B, T, V] logits."""
  out, ref = np.asarray(out_BTV, np.float32), np.asarray(ref_BTV, np.float32)
  return (float(np.max(np.abs(out - ref))),
          float(np.mean(out.argmax(-1) == ref.argmax(-1))))
