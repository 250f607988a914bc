"""Deduplication of prompt records by a normalised question.

``normalise``: NFKC, lowercase, whitespace collapsed, sentence punctuation
removed (math symbols such as ``+ - * / =`` and decimal points are kept, so
"5 - 3" and "5 * 3" stay apart). Two records are duplicates when their
normalised prompts are equal (compared by sha256 of the normalised text). Within a split the first occurrence is kept;
across splits the eval split wins, so any train item equal to an eval item is
dropped (eval sets are fixed benchmarks, train sets are generated).

Records with images (``"images"``: encoded image bytes, as generated before
they are written out; ``shapes.py``): the images are part of the question,
so two such records are duplicates when their normalised prompts are equal
AND their images are byte-identical, in order (``record_key``). The same
question asked of two pictures is two items. Records without images are
keyed exactly as before.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

# Sentence punctuation carries no meaning for a duplicate test; mathematical
# symbols do ("5 - 3" and "5 * 3" differ), and so does a decimal point ("3.5").
MATH_SYMBOLS = "+-*/=^<>%()[]{}|\\"
_PUNCT = re.compile("[" + re.escape("".join(
    c for c in string.punctuation if c not in MATH_SYMBOLS + ".")) +
    "\u2018\u2019\u201c\u201d\u2013\u2014]|\\.(?!\\d)")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
  """'  What is 2+2.5?! ' -> 'what is 2+2.5': NFKC, lowercase, single spaces,
  sentence punctuation removed (math symbols and decimal points kept)."""
  text = unicodedata.normalize("NFKC", text).lower()
  text = _PUNCT.sub("", text)
  return _SPACE.sub(" ", text).strip()


def key(text: str) -> str:
  """sha256 hex of the normalised text."""
  return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def record_key(record: dict[str, Any], field: str = "prompt") -> str:
  """``key`` of the record's prompt; with images, sha256 over the normalised
  prompt and each image's sha256, in order."""
  images = record.get("images") or ()
  if not images:
    return key(record[field])
  h = hashlib.sha256(normalise(record[field]).encode("utf-8"))
  for data in images:
    if not isinstance(data, bytes):
      raise TypeError(f"record {record.get('id')!r}: dedup needs the images' "
                      f"bytes, got {type(data).__name__}")
    h.update(b"\0" + hashlib.sha256(data).digest())
  return h.hexdigest()


def within(records: Sequence[dict[str, Any]], *, field: str = "prompt"
           ) -> tuple[list[dict[str, Any]], int]:
  """Keeps the first record of each normalised prompt -> (kept, number removed)."""
  seen, kept = set(), []
  for r in records:
    k = record_key(r, field)
    if k not in seen:
      seen.add(k)
      kept.append(r)
  return kept, len(records) - len(kept)


def against(train: Sequence[dict[str, Any]], held_out: Iterable[dict[str, Any]],
            *, field: str = "prompt") -> tuple[list[dict[str, Any]], int]:
  """Drops train records whose normalised prompt is in held_out -> (kept, removed)."""
  banned = {record_key(r, field) for r in held_out}
  kept = [r for r in train if record_key(r, field) not in banned]
  return kept, len(train) - len(kept)
