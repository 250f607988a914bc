"""Writes a task's train.jsonl, eval.jsonl and manifest.json.

  .venv/bin/python -m purld_jax.tasks.build --task=gsm8k --out=runs/tasks/gsm8k
  .venv/bin/python -m purld_jax.tasks.build --task=math500 --out=DIR --num_train=512
  .venv/bin/python -m purld_jax.tasks.build --task=procedural --out=DIR --num_eval=128 --seed=1
  .venv/bin/python -m purld_jax.tasks.build --list

Steps: the eval set (a fixed benchmark, or generated) is deduplicated within
itself and, when --num_eval is below its size, subsampled with --seed (file
order kept); the train pool is deduplicated within itself, every item whose
normalised prompt equals an eval item's is dropped (``dedup.py``), and the
first --num_train are kept. Same arguments, same bytes: the manifest has no
timestamp. Each line is a prompt record read by ``purld_jax.prompts``
(``{"id", "prompt", "answer"}``) plus ``source`` and ``metadata`` /
``category`` keys that the reader ignores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from typing import Any

from purld_jax import tasks as tasks_lib
from purld_jax.tasks import dedup


def make(task: tasks_lib.Task, *, num_train: int | None = None,
         num_eval: int | None = None, seed: int = 0,
         ) -> tuple[list[dict], list[dict], dict[str, Any]]:
  """-> (train records, eval records, manifest without file hashes)."""
  num_train = task.num_train if num_train is None else num_train
  num_eval = task.num_eval if num_eval is None else num_eval
  if num_train < 0 or (num_eval is not None and num_eval < 0):
    raise ValueError(f"num_train and num_eval must be >= 0, got {num_train}, {num_eval}")

  eval_pool, eval_prov = task.eval(num_eval, seed)
  eval_kept, eval_dups = dedup.within(eval_pool)
  if num_eval is not None and num_eval < len(eval_kept):
    if task.num_eval is None:  # a fixed set: a seeded subsample, in file order
      keep = sorted(random.Random(seed).sample(range(len(eval_kept)), num_eval))
      eval_kept = [eval_kept[i] for i in keep]
    else:  # generated from the seed already
      eval_kept = eval_kept[:num_eval]

  train_pool, train_prov = task.train(num_train, seed)
  train_kept, train_dups = dedup.within(train_pool)
  # Against the whole eval source, not only the subsample: never train on a benchmark item.
  train_kept, overlap = dedup.against(train_kept, eval_pool)
  train_kept = train_kept[:num_train]

  manifest = {
      "task": task.name,
      "description": task.description,
      "command": "python -m purld_jax.tasks.build",
      "args": {"num_train": num_train, "num_eval": num_eval, "seed": seed},
      "dedup": dedup.__doc__.strip().splitlines()[0],
      "sources": {"train": train_prov, "eval": eval_prov},
      "counts": {
          "train": {"requested": num_train, "generated": len(train_pool),
                    "duplicates_removed": train_dups,
                    "overlap_with_eval_removed": overlap,
                    "written": len(train_kept)},
          "eval": {"requested": num_eval, "available": len(eval_pool),
                   "duplicates_removed": eval_dups, "written": len(eval_kept)},
      },
  }
  return train_kept, eval_kept, manifest


def _dump(records: list[dict], path: str) -> str:
  data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                 for r in records).encode("utf-8")
  with open(path, "wb") as f:
    f.write(data)
  return hashlib.sha256(data).hexdigest()


def write(task_name: str, out: str, *, num_train: int | None = None,
          num_eval: int | None = None, seed: int = 0) -> dict[str, Any]:
  """Builds task_name into out/{train,eval}.jsonl + manifest.json; returns the manifest."""
  train, held_out, manifest = make(tasks_lib.get(task_name), num_train=num_train,
                                   num_eval=num_eval, seed=seed)
  os.makedirs(out, exist_ok=True)
  manifest["outputs"] = {name: {"sha256": _dump(rows, os.path.join(out, name)),
                                "records": len(rows)}
                         for name, rows in (("train.jsonl", train),
                                            ("eval.jsonl", held_out))}
  with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
  return manifest


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", choices=tasks_lib.names())
  parser.add_argument("--out", help="output folder")
  parser.add_argument("--num_train", type=int, default=None,
                      help="train items (default: the task's)")
  parser.add_argument("--num_eval", type=int, default=None,
                      help="eval items (default: the task's; fixed sets: all)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--list", action="store_true", help="list the tasks and exit")
  args = parser.parse_args(argv)
  if args.list:
    for name in tasks_lib.names():
      print(f"{name:12s} {tasks_lib.get(name).description}")
    return 0
  if not args.task or not args.out:
    parser.error("--task and --out are required")
  manifest = write(args.task, args.out, num_train=args.num_train,
                   num_eval=args.num_eval, seed=args.seed)
  counts = manifest["counts"]
  print(f"{args.task}: train {counts['train']['written']} "
        f"(duplicates {counts['train']['duplicates_removed']}, "
        f"overlap with eval {counts['train']['overlap_with_eval_removed']}), "
        f"eval {counts['eval']['written']} -> {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
