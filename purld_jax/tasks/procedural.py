"""Training math from ``reasoning-gym``'s procedural generators.

Each item is reasoning-gym's own question, answer and metadata; the answer is
checked by reasoning-gym's scorer for that dataset
(``reasoning_gym.get_score_answer_fn(metadata["source_dataset"])``). Items are
deterministic in (seed, split, dataset name): the generator of each dataset is
seeded with a stable hash of the three, so adding a dataset does not change
the others' items.

``gsm_symbolic`` is refused: its templates are built from GSM8K test problems,
so training on it leaks the GSM8K held-out set (``EXCLUDED``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import os
from collections.abc import Sequence
from typing import Any

DIST = "reasoning-gym"
VERSION = "0.1.25"  # the version requirements.txt pins

# Arithmetic and algebra with integer answers.
DEFAULT_DATASETS = ("basic_arithmetic", "chain_sum", "simple_equations",
                    "products", "gcd", "lcm", "leg_counting")

# Datasets that must never be trained on, and why.
EXCLUDED = {
    "gsm_symbolic": "built from GSM8K test problems (leaks the held-out GSM8K test set)",
}


class ExcludedDatasetError(ValueError):
  """A reasoning-gym dataset that this project must not train on."""


def check_allowed(names: Sequence[str]) -> None:
  """Raises ExcludedDatasetError for any name in EXCLUDED."""
  for name in names:
    if name in EXCLUDED:
      raise ExcludedDatasetError(f"reasoning-gym dataset {name!r} is excluded: "
                                 f"{EXCLUDED[name]}")


def _reasoning_gym():
  try:
    import reasoning_gym  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"the {DIST} package is missing; install it with "
                      f"`.venv/bin/pip install {DIST}=={VERSION}` (or run "
                      f"scripts/setup.sh)") from e
  return reasoning_gym


def dataset_seed(seed: int, split: str, name: str) -> int:
  """A stable 31-bit seed for one dataset of one split."""
  digest = hashlib.sha256(f"{seed}:{split}:{name}".encode()).hexdigest()
  return int(digest[:8], 16) & 0x7FFFFFFF


def generate(names: Sequence[str], n: int, *, seed: int, split: str,
             ) -> list[dict[str, Any]]:
  """n items per dataset name, interleaved round-robin (d0[0], d1[0], ..., d0[1], ...)."""
  check_allowed(names)
  rg = _reasoning_gym()
  columns = []
  for name in names:
    ds = rg.create_dataset(name, seed=dataset_seed(seed, split, name), size=n)
    column = []
    for i in range(n):
      item = ds[i]
      column.append({"id": f"rg-{split}-{name}-{i:06d}",
                     "prompt": item["question"],
                     "answer": str(item["answer"]),
                     "source": f"reasoning_gym/{name}",
                     "metadata": item["metadata"]})
    columns.append(column)
  return [col[i] for i in range(n) for col in columns]


def provenance(names: Sequence[str]) -> dict[str, Any]:
  """Package version and sha256 of each generator's source file."""
  rg = _reasoning_gym()
  files = {}
  for name in names:
    cls = type(rg.create_dataset(name, seed=0, size=1))
    path = inspect.getsourcefile(cls)
    with open(path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    rel = os.path.relpath(path, os.path.dirname(os.path.dirname(rg.__file__)))
    files[rel] = {"sha256": digest, "dataset": name}
  return {"dist": DIST, "version": importlib.metadata.version(DIST),
          "datasets": list(names), "excluded": dict(EXCLUDED), "files": files}
