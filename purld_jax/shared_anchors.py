"""Anchor texts on every training process; the ledger and teacher on process 0.

Several training processes (`SharedAnchors`): only process 0 opens the
ledger and talks to the teacher; the texts of a batch reach the other
processes by `multihost_utils.broadcast_one_to_all` (UTF-8 bytes: lengths,
with `for_batch` each anchor's usability code too, then one buffer), so the
workdir's ledger is read and written by one process only, and every process
holds the same anchors, and marks the same rows invalid, for the same
(global) batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from purld_jax import anchors as anchors_lib
from purld_jax import ledger as ledger_lib
from purld_jax import prompts as prompts_lib
from purld_jax import teacher as teacher_lib


def broadcast_texts(texts: Sequence[str] | None, n: int) -> list[str]:
  """Process 0's `n` texts on every process (the others pass None).

  Two collectives: the UTF-8 lengths i32[n], then the bytes u8[sum]. On one
  process: `texts` itself, no collective.
  """
  return _broadcast(texts, None, n, with_codes=False)[0]


def _broadcast(texts: Sequence[str] | None, codes: Sequence[int] | None,
               n: int, *, with_codes: bool
               ) -> tuple[list[str], list[int] | None]:
  """`broadcast_texts`; `with_codes`: process 0's `codes` (an int per text)
  ride along with the lengths (i32[2n] instead of i32[n])."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return list(texts), (list(codes) if with_codes else None)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  first = jax.process_index() == 0
  blobs = [t.encode("utf-8") for t in texts] if first else []
  head = (np.asarray([len(b) for b in blobs]
                     + (list(codes) if with_codes else []), np.int32)
          if first else np.zeros(2 * n if with_codes else n, np.int32))
  head = np.asarray(multihost_utils.broadcast_one_to_all(head))
  lengths = head[:n]
  total = int(lengths.sum())
  buf = (np.frombuffer(b"".join(blobs), np.uint8) if first
         else np.zeros(total, np.uint8))
  if total:
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  ends = np.cumsum(lengths)
  out = [bytes(buf[e - l:e]).decode("utf-8") for l, e in zip(lengths, ends)]
  return out, ([int(c) for c in head[n:]] if with_codes else None)


class SharedAnchors:
  """Anchor texts on every process; the ledger and teacher on process 0.

    anchors = SharedAnchors(workdir, teacher)
    batch, texts = anchors.for_batch(batch)  # a collective: every process calls
    anchors.close()

  `for_batch` marks rows whose anchor is unusable (truncated at the
  teacher's max_tokens, or empty) invalid; `texts` gives the texts alone,
  unusable ones included. On one process it is `AnchorStore.get_or_query`.
  Process 0 raising (e.g. AnchorError) leaves the others waiting in the
  broadcast until jax.distributed's heartbeat ends them.
  """

  def __init__(self, workdir: str | os.PathLike, teacher: teacher_lib.Teacher,
               *, process_index: int | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    pi = jax.process_index() if process_index is None else process_index
    self.store = anchors_lib.AnchorStore(workdir, teacher) if pi == 0 else None
    self.unusable: dict[str, str] = {}  # prompt id -> problem, seen so far

  def texts(self, prompts: Sequence[prompts_lib.Prompt]) -> list[str]:
    """The anchor of each prompt (process 0 asks for missing ones), unusable
    ones included: training reads `for_batch` (or `anchors`)."""
    local = (None if self.store is None
             else [a.text for a in self.store.get_or_query(prompts)])
    return broadcast_texts(local, len(prompts))

  def anchors(self, prompts: Sequence[prompts_lib.Prompt]
              ) -> tuple[list[str], list[str | None]]:
    """(texts, problems): each prompt's anchor text and why it cannot be an
    anchor ("truncated", "empty") or None; the same on every process. The
    unusable ones are remembered (`unusable`, `summary`)."""
    local, codes = None, None
    if self.store is not None:
      got = self.store.get_or_query(prompts)
      local = [a.text for a in got]
      codes = [0 if a.usable else 1 + ledger_lib.PROBLEMS.index(a.problem)
               for a in got]
    texts, codes = _broadcast(local, codes, len(prompts), with_codes=True)
    problems = [ledger_lib.PROBLEMS[c - 1] if c else None for c in codes]
    for p, problem in zip(prompts, problems):
      if problem:
        self.unusable[p.id] = problem
      else:
        self.unusable.pop(p.id, None)
    return texts, problems

  def usable(self, prompts: Sequence[prompts_lib.Prompt]) -> list[bool]:
    """Per prompt: its anchor can be trained on (a collective, as `texts`)."""
    return [p is None for p in self.anchors(prompts)[1]]

  def for_batch(self, batch):
    """(batch, texts): `batch` (a `data.PromptBatch`) with `valid` False
    where the anchor is unusable, and the anchor texts (unusable ones too:
    their rows are invalid, so nothing is trained on them)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    texts, problems = self.anchors(batch.prompts)
    ok = np.asarray([p is None for p in problems], bool)
    return dataclasses.replace(
        batch, valid=np.asarray(batch.valid, bool) & ok), texts

  def summary(self) -> str | None:
    """One line on the unusable anchors seen so far, or None if none: "N
    anchors truncated by the teacher's max_tokens; not trained on"."""
    n = {p: sum(1 for v in self.unusable.values() if v == p)
         for p in ledger_lib.PROBLEMS}
    parts = []
    if n["truncated"]:
      parts.append(f"{n['truncated']} anchors truncated by the teacher's "
                   "max_tokens")
    if n["empty"]:
      parts.append(f"{n['empty']} anchors empty")
    return "; ".join(parts) + "; not trained on" if parts else None

  def teacher_calls(self) -> float:
    """Teacher requests in the ledger (0 on processes other than 0)."""
    return 0.0 if self.store is None else float(self.store.ledger.stats().calls)

  def close(self):
    if self.store is not None:
      self.store.close()
