"""Writing and instruction-following prompts written for this project.

``data/writing/{train,eval}.jsonl`` (64 + 32 prompts, Apache-2.0 like the
project; see ``data/writing/README.md``): emails, summaries of a given text,
explanations, lists and rewrites with constraints, short creative pieces,
advice, comparisons, how-tos and plans. No reference answers: these are judged
(pairwise against a reference), not verified. Each line is a prompt record in
the format of ``purld_jax/prompts.py`` with an extra ``category`` key.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from purld_jax import prompts as prompts_lib

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "data", "writing")
SPLITS = ("train", "eval")
LICENCE = "Apache-2.0 (written for purld_jax)"


def path(split: str, data_dir: str = DATA_DIR) -> str:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return os.path.join(data_dir, f"{split}.jsonl")


def load(split: str, data_dir: str = DATA_DIR) -> list[dict[str, Any]]:
  """One split's records {id, prompt, source, category}; validated by prompts.read_jsonl."""
  file = path(split, data_dir)
  parsed = prompts_lib.read_jsonl(file)  # raises PromptFileError naming file:line
  categories = [json.loads(line).get("category") for line in _lines(file)]
  out = []
  for p, category in zip(parsed, categories, strict=True):
    if len(p.messages) != 1 or p.answer is not None:
      raise prompts_lib.PromptFileError(
          f"{file}: record {p.id!r}: a writing prompt is one user message, no answer")
    out.append({"id": p.id, "prompt": p.messages[0][1], "source": f"writing/{split}",
                "category": category})
  return out


def _lines(file: str) -> list[str]:
  with open(file, encoding="utf-8") as f:
    return [line for line in f if line.strip()]


def provenance(split: str, data_dir: str = DATA_DIR) -> dict[str, Any]:
  file = path(split, data_dir)
  with open(file, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  return {"source": "written for purld_jax", "licence": LICENCE,
          "files": {os.path.relpath(file, os.path.dirname(os.path.dirname(data_dir))):
                    {"sha256": digest}}}
