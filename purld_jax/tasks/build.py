"""Writes a task's train.jsonl, eval.jsonl (dev.jsonl) and manifest.json.

  .venv/bin/python -m purld_jax.tasks.build --task=gsm8k --out=runs/tasks/gsm8k
  .venv/bin/python -m purld_jax.tasks.build --task=math500 --out=DIR --num_train=512
  .venv/bin/python -m purld_jax.tasks.build --task=procedural --out=DIR --num_eval=128 --seed=1
  .venv/bin/python -m purld_jax.tasks.build --task=shapes --out=data/shapes
  .venv/bin/python -m purld_jax.tasks.build --list

Steps: the eval set (a fixed benchmark, or generated) is deduplicated within
itself and, when --num_eval is below its size, subsampled with --seed (file
order kept); the train pool is deduplicated within itself, every item whose
normalised prompt equals an eval item's is dropped (``dedup.py``), and the
first --num_train are kept. A task with a dev split (``Task.dev``) also
writes dev.jsonl: deduplicated within itself and against the eval source,
and train items equal to a dev item are dropped as well (the three splits
are disjoint). Same arguments, same bytes: the manifest has no timestamp.

Records with images (``shapes``): the image bytes are written once each to
``images/<sha256 prefix>.<ext>`` under --out, and the record's ``images``
lists those paths, relative to the JSONL (as ``prompts.read_jsonl`` reads
them). Image files under ``images/`` that the build did not write are
removed, so the folder holds exactly the images of the written splits.

Each line is a prompt record read by ``purld_jax.prompts`` (``{"id",
"prompt", "answer"}``, and ``solution``, ``images`` where the task has them)
plus ``source`` and ``metadata`` / ``category`` keys that the reader
ignores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from typing import Any

from purld_jax import images as images_lib
from purld_jax import tasks as tasks_lib
from purld_jax.tasks import dedup

IMAGES_DIR = "images"
_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}


def make(task: tasks_lib.Task, *, num_train: int | None = None,
         num_eval: int | None = None, num_dev: int | None = None,
         seed: int = 0) -> tuple[dict[str, list[dict]], dict[str, Any]]:
  """-> ({"train", "eval"[, "dev"]: records}, manifest without file hashes)."""
  num_train = task.num_train if num_train is None else num_train
  num_eval = task.num_eval if num_eval is None else num_eval
  num_dev = task.num_dev if num_dev is None else num_dev
  if num_train < 0 or num_dev < 0 or (num_eval is not None and num_eval < 0):
    raise ValueError("num_train, num_dev and num_eval must be >= 0, got "
                     f"{num_train}, {num_dev}, {num_eval}")

  eval_pool, eval_prov = task.eval(num_eval, seed)
  eval_kept, eval_dups = dedup.within(eval_pool)
  if num_eval is not None and num_eval < len(eval_kept):
    if task.num_eval is None:  # a fixed set: a seeded subsample, in file order
      keep = sorted(random.Random(seed).sample(range(len(eval_kept)), num_eval))
      eval_kept = [eval_kept[i] for i in keep]
    else:  # generated from the seed already
      eval_kept = eval_kept[:num_eval]

  dev_kept = None
  if task.dev is not None:
    dev_pool, dev_prov = task.dev(num_dev, seed)
    dev_kept, dev_dups = dedup.within(dev_pool)
    dev_kept, dev_overlap = dedup.against(dev_kept, eval_pool)
    dev_kept = dev_kept[:num_dev]

  train_pool, train_prov = task.train(num_train, seed)
  train_kept, train_dups = dedup.within(train_pool)
  # Against the whole eval source, not only the subsample: never train on a benchmark item.
  train_kept, overlap = dedup.against(train_kept, eval_pool)
  if dev_kept is not None:
    train_kept, overlap_dev = dedup.against(train_kept, dev_pool)
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
  splits = {"train": train_kept, "eval": eval_kept}
  if dev_kept is not None:
    manifest["args"]["num_dev"] = num_dev
    manifest["sources"]["dev"] = dev_prov
    manifest["counts"]["train"]["overlap_with_dev_removed"] = overlap_dev
    manifest["counts"]["dev"] = {
        "requested": num_dev, "generated": len(dev_pool),
        "duplicates_removed": dev_dups, "overlap_with_eval_removed": dev_overlap,
        "written": len(dev_kept)}
    splits["dev"] = dev_kept
  return splits, manifest


def _save_images(splits: dict[str, list[dict]], out: str
                 ) -> tuple[dict[str, list[dict]], dict[str, Any] | None]:
  """Writes the records' image bytes under out/images/ (once per distinct
  image) and returns the records with relative paths in their place, and
  the images' manifest entry (None when no record has images)."""
  folder = os.path.join(out, IMAGES_DIR)
  written: dict[str, int] = {}
  result = {}
  for name, records in splits.items():
    result[name] = []
    for r in records:
      if not r.get("images"):
        result[name].append(r)
        continue
      paths = []
      for data in r["images"]:
        file = (f"{images_lib.digest(data)[:16]}."
                f"{_EXT[images_lib.image_format(data)]}")
        if file not in written:
          os.makedirs(folder, exist_ok=True)
          with open(os.path.join(folder, file), "wb") as f:
            f.write(data)
          written[file] = len(data)
        paths.append(f"{IMAGES_DIR}/{file}")
      result[name].append(dict(r, images=paths))
  if os.path.isdir(folder):  # images of an earlier build, not of this one
    for file in sorted(os.listdir(folder)):
      if file not in written and file.rsplit(".", 1)[-1] in _EXT.values():
        os.remove(os.path.join(folder, file))
  if not written:
    return result, None
  listing = "".join(f"{name}\n" for name in sorted(written)).encode()
  return result, {"folder": IMAGES_DIR, "files": len(written),
                  "bytes": sum(written.values()),
                  "names_sha256": hashlib.sha256(listing).hexdigest()}


def _dump(records: list[dict], path: str) -> str:
  data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                 for r in records).encode("utf-8")
  with open(path, "wb") as f:
    f.write(data)
  return hashlib.sha256(data).hexdigest()


def write(task_name: str, out: str, *, num_train: int | None = None,
          num_eval: int | None = None, num_dev: int | None = None,
          seed: int = 0) -> dict[str, Any]:
  """Builds task_name into out/{train,eval}.jsonl (dev.jsonl, images/) +
  manifest.json; returns the manifest."""
  splits, manifest = make(tasks_lib.get(task_name), num_train=num_train,
                          num_eval=num_eval, num_dev=num_dev, seed=seed)
  os.makedirs(out, exist_ok=True)
  splits, images = _save_images(splits, out)
  manifest["outputs"] = {
      f"{name}.jsonl": {"sha256": _dump(rows, os.path.join(out, f"{name}.jsonl")),
                        "records": len(rows)}
      for name, rows in splits.items()}
  if images is not None:
    manifest["outputs"]["images"] = images
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
  parser.add_argument("--num_dev", type=int, default=None,
                      help="dev items, for a task with a dev split "
                      "(default: the task's)")
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
                   num_eval=args.num_eval, num_dev=args.num_dev, seed=args.seed)
  counts = manifest["counts"]
  dev = (f"dev {counts['dev']['written']}, " if "dev" in counts else "")
  print(f"{args.task}: train {counts['train']['written']} "
        f"(duplicates {counts['train']['duplicates_removed']}, "
        f"overlap with eval {counts['train']['overlap_with_eval_removed']}), "
        f"{dev}eval {counts['eval']['written']} -> {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
