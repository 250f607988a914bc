"""Shared pytrees and the axis alphabet.

Every docstring in purld_jax states array shapes with these letters:

  B  prompts in a batch          K  candidates per prompt (the group)
  P  prompt tokens (left-padded) T  completion / response tokens
  S  KV-cache slots              L  decoder layers
  V  vocabulary                  D  model width (hidden size)
  N  query heads                 G  key/value heads (GQA groups)
  H  head dimension              F  MLP hidden size

Dense math may suffix names with these letters (``logits_BTV``).
"""

from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class KVCache:
  """Key/value cache shared by every layer.

  All rows write at the same slot index ``end``; rows differ only in which
  slots are real (``mask``), which is how left padding is expressed.

  Attributes:
    k: [L, B, S, G, H] keys (compute dtype), RoPE already applied.
    v: [L, B, S, G, H] values.
    mask: bool[B, S] slot holds a real token of that row.
    end: i32[] next slot to write; slots >= end are empty.
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  end: jax.Array

  @property
  def size(self) -> int:
    """S, the number of slots."""
    return self.k.shape[2]
