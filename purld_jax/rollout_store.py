"""Every PU-RL iteration's candidate pool on disk, to re-rank without sampling.

  store = RolloutStore(f"{workdir}/rollouts")    # the loop writes (process 0)
  store.write(step, group, prompts=..., anchors=..., anchor_keys=..., ...)

  store = RolloutStore.open(f"{workdir}/rollouts")  # a study reads
  for r in store.iter():                 # Rollout, one per step
    r4 = subsample(r, 4, seed=0)         # 4 of the K candidates per prompt
  store.add_scores(step, "pmi", scores)  # a study's scores, beside the run's

Re-ranking every step with more schemes and the agreement-with-oracle table
per scheme and K are `experiments/rerank.py`.

Layout: one directory per step (shapes change between steps: the prompt
bucket P, the member length T), each array a zarr (v2) array written with
tensorstore, one chunk (blosc-lz4), readable by zarr-python too:

  <dir>/step_00000001/
    meta.json                 step, recipe, trained scheme, B, K (the marker:
                              written last, before the directory is renamed in)
    texts.jsonl               one row per prompt: id, index, messages, answer,
                              anchor, anchor_key, candidates (K texts)
    prompt_tokens, prompt_mask              i32/bool[B, P] left-padded
    members, member_mask                    i32/bool[B, K+1, T] (member K:
                                            the anchor)
    old_logps f32[B, K, T], finished bool[B, K], valid bool[B],
    prompt_index i32[B]
    correct f32[B, K]                       oracle correctness (only when
                                            every prompt has an answer)
    scores/<scheme> f32[B, K], anchor_score/<scheme> f32[B]
    prefs/<name>        what the recipe trained on: chosen, rejected i32[B, N]
                        (member indices, K = anchor) and pair_mask bool[B, N]
                        (dpo); advantages f32[B, K] (grpo); label_dist
                        f32[B, K or K+1] (ldl)

Steps are those of metrics.jsonl (state.step after the update; the
candidates were sampled with the params before it). A step is written into
`.tmp-*` and renamed in: readers only see whole steps, and a step written
again (a resumed run re-runs the steps after its last checkpoint) replaces
the old one. `add_scores` adds a scheme's scores to a step the same way
(one array renamed in), so a re-ranking study can extend the store.

Sub-sampling restricts the pool's scores to the chosen candidates: exact for
the pointwise schemes (judge, self_reward, pmi, anchor_recon, similarity,
oracle), an approximation for pairwise_judge, whose Bradley-Terry strengths
depend on the whole group.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
import uuid
from typing import Iterator, Sequence

import numpy as np
import tensorstore as ts

from purld_jax import ledger as ledger_lib
from purld_jax import sampling

META = "meta.json"
TEXTS = "texts.jsonl"
ARRAYS = ("prompt_tokens", "prompt_mask", "members", "member_mask",
          "old_logps", "finished", "valid", "prompt_index")
# Keys of a recipe's `build_batch` kept as preferences (the small ones).
PREFERENCE_KEYS = ("chosen", "rejected", "pair_mask", "advantages",
                   "label_dist")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_STEP = re.compile(r"^step_(\d{8})$")


@dataclasses.dataclass(frozen=True)
class Rollout:
  """One stored iteration (see the module docstring for the arrays).

  Attributes:
    step, recipe, scheme: the step, its recipe and the scheme it trained on.
    prompt_ids, messages, answers, anchors, anchor_keys: B each.
    texts: B lists of K candidate texts.
    scores, anchor_scores: scheme -> f32[B, K] / f32[B].
    preferences: name -> array (empty after `subsample`).
    correct: f32[B, K] or None.
    candidate_index: i32[B, K] each candidate's slot in the stored pool.
  """

  step: int
  recipe: str
  scheme: str
  prompt_ids: list
  messages: list
  answers: list
  anchors: list
  anchor_keys: list
  texts: list
  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  members: np.ndarray
  member_mask: np.ndarray
  old_logps: np.ndarray
  finished: np.ndarray
  valid: np.ndarray
  prompt_index: np.ndarray
  scores: dict
  anchor_scores: dict
  preferences: dict
  correct: np.ndarray | None
  candidate_index: np.ndarray

  @property
  def k(self) -> int:
    return self.old_logps.shape[1]

  def candidates(self) -> list[list[list[int]]]:
    """B lists of K token-id lists (`self_scoring.score_group`'s candidates)."""
    return [[self.members[b, j][self.member_mask[b, j]].tolist()
             for j in range(self.k)] for b in range(len(self.members))]


# ----------------------------------------------------------------------------
# zarr arrays through tensorstore


def _spec(path: str) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}


def _write_arrays(root: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes name -> array as zarr arrays under root (names may hold '/')."""
  opened = {}
  for name, a in arrays.items():
    a = np.ascontiguousarray(a)
    opened[name] = (a, ts.open(
        _spec(os.path.join(root, name)), create=True, delete_existing=True,
        dtype=ts.dtype(a.dtype.name), shape=a.shape,
        chunk_layout=ts.ChunkLayout(chunk_shape=[max(1, n) for n in a.shape])))
  writes = [f.result().write(a) for a, f in opened.values()]
  for w in writes:
    w.result()


def _read_arrays(root: str, names: Sequence[str]) -> dict[str, np.ndarray]:
  opened = {n: ts.open(_spec(os.path.join(root, n)), open=True)
            for n in names}
  reads = {n: f.result().read() for n, f in opened.items()}
  return {n: np.asarray(r.result()) for n, r in reads.items()}


def _listdir(path: str) -> list[str]:
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _check_name(name: str) -> str:
  if not _NAME.match(name):
    raise ValueError(f"name {name!r}: letters, digits and _.+- only")
  return name


def _replace_dir(tmp: str, final: str) -> None:
  """Renames tmp to final, replacing a final that exists."""
  if os.path.exists(final):
    old = f"{tmp}.old"
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old)
  else:
    os.rename(tmp, final)


# ----------------------------------------------------------------------------
# Writing


def member_index(batch_members, batch_mask, members, member_mask
                 ) -> np.ndarray:
  """i32[B, U]: the member of [B, M, T] each of a compacted batch's U slots
  holds (`dpo.compact` keeps members in index order, cut to T' <= T), by
  content; -1 for an empty slot."""
  b, u, t_new = batch_mask.shape
  out = np.full((b, u), -1, np.int32)
  for i in range(b):
    prev = -1
    for s in range(u):
      if not batch_mask[i, s].any():
        continue
      same = ((member_mask[i, :, t_new:].sum(-1) == 0)
              & (member_mask[i, :, :t_new] == batch_mask[i, s]).all(-1)
              & ((members[i, :, :t_new] == batch_members[i, s])
                 | ~batch_mask[i, s]).all(-1))
      hits = np.flatnonzero(same)
      later = hits[hits > prev]
      out[i, s] = prev = int(later[0] if len(later) else hits[0])
  return out


def preferences_of(batch: dict, group) -> dict[str, np.ndarray]:
  """The small preference arrays of a recipe's batch; pair indices are
  mapped back to member indices (K = the anchor) when members were
  compacted."""
  out = {k: np.asarray(batch[k]) for k in PREFERENCE_KEYS if k in batch}
  if "chosen" in out and "members" in batch:
    slots = member_index(np.asarray(batch["members"]),
                         np.asarray(batch["member_mask"]), group.members,
                         group.member_mask)
    mask = np.asarray(batch["pair_mask"], bool)
    for key in ("chosen", "rejected"):
      idx = np.take_along_axis(slots, out[key].astype(np.int64), -1)
      out[key] = np.where(mask, idx, 0).astype(np.int32)
  return out


def correctness(texts: Sequence[Sequence[str]], answers: Sequence,
                verifier) -> np.ndarray | None:
  """f32[B, K] verifier(b, text), or None unless every prompt has an answer."""
  if any(a is None for a in answers):
    return None
  return np.array([[verifier(b, t) for t in g] for b, g in enumerate(texts)],
                  np.float32)


class RolloutStore:
  """The rollout store in `path` (created); see the module docstring."""

  def __init__(self, path: str | os.PathLike, *, create: bool = True):
    self.path = os.path.abspath(os.fspath(path))
    if create:
      os.makedirs(self.path, exist_ok=True)
      for name in _listdir(self.path):  # left by a killed writer
        if name.startswith(".tmp-"):
          shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
    elif not os.path.isdir(self.path):
      raise FileNotFoundError(f"no rollout store at {self.path}")

  @classmethod
  def open(cls, path: str | os.PathLike) -> RolloutStore:
    """An existing store, for reading (and `add_scores`)."""
    return cls(path, create=False)

  def step_dir(self, step: int) -> str:
    return os.path.join(self.path, f"step_{step:08d}")

  def steps(self) -> list[int]:
    """The steps written in full, ascending."""
    return [int(m.group(1)) for m in map(_STEP.match, _listdir(self.path))
            if m and os.path.isfile(os.path.join(self.path, m.group(0), META))]

  def write(self, step: int, group, *, prompts, anchors: Sequence[str],
            anchor_keys: Sequence[str], scheme: str, recipe: str = "",
            prompt_index: np.ndarray | None = None,
            preferences: dict | None = None,
            correct: np.ndarray | None = None) -> None:
    """Writes (or replaces) step `step` from a `rollout.Group`.

    Args:
      step: the step (metrics.jsonl's).
      group: the iteration's `rollout.Group`.
      prompts: its B `prompts.Prompt`s; anchors, anchor_keys: B each.
      prompt_index: i32[B] the prompts' positions in their file.
      scheme: the scheme that made `group.scores` (ranking.scheme).
      recipe: the recipe that trained on it.
      preferences: `preferences_of(batch, group)`.
      correct: f32[B, K] oracle correctness, if any.
    """
    k = group.k
    arrays = dict(prompt_tokens=group.prompt_tokens,
                  prompt_mask=group.prompt_mask, members=group.members,
                  member_mask=group.member_mask, old_logps=group.old_logps,
                  finished=group.finished, valid=group.valid)
    arrays["prompt_index"] = np.asarray(
        np.arange(len(group.valid)) if prompt_index is None else prompt_index,
        np.int32)
    arrays[f"scores/{_check_name(scheme)}"] = group.scores
    arrays[f"anchor_score/{scheme}"] = group.anchor_score
    for name, a in (preferences or {}).items():
      arrays[f"prefs/{_check_name(name)}"] = a
    if correct is not None:
      arrays["correct"] = np.asarray(correct, np.float32)
    tmp = os.path.join(self.path, f".tmp-{step:08d}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    _write_arrays(tmp, arrays)
    with open(os.path.join(tmp, TEXTS), "w", encoding="utf-8") as f:
      for b, p in enumerate(prompts):
        f.write(json.dumps(dict(
            id=p.id, messages=p.as_dicts(), answer=p.answer,
            anchor=anchors[b], anchor_key=anchor_keys[b],
            candidates=list(group.texts[b])), ensure_ascii=False) + "\n")
    with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
      json.dump(dict(step=step, recipe=recipe, scheme=scheme,
                     b=len(group.valid), k=k, written=time.time()), f)
    _replace_dir(tmp, self.step_dir(step))

  def record(self, step: int, group, batch: dict, *, prompt_batch, anchors,
             teacher, scheme: str, recipe: str, correct=None) -> float:
    """`write` from what the PU-RL loop holds: the `data.PromptBatch`, the
    recipe's batch, ledger keys from the teacher's requests, and the
    candidates' correctness (`correctness`, computed once by the loop for
    its oracle_* metrics too). Returns the seconds it took."""
    t0 = time.perf_counter()
    prompts = prompt_batch.prompts
    self.write(step, group, prompts=prompts, anchors=anchors,
               prompt_index=prompt_batch.index,
               anchor_keys=[ledger_lib.ledger_key(teacher.request(p))
                            for p in prompts],
               scheme=scheme, recipe=recipe,
               preferences=preferences_of(batch, group),
               correct=correct)
    return time.perf_counter() - t0

  def add_scores(self, step: int, scheme: str, scores: np.ndarray,
                 anchor_score: np.ndarray | None = None, *,
                 overwrite: bool = False) -> bool:
    """Stores scores/<scheme> f32[B, K] (and anchor_score/<scheme> f32[B])
    for a written step; False (nothing written) if present and not
    `overwrite`."""
    root = self.step_dir(step)
    meta = self._meta(step)
    scores = np.asarray(scores, np.float32)
    if scores.shape != (meta["b"], meta["k"]):
      raise ValueError(f"scores {scores.shape} != (B, K) = "
                       f"({meta['b']}, {meta['k']}) of step {step}")
    _check_name(scheme)
    if scheme in _listdir(os.path.join(root, "scores")) and not overwrite:
      return False
    new = {"scores": scores}
    if anchor_score is not None:
      new["anchor_score"] = np.asarray(anchor_score, np.float32)
    tag = uuid.uuid4().hex[:8]
    for group_name, a in new.items():  # anchor_score first, scores last
      parent = os.path.join(root, group_name)
      os.makedirs(parent, exist_ok=True)
      tmp = os.path.join(parent, f".tmp-{scheme}-{tag}")
      _write_arrays(parent, {os.path.basename(tmp): a})
      _replace_dir(tmp, os.path.join(parent, scheme))
    return True

  def schemes(self, step: int) -> list[str]:
    return [n for n in _listdir(os.path.join(self.step_dir(step), "scores"))
            if not n.startswith(".")]

  def _meta(self, step: int) -> dict:
    path = os.path.join(self.step_dir(step), META)
    if not os.path.isfile(path):
      raise KeyError(f"step {step} is not in {self.path}")
    with open(path, encoding="utf-8") as f:
      return json.load(f)

  def read(self, step: int) -> Rollout:
    meta = self._meta(step)
    root = self.step_dir(step)
    schemes = self.schemes(step)
    anchored = [n for n in _listdir(os.path.join(root, "anchor_score"))
                if not n.startswith(".")]
    prefs = _listdir(os.path.join(root, "prefs"))
    names = list(ARRAYS) + [f"scores/{s}" for s in schemes] + [
        f"anchor_score/{s}" for s in anchored] + [f"prefs/{p}" for p in prefs]
    has_correct = os.path.isdir(os.path.join(root, "correct"))
    a = _read_arrays(root, names + (["correct"] if has_correct else []))
    with open(os.path.join(root, TEXTS), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    b, k = meta["b"], meta["k"]
    return Rollout(
        step=step, recipe=meta["recipe"], scheme=meta["scheme"],
        prompt_ids=[r["id"] for r in rows],
        messages=[r["messages"] for r in rows],
        answers=[r["answer"] for r in rows],
        anchors=[r["anchor"] for r in rows],
        anchor_keys=[r["anchor_key"] for r in rows],
        texts=[r["candidates"] for r in rows],
        **{n: a[n] for n in ARRAYS},
        scores={s: a[f"scores/{s}"] for s in schemes},
        anchor_scores={s: a[f"anchor_score/{s}"] for s in anchored},
        preferences={p: a[f"prefs/{p}"] for p in prefs},
        correct=a.get("correct"),
        candidate_index=np.broadcast_to(np.arange(k, dtype=np.int32),
                                        (b, k)).copy())

  def iter(self, steps: Sequence[int] | None = None) -> Iterator[Rollout]:
    for step in self.steps() if steps is None else steps:
      yield self.read(step)


# ----------------------------------------------------------------------------
# Sub-sampled groups (studies of K)


def candidate_lengths(r: Rollout) -> np.ndarray:
  """i64[B, K] tokens of each candidate before its stop token (the stored
  member mask holds the stop token of a finished candidate)."""
  return sampling.tokens_before_stop(
      r.member_mask[:, :r.finished.shape[1]].sum(-1), r.finished)


def subsample(r: Rollout, k: int, seed: int) -> Rollout:
  """k of the K candidates of each prompt, the same for the same (seed,
  step); kept in pool order, the anchor still last. Preferences (made on
  the whole pool) are dropped."""
  b, big_k = r.old_logps.shape[:2]
  if not 1 <= k <= big_k:
    raise ValueError(f"k={k} not in [1, K={big_k}]")
  rng = np.random.default_rng([seed, r.step])
  idx = np.sort(np.stack([rng.choice(big_k, k, replace=False)
                          for _ in range(b)]), axis=1)
  take = lambda x: np.take_along_axis(
      x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
  members = np.concatenate([take(r.members[:, :big_k]), r.members[:, big_k:]],
                           axis=1)
  mask = np.concatenate([take(r.member_mask[:, :big_k]),
                         r.member_mask[:, big_k:]], axis=1)
  return dataclasses.replace(
      r, members=members, member_mask=mask, old_logps=take(r.old_logps),
      finished=take(r.finished),
      scores={s: take(v) for s, v in r.scores.items()}, preferences={},
      correct=None if r.correct is None else take(r.correct),
      texts=[[g[j] for j in row] for g, row in zip(r.texts, idx)],
      candidate_index=take(r.candidate_index))
