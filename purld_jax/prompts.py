"""Prompt sets: one JSON object a line, read into hashable ``Prompt`` records.

Shared by the anchor fetcher (``anchors.py``) and the training data pipeline.
A line is one of

  {"messages": [{"role": "user", "content": "..."}, ...], "answer": "...", "id": "..."}
  {"prompt": "...", "answer": "...", "id": "..."}

``messages`` and ``prompt`` are mutually exclusive; ``prompt`` is shorthand for
one user message. Roles are ``system``, ``user`` and ``assistant``; the last
message must be the user's (the teacher and the student answer it). ``answer``
(optional) is the reference answer of a verifiable task: a string, or a number
that is kept as its JSON text. ``id`` (optional, string or integer) defaults to
the line number (1-based) as a string; ids must be unique within a file. Other
keys of a record are ignored (datasets carry metadata); unknown keys inside a
message are an error, since dropping them would change what is asked. Blank
lines are skipped. Any malformed line fails with ``PromptFileError`` naming
``file:line`` and the field.

Images (vision-language students): an optional ``"images"`` list, in either
form, attaches images to the LAST user message, in order (the student renders
them before that message's text; the teacher gets them as ``image_url``
content parts). Each entry is a path (relative to the prompt file's folder,
or absolute) or a ``data:image/<type>;base64,...`` URI. The files are read
when the prompt file is read and kept as their encoded bytes
(``Prompt.images``); each must decode with PIL and be PNG, JPEG, WebP or GIF,
at most ``images.MAX_IMAGES`` (8) a prompt and ``images.MAX_IMAGE_BYTES``
(20 MiB) each (``images.py`` says why). Errors name the entry
(``images[1]``). A record without ``images`` (or with ``[]``) reads exactly
as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from purld_jax import images as images_lib

ROLES = ("system", "user", "assistant")


class PromptFileError(ValueError):
  """A prompt record that cannot be read; the message names where and why."""


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt.

  Attributes:
    id: the record's id (unique within its file).
    messages: ((role, content), ...), the conversation to answer.
    answer: the reference answer, or None.
    solution: a worked reference solution (what the `dataset` teacher
      answers when present), or None.
    images: the encoded image files (PNG/JPEG/WebP/GIF bytes) attached to
      the last user message, in order; () for a text-only prompt. Left out
      of repr (bytes); part of equality and the hash.
  """

  id: str
  messages: tuple[tuple[str, str], ...]
  answer: str | None = None
  solution: str | None = None
  images: tuple[bytes, ...] = dataclasses.field(default=(), repr=False)

  @classmethod
  def from_text(cls, text: str, *, id: str, answer: str | None = None,
                images: tuple[bytes, ...] = ()) -> Prompt:
    """A prompt of one user message (with ``images`` attached to it)."""
    return cls(id=id, messages=(("user", text),), answer=answer,
               images=tuple(images))

  def as_dicts(self) -> list[dict[str, str]]:
    """The messages as OpenAI-style ``[{"role": ..., "content": ...}]``, text
    only: ``images`` are not in it (``teacher_wire.openai_messages`` adds them
    as content parts)."""
    return [{"role": r, "content": c} for r, c in self.messages]


def _fail(where: str, field: str, why: str):
  raise PromptFileError(f"{where}: field {field!r}: {why}")


def _messages(value: Any, where: str) -> tuple[tuple[str, str], ...]:
  if not isinstance(value, list) or not value:
    _fail(where, "messages", "must be a non-empty list of {role, content} objects")
  out = []
  for i, m in enumerate(value):
    field = f"messages[{i}]"
    if not isinstance(m, dict):
      _fail(where, field, f"must be an object, got {type(m).__name__}")
    extra = sorted(set(m) - {"role", "content"})
    if extra:
      _fail(where, field, f"unknown keys {extra} (allowed: role, content)")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
      _fail(where, f"{field}.role", f"must be one of {list(ROLES)}, got {role!r}")
    if not isinstance(content, str):
      _fail(where, f"{field}.content",
            f"must be a string, got {type(content).__name__}")
    out.append((role, content))
  if out[-1][0] != "user":
    _fail(where, f"messages[{len(out) - 1}].role",
          f"the last message must be the user's, got {out[-1][0]!r}")
  return tuple(out)


def _scalar_text(record: Mapping[str, Any], key: str, where: str) -> str | None:
  """A string field, or a number kept as its JSON text; None when absent."""
  value = record.get(key)
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return json.dumps(value)
  _fail(where, key, f"must be a string or a number, got {type(value).__name__}")


def _images(value: Any, where: str, base_dir: str | None) -> tuple[bytes, ...]:
  """The ``images`` field -> the images' bytes, read and checked."""
  if value is None:
    return ()
  if not isinstance(value, list):
    _fail(where, "images", "must be a list of paths or data: URIs, got "
          f"{type(value).__name__}")
  if len(value) > images_lib.MAX_IMAGES:
    _fail(where, "images", f"{len(value)} images; at most "
          f"{images_lib.MAX_IMAGES} a prompt")
  out = []
  for i, spec in enumerate(value):
    try:
      out.append(images_lib.read(spec, base_dir))
    except images_lib.ImageError as e:
      _fail(where, f"images[{i}]", str(e))
  return tuple(out)


def parse_record(record: Any, *, where: str, default_id: str,
                 base_dir: str | None = None) -> Prompt:
  """One decoded JSON record -> Prompt; ``where`` (e.g. ``file:line``) goes in
  errors; relative image paths are relative to ``base_dir`` (None: the
  working directory)."""
  if not isinstance(record, dict):
    raise PromptFileError(
        f"{where}: a record must be a JSON object, got {type(record).__name__}")
  has_messages, has_prompt = "messages" in record, "prompt" in record
  if has_messages and has_prompt:
    _fail(where, "messages", "give either 'messages' or 'prompt', not both")
  if has_messages:
    messages = _messages(record["messages"], where)
  elif has_prompt:
    text = record["prompt"]
    if not isinstance(text, str):
      _fail(where, "prompt", f"must be a string, got {type(text).__name__}")
    messages = (("user", text),)
  else:
    raise PromptFileError(
        f"{where}: missing field: a record needs 'messages' or 'prompt'")
  pid = _scalar_text(record, "id", where)
  return Prompt(id=default_id if pid is None else pid, messages=messages,
                answer=_scalar_text(record, "answer", where),
                solution=_scalar_text(record, "solution", where),
                images=_images(record.get("images"), where, base_dir))


def parse_lines(lines: Iterable[str], *, name: str,
                base_dir: str | None = None) -> list[Prompt]:
  """JSONL lines -> prompts; ``name`` labels errors (``name:line``);
  ``base_dir`` as in ``parse_record``."""
  prompts, seen = [], {}
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"{name}:{lineno}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise PromptFileError(f"{where}: bad JSON: {e.msg} (column {e.colno})") from None
    prompt = parse_record(record, where=where, default_id=str(lineno),
                          base_dir=base_dir)
    if prompt.id in seen:
      _fail(where, "id", f"duplicate id {prompt.id!r} (first at line {seen[prompt.id]})")
    seen[prompt.id] = lineno
    prompts.append(prompt)
  return prompts


def read_jsonl(path: str | os.PathLike) -> list[Prompt]:
  """Reads a JSONL prompt file (see the module docstring for the format)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise PromptFileError(f"{path}: no such prompt file")
  with open(path, "rb") as f:
    raw = f.read().splitlines()
  lines = []
  for lineno, line in enumerate(raw, start=1):
    try:
      lines.append(line.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise PromptFileError(f"{path}:{lineno}: not UTF-8 text (byte "
                            f"{line[e.start]:#04x} at column {e.start + 1})"
                            ) from None
  prompts = parse_lines(lines, name=path,
                        base_dir=os.path.dirname(os.path.abspath(path)))
  if not prompts:
    raise PromptFileError(f"{path}: no prompts (the file is empty)")
  return prompts
