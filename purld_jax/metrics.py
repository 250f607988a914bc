"""Metric writers: JSONL (always) and TensorBoard event files (tensorboardX).

  writer = metrics.Writer(workdir, stage="sft", resume_step=0)
  writer.write(step, {"loss": 1.2, "tokens_per_s": 830.0})
  writer.close()

`<workdir>/metrics.jsonl` gets one line per write: {"stage", "step", "time",
...scalars}; `python -m purld_jax.plot --workdir=DIR` draws it. TensorBoard
files go to `<workdir>/tb/<stage>/` (tags "<stage>/<name>"). A run resumed
from step s first drops this stage's lines with step > s (written by the run
that was killed after its last checkpoint), and TensorBoard purges them too,
so every (stage, step) appears once. Non-finite values are written as
strings ("nan", "inf") in JSON and skipped in TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

from absl import logging

FILENAME = "metrics.jsonl"


def _json_value(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


def read(workdir: str | os.PathLike) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl` (empty when absent)."""
  path = os.path.join(os.fspath(workdir), FILENAME)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate(workdir: str | os.PathLike, *, stage: str, after_step: int
             ) -> int:
  """Drops `stage` records with step > after_step; returns how many."""
  path = os.path.join(os.fspath(workdir), FILENAME)
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for line in lines:
    try:
      r = json.loads(line)
    except json.JSONDecodeError:  # a line cut by a kill
      continue
    if not (r.get("stage") == stage and r.get("step", 0) > after_step):
      keep.append(line if line.endswith("\n") else line + "\n")
  if len(keep) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(keep)
    os.replace(tmp, path)
  return len(lines) - len(keep)


class Writer:
  """Appends one stage's metrics to metrics.jsonl and TensorBoard."""

  def __init__(self, workdir: str | os.PathLike, *, stage: str,
               resume_step: int = 0, tensorboard: bool = True):
    self.workdir, self.stage = os.fspath(workdir), stage
    os.makedirs(self.workdir, exist_ok=True)
    truncate(self.workdir, stage=stage, after_step=resume_step)
    self._f = open(os.path.join(self.workdir, FILENAME), "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard files "
                        "(pip install tensorboardX); metrics.jsonl is written")
      else:
        self._tb = tensorboardX.SummaryWriter(
            os.path.join(self.workdir, "tb", stage),
            purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """One record: `scalars` at `step` (host floats or 0-d arrays)."""
    record = {"stage": self.stage, "step": int(step),
              "time": round(time.time(), 3)}
    record.update({k: _json_value(v) for k, v in scalars.items()})
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        v = float(v)
        if math.isfinite(v):
          self._tb.add_scalar(f"{self.stage}/{k}", v, int(step))

  def text(self, tag: str, text: str, step: int = 0) -> None:
    """A text note in TensorBoard (e.g. the teacher's label)."""
    if self._tb is not None:
      self._tb.add_text(f"{self.stage}/{tag}", text, step)

  def close(self) -> None:
    self._f.close()
    if self._tb is not None:
      self._tb.close()
