"""Prompt sets -> batches of prompts (stage 1 of the data path), with grain.

  prompts = prompts_lib.read_jsonl(path)          # file:line errors there
  source = data.encode(prompts, tok, max_len=512)  # chat-tokenised, once
  it = data.train_iterator(source, batch_size=8, seed=0, buckets=(64, 128))
  batch = next(it)                                 # a PromptBatch
  state = it.get_state()                           # JSON-able; it.set_state(state)

The pipeline is a grain `MapDataset` (random access, so its iterator state is
one integer): this process's shard of the prompts (`process_index::count`,
every shard cut to the same length) -> shuffle by seed -> repeat (reshuffled
each epoch) -> batches of `batch_size // process_count` -> left-padded arrays
whose length is the smallest bucket that fits. Same seed, same batches, on
any machine; a restored iterator continues exactly where it was saved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import jax
import numpy as np
from absl import logging

from purld_jax import prompts as prompts_lib
from purld_jax import vision
from purld_jax.models import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A prompt set, tokenised once.

  Attributes:
    prompts: the kept prompts (host objects).
    index: each kept prompt's position in the file's prompt list (a stable
      id: sampling keys and logs use it).
    ids: chat-rendered token ids of each kept prompt (generation prompt
      included).
    dropped: ids of the prompts longer than `max_len`, dropped.
    pad_id: the tokenizer's pad id.
    image_processor: a vision-language student's image processor (a batch's
      pixels are made from the prompts' images when it is collated); None
      for a text student.
  """

  prompts: tuple[prompts_lib.Prompt, ...]
  index: tuple[int, ...]
  ids: tuple[tuple[int, ...], ...]
  dropped: tuple[str, ...]
  pad_id: int
  image_processor: object = None


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  """B prompts, as host objects and as left-padded arrays.

  Attributes:
    prompts: the B prompts (messages, reference answer).
    index: i32[B] each prompt's position in its file (`Encoded.index`).
    ids: the B token-id lists, unpadded.
    tokens: i32[B, P] left-padded with the pad id; P is a bucket.
    mask: bool[B, P] True on real tokens.
    valid: bool[B] False on filler rows (the last, ragged batch of an
      evaluation pass is filled up with copies of its first prompt).
    pixel_values: None (no prompt has an image), or f32[B, I, 3, Y, X] the
      prompts' image tiles, all-zero slots as padding (vision.py).
    pixel_mask: None, or bool[B, I, Y, X] their real pixels.
  """

  prompts: tuple[prompts_lib.Prompt, ...]
  index: np.ndarray
  ids: tuple[tuple[int, ...], ...]
  tokens: np.ndarray
  mask: np.ndarray
  valid: np.ndarray
  pixel_values: np.ndarray | None = None
  pixel_mask: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.prompts)

  def take(self, rows) -> "PromptBatch":
    """This batch restricted to `rows` (`rollout.select`)."""
    rows = np.asarray(rows)
    return PromptBatch(
        prompts=tuple(self.prompts[i] for i in rows), index=self.index[rows],
        ids=tuple(self.ids[i] for i in rows), tokens=self.tokens[rows],
        mask=self.mask[rows], valid=np.asarray(self.valid)[rows],
        pixel_values=(None if self.pixel_values is None
                      else self.pixel_values[rows]),
        pixel_mask=None if self.pixel_mask is None else self.pixel_mask[rows])


def encode(prompts: Sequence[prompts_lib.Prompt],
           tok: tokenizer_lib.Tokenizer, *, max_len: int,
           processor=None) -> Encoded:
  """Renders each prompt with the chat template; drops those over max_len.
  A prompt with images needs `processor` (a vision-language student's):
  its images are written out as their tile tokens (`vision.encode_prompt`).
  """
  kept, index, ids, dropped = [], [], [], []
  for i, p in enumerate(prompts):
    if p.images:
      seq = vision.encode_prompt(processor, tok, p)[0]
    else:
      seq = tuple(tok.encode_chat(p.as_dicts()))
    if len(seq) > max_len:
      dropped.append(p.id)
      continue
    kept.append(p)
    index.append(i)
    ids.append(seq)
  if dropped:
    logging.warning("dropped %d of %d prompts longer than %d tokens, e.g. %s",
                    len(dropped), len(prompts), max_len, dropped[:5])
  if not kept:
    raise ValueError(f"no prompt fits max_prompt_len={max_len} "
                     f"({len(prompts)} prompts)")
  return Encoded(tuple(kept), tuple(index), tuple(ids), tuple(dropped),
                 tok.pad_id, getattr(processor, "image_processor", None))


def shard_positions(n: int, process_index: int, process_count: int
                    ) -> range:
  """Positions 0..n-1 this process reads: every process_count-th, from its
  index, cut so that every process has n // process_count of them."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in "
                     f"[0, {process_count})")
  per = n // process_count
  if per == 0:
    raise ValueError(f"{n} prompts cannot be shared by {process_count} "
                     "processes")
  return range(process_index, per * process_count, process_count)


def collate(source: Encoded, positions: Sequence[int], *,
            buckets: Sequence[int] | None, valid: Sequence[bool] | None = None
            ) -> PromptBatch:
  """The PromptBatch of `source` rows `positions` (left-padded to a bucket)."""
  ids = tuple(source.ids[p] for p in positions)
  length = tokenizer_lib.bucket_length(max(len(s) for s in ids), buckets)
  tokens, mask = tokenizer_lib.pad_left(ids, source.pad_id, length)
  prompts = tuple(source.prompts[p] for p in positions)
  pixel_values, pixel_mask = vision.pixels_of(source.image_processor, prompts)
  return PromptBatch(
      prompts=prompts,
      index=np.asarray([source.index[p] for p in positions], np.int32),
      ids=ids, tokens=tokens, mask=mask,
      valid=np.ones(len(ids), bool) if valid is None else np.asarray(valid),
      pixel_values=pixel_values, pixel_mask=pixel_mask)


def _per_process(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not a multiple of the "
                     f"{process_count} processes")
  return batch_size // process_count


def train_dataset(source: Encoded, *, batch_size: int, seed: int,
                  buckets: Sequence[int] | None, shuffle: bool = True,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """Endless shuffled batches of this process's shard (see the docstring).

  Args:
    source: the encoded prompt set.
    batch_size: prompts per step over all processes.
    seed: shuffle seed (each epoch reshuffles, derived from it).
    buckets: prompt lengths to pad to.
    shuffle: False keeps file order (epochs repeat it).
    process_index, process_count: default `jax.process_index()` /
      `jax.process_count()`.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  per = _per_process(batch_size, pc)
  positions = shard_positions(len(source.ids), pi, pc)
  if per > len(positions):
    raise ValueError(f"a batch of {per} prompts per process is larger than "
                     f"this process's {len(positions)} prompts")
  ds = grain.MapDataset.source(list(positions))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(None)
  return ds.batch(per, drop_remainder=True,
                  batch_fn=lambda pos: collate(source, pos, buckets=buckets))


def train_iterator(source: Encoded, **kwargs) -> grain.DatasetIterator:
  """An iterator over `train_dataset(source, **kwargs)`; checkpointable
  with `get_state()` / `set_state(state)`."""
  return iter(train_dataset(source, **kwargs).to_iter_dataset())


def eval_batches(source: Encoded, *, batch_size: int,
                 buckets: Sequence[int] | None, limit: int = 0,
                 process_index: int | None = None,
                 process_count: int | None = None):
  """One pass over this process's shard in file order, in fixed-size batches.

  The last batch is filled up to `batch_size // process_count` rows with
  copies of its first prompt, marked `valid = False`, so every batch has one
  shape. `limit` > 0 keeps only the first `limit` prompts of the set.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  per = _per_process(batch_size, pc)
  n = min(limit, len(source.ids)) if limit > 0 else len(source.ids)
  positions = list(range(pi, n, pc))
  for i in range(0, len(positions), per):
    chunk = positions[i:i + per]
    fill = per - len(chunk)
    yield collate(source, chunk + [chunk[0]] * fill, buckets=buckets,
                  valid=[True] * len(chunk) + [False] * fill)
