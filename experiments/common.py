r"""The cell runner of every study: one `python -m purld_jax.main` per cell.

  runner = Runner("experiments/main_table/small")
  ref = Cell("sft", "configs/demo.py", {"recipe": "sft"})
  dpo = Cell("purld_dpo_s0", "configs/demo.py", {"recipe": "dpo"}, seed=0,
             reference="sft")
  runner.run_all([ref, dpo])     # a finished cell is skipped on a re-run

A cell is (name, config file[:variant], overrides, seed). It runs in its own
subprocess, so a crash or a kill loses at most that cell (and the job inside
resumes from its last checkpoint on the next call), into
STUDY_DIR/cells/<name>/ (its WORKDIR), with its output in log.txt there.

Shared reference: a cell with `reference="sft"` reuses that cell's stage 1
(main.py skips stage 1 when WORKDIR/reference/SFT.json holds the same
sft.steps; nothing in main.py or pu_rl.py changes). Before launching, the
runner links WORKDIR/reference to the reference cell's, copies its anchor
ledger (no anchor is paid twice with a real teacher) and its held-out answers
of the `before` and `sft` models (heldout.py re-uses an evaluation whose
settings match; the `sft` settings name this cell's own reference path, which
holds the same weights), so every RL cell pays only for its PU-RL stage and
its `final` evaluation, and all cells are compared on the same SFT model.

A cell is done when its `done` file exists (default eval/summary.json, the
last file heldout.py writes). Its settings are kept in cell.json; a done or
half-run cell whose settings changed is an error (delete its folder to run it
again), never silently mixed. Every launch appends to STUDY_DIR/cells.jsonl:
name, command, return code, wall time (s), status. SIGTERM to a study (a
scheduler's notice) reaches the running cell, which saves its step and exits;
the study records the cell 'stopped' and exits 143 (a re-run resumes it).

Kept results: cells/ holds gigabytes and is not committed, so once a cell is
done the runner also copies its small files (the JSON and JSONL files at its
top level and in eval/, each under KEEP_MAX_BYTES: settings, metrics,
held-out answers) to STUDY_DIR/kept/<name>/, which is committed. A cell whose
folder is gone (a fresh clone, another machine) but whose kept copy is there
counts as done and the tables read the kept copy (`Runner.results`), so a
study's rows survive and a re-run only adds cells. What needs the weights
(a reference cell's stage 1 for new cells) is gone with the folder.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELLS = "cells"
LOG = "cells.jsonl"
SPEC = "cell.json"
SUMMARY = os.path.join("eval", "summary.json")
SHARED_EVALS = ("before", "sft")  # models whose held-out answers are shared
KEPT = "kept"
STOPPED_EXIT = 143  # 128 + SIGTERM, as purld_jax.main exits after one
KEEP_MAX_BYTES = 2 << 20  # larger files are not kept (module docstring)


class CellError(RuntimeError):
  """A cell that cannot be run as asked (changed settings, no reference)."""


def format_value(value: Any) -> str:
  """A config value as ml_collections' --config.KEY=VALUE parser reads it."""
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, (tuple, list)):
    inner = ",".join(format_value(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  return str(value)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the main job.

  Attributes:
    name: folder name under STUDY_DIR/cells (unique in a study).
    config: config file and variant, e.g. "configs/demo.py:tiny".
    overrides: config key -> value, as --config.KEY=VALUE.
    seed: config.seed (the run's RNG: sampling keys).
    reference: name of the cell whose stage 1 this one reuses ('' = own).
    done: file (relative to the cell's workdir) whose presence means done.
  """

  name: str
  config: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  seed: int = 0
  reference: str = ""
  done: str = SUMMARY

  def args(self, workdir: str) -> list[str]:
    """Arguments after the interpreter."""
    return (["-m", "purld_jax.main", f"--config={self.config}",
             f"--workdir={os.path.abspath(workdir)}",
             f"--config.seed={self.seed}"]
            + [f"--config.{k}={format_value(v)}"
               for k, v in self.overrides.items()])

  def spec(self) -> dict:
    return dict(name=self.name, config=self.config, seed=self.seed,
                overrides={k: format_value(v)
                           for k, v in self.overrides.items()},
                reference=self.reference, done=self.done)


def _copy_sqlite(src: str, dst: str) -> None:
  """A consistent copy of an SQLite file (WAL included) via the backup API."""
  tmp = f"{dst}.tmp-{os.getpid()}"
  source = sqlite3.connect(f"file:{src}?mode=ro", uri=True)
  target = sqlite3.connect(tmp)
  try:
    source.backup(target)
  finally:
    source.close()
    target.close()
  os.replace(tmp, dst)


def adopt_reference(workdir: str, ref_workdir: str) -> None:
  """Makes `workdir` start from `ref_workdir`'s stage 1 (module docstring):
  reference/ linked, the anchor ledger and the before/sft evaluations
  copied. Idempotent: what the cell already has is left alone."""
  workdir, ref_workdir = os.path.abspath(workdir), os.path.abspath(ref_workdir)
  os.makedirs(workdir, exist_ok=True)
  link = os.path.join(workdir, "reference")
  if not os.path.lexists(link):
    os.symlink(os.path.join(ref_workdir, "reference"), link)
  ledger = os.path.join(ref_workdir, "anchors.sqlite")
  if os.path.isfile(ledger) and not os.path.exists(
      os.path.join(workdir, "anchors.sqlite")):
    _copy_sqlite(ledger, os.path.join(workdir, "anchors.sqlite"))
  src_eval, dst_eval = (os.path.join(d, "eval") for d in (ref_workdir, workdir))
  for name in SHARED_EVALS:
    answers = os.path.join(src_eval, f"{name}.jsonl")
    settings = os.path.join(src_eval, f"{name}.settings.json")
    if not (os.path.isfile(answers) and os.path.isfile(settings)) or \
        os.path.exists(os.path.join(dst_eval, f"{name}.settings.json")):
      continue
    os.makedirs(dst_eval, exist_ok=True)
    with open(settings, encoding="utf-8") as f:
      meta = json.load(f)
    # The same weights, under this cell's path (the reference cell may be
    # reached through a link: ablation --reference_from).
    if os.path.realpath(str(meta.get("source"))) == os.path.realpath(
        os.path.join(ref_workdir, "reference")):
      meta["source"] = link
    shutil.copyfile(answers, os.path.join(dst_eval, f"{name}.jsonl"))
    with open(os.path.join(dst_eval, f"{name}.settings.json"), "w",
              encoding="utf-8") as f:
      json.dump(meta, f)


def keep(workdir: str, kept_dir: str) -> list[str]:
  """Copies `workdir`'s small result files (the .json/.jsonl files at its
  top level and in eval/, each at most KEEP_MAX_BYTES) into `kept_dir`,
  replacing what is there; returns their paths relative to `workdir`."""
  out = []
  for sub in ("", "eval"):
    src = os.path.join(workdir, sub)
    if not os.path.isdir(src):
      continue
    for name in sorted(os.listdir(src)):
      path = os.path.join(src, name)
      if (name.endswith((".json", ".jsonl")) and os.path.isfile(path)
          and not os.path.islink(path)
          and os.path.getsize(path) <= KEEP_MAX_BYTES):
        os.makedirs(os.path.join(kept_dir, sub), exist_ok=True)
        shutil.copyfile(path, os.path.join(kept_dir, sub, name))
        out.append(os.path.join(sub, name))
  return out


_STOP = {"requested": False}  # set when SIGTERM reached this runner


def _launch(cmd, *, cwd, env, log_path):
  """Runs `cmd` to its end; a SIGTERM to this process meanwhile is passed on
  to the child (which saves its step and exits 143) and noted, so the
  runner stops after this cell (`Runner.run`). A second SIGTERM ends this
  process at once."""
  with open(log_path, "a", encoding="utf-8") as log:
    child = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    main = threading.current_thread() is threading.main_thread()

    def forward(signum, frame):
      del frame
      if _STOP["requested"]:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
      _STOP["requested"] = True
      child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward) if main else None
    try:
      return child.wait()
    finally:
      if main:
        signal.signal(signal.SIGTERM, previous)


# Overrides that choose what a finished cell reports, not what it trains:
# a cell run with another value is still the same cell.
REPORT_ONLY = ("eval.models",)


def _comparable(spec: Mapping[str, Any]) -> dict:
  return {**spec, "overrides": {k: v for k, v in dict(
      spec.get("overrides", {})).items() if k not in REPORT_ONLY}}


class Runner:
  """Runs cells of one study (module docstring).

  Args:
    study_dir: the study's folder (cells/ and cells.jsonl inside).
    env: the children's environment (default: this one).
    python: the interpreter of the children.
    launch: launch(cmd, cwd=, env=, log_path=) -> return code (tests count
      launches through it).
    echo: print one line per cell to stderr.
    keep_checkpoints: keep a finished cell's ckpt/ (default: deleted once
      the cell is done: they only serve resuming an unfinished cell, and a
      demo-scale cell's three checkpoints take about 4 GB; its final/ model,
      metrics and answers stay).
  """

  def __init__(self, study_dir: str, *, env: Mapping[str, str] | None = None,
               python: str = sys.executable,
               launch: Callable[..., int] = _launch, echo: bool = True,
               keep_checkpoints: bool = False):
    self.keep_checkpoints = keep_checkpoints
    self.study_dir = os.path.abspath(study_dir)
    self.env = dict(os.environ if env is None else env)
    self.python = python
    self.launch = launch
    self.echo = echo

  def workdir(self, name: str) -> str:
    return os.path.join(self.study_dir, CELLS, name)

  def kept_dir(self, name: str) -> str:
    return os.path.join(self.study_dir, KEPT, name)

  def results(self, name: str, done: str = SUMMARY) -> str:
    """The folder to read cell `name`'s results from: its workdir when it
    holds `done`, else its kept copy when that does (module docstring),
    else its workdir."""
    for d in (self.workdir(name), self.kept_dir(name)):
      if os.path.exists(os.path.join(d, done)):
        return d
    return self.workdir(name)

  def keep(self, name: str) -> list[str]:
    """Copies finished cell `name`'s small files to kept/<name>/ (`keep`);
    a study calls it again after writing a file of its own there."""
    return keep(self.workdir(name), self.kept_dir(name))

  def command(self, cell: Cell) -> list[str]:
    return [self.python] + cell.args(self.workdir(cell.name))

  def shell_line(self, cell: Cell) -> str:
    return shlex.join(self.command(cell))

  def is_done(self, cell: Cell) -> bool:
    """Its done file is in its workdir or in its kept copy."""
    return any(os.path.exists(os.path.join(d, cell.done))
               for d in (self.workdir(cell.name), self.kept_dir(cell.name)))

  def _say(self, text: str) -> None:
    if self.echo:
      print(f"[cells] {text}", file=sys.stderr, flush=True)

  def _check_spec(self, cell: Cell) -> None:
    folder = self.results(cell.name, cell.done)
    path = os.path.join(folder, SPEC)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        old = json.load(f)
      if _comparable(old) != _comparable(cell.spec()):
        raise CellError(
            f"cell {cell.name!r}: {folder} was run with other settings "
            f"({old} != {cell.spec()}); delete it to run it again")
    else:
      os.makedirs(folder, exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:
        json.dump(cell.spec(), f, indent=2)

  def records(self) -> list[dict]:
    """Every launch recorded in cells.jsonl, oldest first."""
    path = os.path.join(self.study_dir, LOG)
    if not os.path.exists(path):
      return []
    with open(path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]

  def wall_s(self, name: str) -> float | None:
    """Seconds of the cell's launches up to its first success (a resumed
    cell's time adds up); None when it never finished."""
    total, finished = 0.0, False
    for r in self.records():
      if r["name"] == name:
        total += r["wall_s"]
        if r["status"] == "done":
          finished = True
          break
    return total if finished else None

  def lost(self) -> list[str]:
    """Cells that cells.jsonl records as done but that have neither a
    folder nor a kept copy here (e.g. finished on another machine before
    kept/ existed): a table that lists every finished cell misses them, and
    should say so."""
    done = dict.fromkeys(r["name"] for r in self.records()
                         if r["status"] == "done")
    return [n for n in done if not os.path.isdir(self.workdir(n))
            and not os.path.isdir(self.kept_dir(n))]

  def _record(self, cell: Cell, rc: int, wall: float, status: str) -> None:
    os.makedirs(self.study_dir, exist_ok=True)
    rec = dict(name=cell.name, status=status, rc=rc, wall_s=round(wall, 2),
               finished=datetime.datetime.now().isoformat(timespec="seconds"),
               command=self.shell_line(cell))
    with open(os.path.join(self.study_dir, LOG), "a", encoding="utf-8") as f:
      f.write(json.dumps(rec) + "\n")

  def run(self, cell: Cell) -> str:
    """Runs `cell` unless done: 'skipped', 'done', 'failed' or 'blocked'
    (its reference cell is not done). SIGTERM while it runs (`_launch`)
    records it as 'stopped' and exits with status 143."""
    if self.is_done(cell):
      self._check_spec(cell)
      if not os.path.isdir(self.kept_dir(cell.name)):
        self.keep(cell.name)  # a cell finished before kept/ existed
      self._say(f"{cell.name}: done already, skipped")
      return "skipped"
    if cell.reference:
      ref = self.workdir(cell.reference)
      if not os.path.isfile(os.path.join(ref, "reference", "SFT.json")):
        gone = (" (only its kept results are here: delete "
                f"{self.kept_dir(cell.reference)} to run it again)"
                if os.path.isdir(self.kept_dir(cell.reference))
                and not os.path.isdir(ref) else "")
        self._say(f"{cell.name}: blocked (reference cell {cell.reference!r} "
                  f"has no reference/){gone}")
        return "blocked"
    self._check_spec(cell)
    if cell.reference:
      adopt_reference(self.workdir(cell.name), self.workdir(cell.reference))
    log_path = os.path.join(self.workdir(cell.name), "log.txt")
    self._say(f"{cell.name}: running (log {log_path})")
    t0 = time.perf_counter()
    rc = self.launch(self.command(cell), cwd=ROOT, env=self.env,
                     log_path=log_path)
    wall = time.perf_counter() - t0
    status = "done" if rc == 0 and self.is_done(cell) else "failed"
    stop, _STOP["requested"] = _STOP["requested"], False
    if stop and status != "done":  # (a cell in its evaluation may finish)
      status = "stopped"
    if status == "done":
      self.keep(cell.name)
      if not self.keep_checkpoints:
        shutil.rmtree(os.path.join(self.workdir(cell.name), "ckpt"),
                      ignore_errors=True)
    self._record(cell, rc, wall, status)
    self._say(f"{cell.name}: {status} in {wall:.0f} s (rc {rc})")
    if stop:
      print(f"SIGTERM: the study stopped at cell {cell.name} ({status}); "
            "run the same command again to resume", file=sys.stderr)
      raise SystemExit(STOPPED_EXIT)
    return status

  def run_all(self, cells: Sequence[Cell]) -> dict[str, str]:
    """Runs every cell in order (a failed one does not stop the others);
    name -> status."""
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
      raise CellError(f"duplicate cell names in {names}")
    return {c.name: self.run(c) for c in cells}

  def dry_run(self, cells: Sequence[Cell], out=None) -> None:
    """Prints each cell's status and command line (to `out`, default
    stdout)."""
    out = out or sys.stdout
    for c in cells:
      state = "done" if self.is_done(c) else "todo"
      ref = f" (stage 1 from cell {c.reference})" if c.reference else ""
      print(f"# {c.name} [{state}]{ref}\n{self.shell_line(c)}", file=out)


def cell_overrides(folder: str) -> dict | None:
  """The config overrides a cell ran with (its cell.json), or None where the
  folder has no cell.json (a plain run's workdir)."""
  path = os.path.join(folder, SPEC)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("overrides", {})


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
  """["rl.steps=1", ...] -> {"rl.steps": "1"} (values kept as text)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"override {item!r}: expected KEY=VALUE")
    out[key.removeprefix("config.")] = value
  return out
