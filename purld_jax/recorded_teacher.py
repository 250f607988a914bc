"""A real teacher's recorded answers, replayed (`teacher.backend = "recorded"`).

`tools/record_anchors.py` asks a real teacher once per prompt and writes a
JSONL file (one object a line: `id`, `prompt` (the user's text), `anchor`,
`finish_reason`, ...) with a `.json` sidecar naming the teacher (file,
sha256) and the generation parameters. This backend answers a prompt with
its recorded anchor, so a clone trains on a real teacher's anchors without
running it: nothing is asked over the network, and a prompt that was never
recorded is an error naming the file and the prompt (never a silent
fallback). A recorded answer cut at the teacher's max_tokens keeps its
finish_reason "length": the anchor store never trains on it.

A prompt with images is refused (a fatal ``TeacherError``): the file
matches prompts by their text alone and keeps no images, so a question asked
of two scenes would get one scene's answer for both.
"""

from __future__ import annotations

import json
import os

from purld_jax import teacher as teacher_lib
from purld_jax import teacher_wire


def _user_text(prompt) -> str:
  return next(c for r, c in reversed(prompt.messages) if r == "user")


def load(path: str) -> tuple[dict[str, dict], str]:
  """(user text -> record, label) of a recorded-anchors file.

  Raises:
    teacher_lib.ConfigError naming the file (and line) when it is missing or
    malformed.
  """
  if not os.path.isfile(path):
    raise teacher_lib.ConfigError(
        f"teacher.recorded_path={path!r}: no such file (record one with "
        "python -m purld_jax.tools.record_anchors)")
  rows = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        key, _, _ = r["prompt"], r["anchor"], r["finish_reason"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise teacher_lib.ConfigError(
            f"{path}:{n}: a recorded anchor needs JSON with 'prompt', "
            f"'anchor' and 'finish_reason' ({type(e).__name__}: {e})"
        ) from None
      rows[key] = r
  side = path.removesuffix(".jsonl") + ".json"
  who = os.path.basename(path)
  if os.path.isfile(side):
    with open(side, encoding="utf-8") as f:
      info = json.load(f).get("teacher", {})
    who = info.get("file") or info.get("endpoint") or who
  return rows, f"recorded {who} ({os.path.basename(path)})"


class RecordedTeacher:
  """Replays `cfg.recorded_path` (the module docstring)."""

  simulated = False

  def __init__(self, cfg: teacher_lib.TeacherConfig):
    self.cfg, self.max_concurrency = cfg, 1
    self.path = cfg.recorded_path
    self._rows, self.label = load(self.path)

  def request(self, prompt):
    # The recorded text is part of the request: a re-recorded file is a
    # new anchor, not an old ledger row.
    rec = self._rows.get(_user_text(prompt))
    return teacher_lib.Request(
        messages=teacher_wire.request_messages(prompt, self.cfg.system_prompt),
        backend="recorded", model=self.label,
        params=(("anchor", None if rec is None else rec["anchor"]),),
        images=prompt.images)

  def prepare(self):
    pass

  def ask(self, prompt, on_attempt=None):
    if prompt.images:
      raise teacher_wire.TeacherError(
          f"prompt {prompt.id!r} has images; the recorded backend matches "
          "prompts by text alone and cannot answer them: use a live teacher",
          kind="images_unsupported", fatal=True)
    rec = self._rows.get(_user_text(prompt))
    if rec is None:
      raise teacher_wire.TeacherError(
          f"prompt {prompt.id!r} is not in {self.path} (teacher.recorded_"
          "path): record it, or use a live teacher", kind="not_recorded",
          fatal=True)
    attempt = teacher_wire.Attempt(1, "ok")
    if on_attempt:
      on_attempt(attempt)
    return teacher_lib.Reply(
        text=rec["anchor"], finish_reason=rec["finish_reason"],
        truncated=rec["finish_reason"] == "length", prompt_tokens=None,
        completion_tokens=rec.get("tokens"), latency_s=0.0,
        attempts=(attempt,), simulated=False, teacher=self.label)
