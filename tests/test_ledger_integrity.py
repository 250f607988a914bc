"""A corrupt ledger: a short error naming the file and the way out, and the
file left byte for byte as it was (no -wal/-shm made beside it either)."""

import hashlib
import os
import sqlite3
import subprocess
import sys

import pytest

from purld_jax import anchors
from purld_jax import ledger as ledger_lib
from purld_jax import prompts
from purld_jax import teacher
from tests.fixtures_teacher import run_cli, write_prompts
from tests.train_fixtures import REPO, subprocess_env, small_train_path

PAGE = 4096  # SQLite's default page size


def _sha(path) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _healthy(workdir) -> str:
  """A closed ledger of 40 dataset-teacher answers (500 characters each:
  several pages); its path."""
  qs = [prompts.Prompt.from_text(f"question {i}", id=f"q{i}",
                                 answer=f"{i} " + "x" * 500) for i in range(40)]
  store = anchors.AnchorStore(workdir, teacher.make(
      teacher.TeacherConfig(backend="dataset")))
  store.get_or_query(qs)
  store.close()
  path = os.path.join(workdir, ledger_lib.FILENAME)
  assert not os.path.exists(path + "-wal")  # closed: checkpointed
  return path


def _corrupt(workdir, kind) -> tuple[str, str]:
  """Spoils the ledger in `workdir` as `kind` says; (its path, the problem
  the error must give)."""
  path = _healthy(workdir)
  os.remove(path + ".lock")  # the flock file of the fetch: not the ledger
  size = os.path.getsize(path)
  pages = size // PAGE
  assert size == pages * PAGE and pages >= 4
  with open(path, "rb") as f:
    data = f.read()
  if kind == "garbage":
    data, want = bytes(range(256)) * 8, "not an SQLite database"
  elif kind == "truncated":  # half the file: a copy cut short, a full disk
    data = data[:size // 2]
    want = (f"truncated: {size // 2} bytes, its header says {pages} pages "
            f"of {PAGE} bytes ({size})")
  elif kind == "pages":  # header and size intact, every other page junk
    data, want = data[:PAGE] + b"\xa5" * (size - PAGE), "SQLite"
  else:  # "other": a healthy SQLite file, but not a ledger
    os.remove(path)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE notes (x TEXT)")
    db.commit()
    db.close()
    return path, "an SQLite database with no 'anchors' table (its tables: notes)"
  with open(path, "wb") as f:
    f.write(data)
  return path, want


@pytest.mark.parametrize("kind", ["garbage", "truncated", "pages", "other"])
def test_corrupt_ledger_is_named_and_left_untouched(tmp_path, kind):
  path, want = _corrupt(tmp_path, kind)
  before, files = _sha(path), sorted(os.listdir(tmp_path))
  for open_it in (lambda: ledger_lib.Ledger(tmp_path),
                  lambda: ledger_lib.Ledger(tmp_path, create=False),
                  lambda: anchors.AnchorStore(tmp_path, teacher.make(
                      teacher.TeacherConfig(backend="dataset")))):
    with pytest.raises(anchors.AnchorError) as e:
      open_it()
    message = str(e.value)
    assert message.startswith(f"the ledger {path} is unusable: {want}")
    assert "\n" not in message and "Nothing was written to it" in message
    assert f"mv {path} {path}.bad" in message
    assert "restore it from a backup" in message
    assert "asked (and paid for) again" in message
  assert _sha(path) == before
  assert sorted(os.listdir(tmp_path)) == files  # no -wal, -shm or lock file


def test_a_healthy_ledger_opens_and_an_empty_file_is_a_new_one(tmp_path):
  path = _healthy(tmp_path)
  assert ledger_lib.Ledger(tmp_path).stats().anchors == 40
  empty = tmp_path / "new"
  empty.mkdir()
  (empty / ledger_lib.FILENAME).write_bytes(b"")  # what connect() leaves
  assert ledger_lib.Ledger(empty).stats().anchors == 0
  assert os.path.getsize(path) > 0


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
@pytest.mark.parametrize("command", ["stats", "fetch"])
def test_cli_says_it_in_one_line(tmp_path, kind, command):
  path, want = _corrupt(tmp_path / "wd", kind)
  before, files = _sha(path), sorted(os.listdir(tmp_path / "wd"))
  prompts_path = write_prompts(tmp_path / "p.jsonl", 2)
  kw = (dict(prompts=prompts_path, backend="dataset") if command == "fetch"
        else {})
  r = run_cli(command, workdir=tmp_path / "wd", **kw)
  assert r.returncode == 2, r.stdout + r.stderr
  assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr
  assert r.stderr.startswith(f"error: the ledger {path} is unusable: {want}")
  assert _sha(path) == before and sorted(os.listdir(tmp_path / "wd")) == files


def test_training_on_a_corrupt_ledger_stops_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  path, want = _corrupt(workdir, "truncated")
  before = _sha(path)
  proc = subprocess.run(
      [sys.executable, "-m", "purld_jax.main", "--config=configs/sft.py:tiny",
       f"--workdir={workdir}", "--config.mesh.data=1",
       f"--config.data.train_path={small_train_path()}"],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(
      f"error: the ledger {path} is unusable: {want}"), proc.stderr[-2000:]
  assert _sha(path) == before
