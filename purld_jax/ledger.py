"""The anchor ledger: one SQLite file, one teacher answer per request, ever.

The ledger is ``<workdir>/anchors.sqlite`` (SQLite, WAL, synchronous=FULL). A
row is keyed by ``ledger_key``: sha256 of the canonical JSON of the exact
request (messages as sent, system prompt included; teacher backend and model;
the generation params that shape the answer; the sha256 of each attached
image's bytes, in order, only when there are images, so text-only keys are
those of earlier ledgers). Prompt ids, base URLs and keys are not part of
it. Tables: ``anchors`` (one answer per key: text, finish_reason, usage
tokens, latency, attempts, errors, created time, teacher label,
``simulated`` for the dataset backend; its ``params`` column also lists the
image digests, ``images``), ``requests`` (one intent row per request a
process starts) and ``attempts`` (one row per HTTP attempt).

The guarantee, exactly:

  1. An answer that was stored is never paid for again. Before a request is
     sent, an intent row is committed in the same transaction that checks the
     key has no answer, while this process holds ``anchors.sqlite.lock``
     (flock; released by the kernel when a process dies, even by kill -9), so
     no other process on this machine is asking at the same time.
  2. An answer is committed before it is returned or counted as done.
  3. A request in flight when its process is killed may have been paid for
     and is sent again by the next run. Its intent row is still open then;
     the new intent records it (``prev_outcome = 'killed'``). ``stats``
     reports these re-sends as "re-sent after a kill": an upper bound on
     answers paid twice (the killed one may not have reached the server).
     It also reports "asked again after stored", computed from the rows
     (requests started after the one that stored their key's answer): 0 by
     (1), and checked, not assumed.
  4. Retries inside one request (429, 5xx, timeouts, truncation under
     ``on_truncated='retry'``) are counted as retries; those whose attempt
     got an answer back were billed (their tokens are in the stats).

Unusable answers. A stored answer cut at ``max_tokens`` (finish_reason
``length``) or empty (nothing but whitespace) is kept in the ledger, since it
was paid for, but is never an anchor: ``Anchor.usable`` is False,
``SharedAnchors.for_batch`` marks its prompt's row invalid (SFT trains on no
token of it, PU-RL's group for it is invalid), and ``stats`` counts it as
"unusable". Under ``teacher.on_truncated='keep'`` (or ``'error'``) it is
never asked again. Under ``'retry'`` the exact same request is re-asked ONCE
(its ledger key unchanged; ``requests.prev_outcome = 'unusable'``): a usable
answer replaces the row (outcome ``replaced``), anything else leaves it as it
was (``still_unusable``, or ``failed``) and it is not asked again. A re-ask
is a new paid request: its attempts are in ``calls``, its tokens in the
tokens, and ``reasked`` counts it; it is the one exception to (1), and
"asked again after stored" does not count it (a second re-ask, or any ask
after a usable answer, it does).

Not covered: a ledger on a file system without working flock (some NFS), and
two machines sharing one workdir; there the re-send count still tells.

Integrity: an existing ledger is checked before anything is written to it
(``check``: the SQLite header, the size its header gives, ``PRAGMA
quick_check`` on a read-only connection, an ``anchors`` table). A file that
fails is an ``AnchorError`` naming it and how to recover, and is left
byte for byte as it was.

``anchors.py`` asks the teacher through this ledger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence

from purld_jax import images as images_lib
from purld_jax import sqlite_check
from purld_jax import teacher as teacher_lib
from purld_jax import teacher_wire

FILENAME = "anchors.sqlite"
SCHEMA_VERSION = 2  # 2: anchors.logprobs (JSON or NULL)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS anchors (
  key TEXT PRIMARY KEY, prompt_id TEXT NOT NULL, request_id INTEGER NOT NULL,
  teacher TEXT NOT NULL, backend TEXT NOT NULL, model TEXT NOT NULL,
  simulated INTEGER NOT NULL, messages TEXT NOT NULL, params TEXT NOT NULL,
  text TEXT NOT NULL, finish_reason TEXT NOT NULL, truncated INTEGER NOT NULL,
  prompt_tokens INTEGER, completion_tokens INTEGER, latency_s REAL NOT NULL,
  attempts INTEGER NOT NULL, errors TEXT NOT NULL, created_at REAL NOT NULL,
  logprobs TEXT);
CREATE TABLE IF NOT EXISTS requests (
  id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL,
  prompt_id TEXT NOT NULL, backend TEXT NOT NULL, pid INTEGER NOT NULL,
  started_at REAL NOT NULL, finished_at REAL, outcome TEXT,
  prev_outcome TEXT, error TEXT);
CREATE INDEX IF NOT EXISTS requests_key ON requests (key);
CREATE TABLE IF NOT EXISTS attempts (
  request_id INTEGER NOT NULL, n INTEGER NOT NULL, outcome TEXT NOT NULL,
  status INTEGER, error TEXT NOT NULL, latency_s REAL NOT NULL,
  wait_s REAL NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER,
  at REAL NOT NULL);
"""


class AnchorError(RuntimeError):
  """Anchors that could not be had, or a ledger that cannot be used; the
  message names the prompts or the file, and why."""


# Why a stored answer cannot be an anchor (Anchor.problem), with the code
# SharedAnchors broadcasts for it (0: usable).
PROBLEMS = ("truncated", "empty")
_BLANK = " \t\n\r\v\f"  # whitespace, as SQL's trim(text, ...) below strips it
_UNUSABLE_SQL = ("(a.truncated != 0 OR a.finish_reason = 'length' OR "
                 "trim(a.text, ' ' || char(9, 10, 13, 11, 12)) = '')")


def answer_problem(text: str, finish_reason: str, truncated: bool
                   ) -> str | None:
  """"truncated" (cut at max_tokens: finish_reason 'length'), "empty"
  (nothing but whitespace), or None: the answer can be an anchor."""
  if truncated or finish_reason == "length":
    return "truncated"
  if not text.strip(_BLANK):
    return "empty"
  return None


def canonical_json(request: teacher_lib.Request) -> str:
  """The request as canonical JSON (sorted keys, no spaces, UTF-8 kept).

  Images enter as ``"images": [sha256 hex, ...]`` (in order), a key present
  only when there are images: a text-only request's JSON, hence its ledger
  key, is what it was before images existed.
  """
  obj = {"v": 1, "backend": request.backend, "model": request.model,
         "messages": [list(m) for m in request.messages],
         "params": dict(request.params)}
  if request.images:
    obj["images"] = [images_lib.digest(x) for x in request.images]
  return json.dumps(obj, sort_keys=True, separators=(",", ":"),
                    ensure_ascii=False)


def ledger_key(request: teacher_lib.Request) -> str:
  """sha256 hex of ``canonical_json(request)``."""
  return hashlib.sha256(canonical_json(request).encode("utf-8")).hexdigest()


def _stored_params(request: teacher_lib.Request) -> dict:
  """The row's ``params`` column: the params, and the image digests (if any)
  so a row says which images were asked about."""
  params = dict(request.params)
  if request.images:
    params["images"] = [images_lib.digest(x) for x in request.images]
  return params


# ---------------------------------------------------------------- integrity

def check(path: str) -> int:
  """Checks an existing ledger file without writing to it; returns its schema
  version (0 for a new or empty file).

  Raises AnchorError naming the file, what is wrong and how to recover, for
  a file that is not a healthy ledger, or one of a newer schema.
  """
  try:
    problem, version = sqlite_check.problem(path, table="anchors")
  except OSError as e:
    raise AnchorError(f"cannot read the ledger {path}: {e.strerror}") from None
  if problem is not None:
    name = os.path.basename(path)
    raise AnchorError(
        f"the ledger {path} is unusable: {problem}. Nothing was written to "
        f"it. To go on, move it aside (with any {name}-wal and {name}-shm "
        f"beside it), e.g. `mv {path} {path}.bad`, or restore it from a "
        "backup; moved aside, its answers are asked (and paid for) again")
  if version > SCHEMA_VERSION:
    raise AnchorError(f"{path} has ledger schema {version}; this code reads "
                      f"up to {SCHEMA_VERSION}")
  return version


# ---------------------------------------------------------------- rows

@dataclasses.dataclass(frozen=True)
class Stats:
  """Ledger totals (all teachers in it). See the module docstring."""

  anchors: int
  simulated: int            # anchors from the dataset backend
  truncated: int
  unusable: int             # truncated or empty: stored, never an anchor
  requests: int
  failed: int               # requests that gave up after their retries
  unfinished: int           # intents still open: in flight now, or killed
  resent_after_kill: int    # duplicates: re-sends of a killed in-flight request
  asked_after_stored: int   # must be 0 (the one re-ask under 'retry' excluded)
  reasked: int              # re-asks of an unusable answer (on_truncated='retry')
  calls: int                # HTTP attempts (dataset backend excluded)
  retries: int
  errors: dict              # attempt outcome -> count (outcome != ok)
  prompt_tokens: int
  completion_tokens: int


def _logprobs(stored: str | None) -> teacher_wire.Logprobs | None:
  """The `logprobs` column back as tuples (JSON made them lists)."""
  if stored is None:
    return None
  return tuple(tuple((str(t), float(lp)) for t, lp in pos)
               for pos in json.loads(stored))


class Ledger:
  """The SQLite ledger; thread-safe (one connection behind a lock)."""

  def __init__(self, workdir: str | os.PathLike, *, create: bool = True,
               filename: str = FILENAME, readonly: bool = False):
    # `filename`: another ledger of the same schema beside the anchors'
    # (teacher_judge.FILENAME holds the teacher-as-judge's judgements).
    # `readonly`: an existing ledger, opened for queries only (no schema
    # upgrade, no pragma that writes): `anchors stats`.
    self.path = os.path.join(os.fspath(workdir), filename)
    if (readonly or not create) and not os.path.exists(self.path):
      raise AnchorError(f"no anchor ledger at {self.path}")
    version = check(self.path)  # read-only: before anything is written
    self._lock = threading.Lock()
    if readonly:
      self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                 timeout=60, isolation_level=None,
                                 check_same_thread=False)
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                               check_same_thread=False)
    self._db.execute("PRAGMA journal_mode=WAL")
    self._db.execute("PRAGMA synchronous=FULL")
    if version == 1:  # every row kept; the new column is NULL for them
      self._db.execute("ALTER TABLE anchors ADD COLUMN logprobs TEXT")
    self._db.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")

  def close(self):
    with self._lock:
      self._db.close()

  @contextlib.contextmanager
  def _tx(self):
    with self._lock:
      self._db.execute("BEGIN IMMEDIATE")
      try:
        yield self._db
      except BaseException:
        self._db.execute("ROLLBACK")
        raise
      self._db.execute("COMMIT")

  @contextlib.contextmanager
  def writer(self):
    """Holds ``anchors.sqlite.lock``: one asking process per workdir at a time."""
    with open(self.path + ".lock", "a+") as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(f, fcntl.LOCK_UN)

  def rows(self, keys: Sequence[str]) -> dict[str, dict]:
    """key -> {text, finish_reason, truncated, simulated, teacher, logprobs},
    stored only."""
    out = {}
    with self._lock:
      for i in range(0, len(keys), 500):
        chunk = list(keys[i:i + 500])
        out.update((key, dict(text=text, finish_reason=finish,
                              truncated=bool(trunc), simulated=bool(sim),
                              teacher=label, logprobs=_logprobs(lp)))
                   for key, text, finish, trunc, sim, label, lp
                   in self._db.execute(
                       "SELECT key, text, finish_reason, truncated, simulated, "
                       "teacher, logprobs FROM anchors WHERE key IN "
                       f"({','.join('?' * len(chunk))})", chunk))
    return out

  def begin(self, key: str, prompt_id: str, backend: str, *,
            reask_unusable: bool = False) -> int | None:
    """Commits an intent row; None if the key has an answer (do not ask).

    With `reask_unusable` (on_truncated='retry'), a stored unusable answer
    (truncated or empty) gets an intent once: the re-ask (prev_outcome
    'unusable'); None once a re-ask of it has finished (any outcome).
    """
    with self._tx() as db:
      row = db.execute("SELECT request_id, text, finish_reason, truncated "
                       "FROM anchors WHERE key=?", (key,)).fetchone()
      if row is not None and not (
          reask_unusable and answer_problem(row[1], row[2], row[3])
          and not self._reask_done(db, key, row[0])):
        return None
      prev = db.execute("SELECT id, outcome FROM requests WHERE key=? "
                        "ORDER BY id DESC LIMIT 1", (key,)).fetchone()
      prev_outcome = None
      if prev is not None:
        prev_outcome = prev[1] or "killed"  # open intent, under the flock: dead
        if prev[1] is None:
          db.execute("UPDATE requests SET outcome='killed' WHERE id=?", (prev[0],))
      if row is not None and prev_outcome != "killed":
        prev_outcome = "unusable"  # the re-ask of a stored unusable answer
      return db.execute(
          "INSERT INTO requests (key, prompt_id, backend, pid, started_at, "
          "prev_outcome) VALUES (?, ?, ?, ?, ?, ?)",
          (key, prompt_id, backend, os.getpid(), time.time(), prev_outcome)
      ).lastrowid

  @staticmethod
  def _reask_done(db, key: str, stored_by: int) -> bool:
    """A request after the one that stored `key`'s answer has finished
    (failed, still_unusable, ...; a killed one does not count)."""
    return db.execute(
        "SELECT 1 FROM requests WHERE key=? AND id>? AND outcome IS NOT NULL "
        "AND outcome != 'killed' LIMIT 1", (key, stored_by)).fetchone() is not None

  def reaskable(self, keys: Sequence[str]) -> set[str]:
    """The keys whose stored answer is unusable and not yet re-asked."""
    out = set()
    with self._lock:
      for i in range(0, len(keys), 500):
        chunk = list(keys[i:i + 500])
        for key, rid in self._db.execute(
            f"SELECT a.key, a.request_id FROM anchors a WHERE {_UNUSABLE_SQL} "
            f"AND a.key IN ({','.join('?' * len(chunk))})", chunk).fetchall():
          if not self._reask_done(self._db, key, rid):
            out.add(key)
    return out

  def record_attempt(self, request_id: int, a: teacher_wire.Attempt):
    with self._tx() as db:
      db.execute("INSERT INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (request_id, a.n, a.outcome, a.status, a.error, a.latency_s,
                  a.wait_s, a.prompt_tokens, a.completion_tokens, time.time()))

  def store(self, request_id: int, key: str, prompt_id: str,
            request: teacher_lib.Request, reply: teacher_lib.Reply) -> str:
    """Commits the answer and closes the intent, in one transaction.

    Returns the request's outcome: "stored"; "replaced" (a re-ask's usable
    answer over a stored unusable one); "still_unusable" (a re-ask's answer
    is unusable too: the stored one stays); "answer_existed".
    """
    errors = [f"{a.outcome}: {a.error}" for a in reply.attempts if a.outcome != "ok"]
    with self._tx() as db:
      old = db.execute("SELECT text, finish_reason, truncated FROM anchors "
                       "WHERE key=?", (key,)).fetchone()
      if old is None:
        outcome = "stored"
      elif not answer_problem(*old):
        outcome = "answer_existed"
      elif answer_problem(reply.text, reply.finish_reason, reply.truncated):
        outcome = "still_unusable"
      else:
        outcome = "replaced"
      if outcome in ("stored", "replaced"):
        db.execute(
            "INSERT OR REPLACE INTO anchors VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, prompt_id, request_id, reply.teacher, request.backend,
             request.model, int(reply.simulated),
             json.dumps(request.messages, ensure_ascii=False),
             json.dumps(_stored_params(request), ensure_ascii=False),
             reply.text,
             reply.finish_reason, int(reply.truncated), reply.prompt_tokens,
             reply.completion_tokens, reply.latency_s, len(reply.attempts),
             json.dumps(errors), time.time(),
             None if reply.logprobs is None else json.dumps(
                 reply.logprobs, ensure_ascii=False)))
      db.execute("UPDATE requests SET outcome=?, finished_at=? WHERE id=?",
                 (outcome, time.time(), request_id))
    return outcome

  def fail(self, request_id: int, error: Exception):
    with self._tx() as db:
      db.execute("UPDATE requests SET outcome='failed', finished_at=?, error=? "
                 "WHERE id=?", (time.time(), str(error)[:500], request_id))

  def stats(self) -> Stats:
    one = lambda sql: self._db.execute(sql).fetchone()[0] or 0
    with self._lock:
      errors = dict(self._db.execute(
          "SELECT outcome, count(*) FROM attempts WHERE outcome != 'ok' "
          "GROUP BY outcome ORDER BY outcome").fetchall())
      paid = ("FROM attempts JOIN requests ON requests.id = attempts.request_id "
              "WHERE requests.backend != 'dataset'")
      return Stats(
          anchors=one("SELECT count(*) FROM anchors"),
          simulated=one("SELECT sum(simulated) FROM anchors"),
          truncated=one("SELECT sum(truncated) FROM anchors"),
          unusable=one(f"SELECT count(*) FROM anchors a WHERE {_UNUSABLE_SQL}"),
          requests=one("SELECT count(*) FROM requests"),
          failed=one("SELECT count(*) FROM requests WHERE outcome='failed'"),
          unfinished=one("SELECT count(*) FROM requests WHERE outcome IS NULL"),
          resent_after_kill=one(
              "SELECT count(*) FROM requests WHERE prev_outcome='killed'"),
          # Any request after the one that stored its key's answer, except
          # the one re-ask of an unusable answer (killed tries of it, then
          # the one that finished).
          asked_after_stored=one(
              "SELECT count(*) FROM requests r JOIN anchors a ON a.key = r.key "
              "WHERE r.id > a.request_id AND NOT ("
              f"{_UNUSABLE_SQL} AND r.prev_outcome IN ('unusable', 'killed') "
              "AND NOT EXISTS (SELECT 1 FROM requests e WHERE e.key = r.key "
              "AND e.id > a.request_id AND e.id < r.id AND e.outcome IS NOT "
              "NULL AND e.outcome != 'killed'))"),
          reasked=one(
              "SELECT count(*) FROM requests WHERE prev_outcome='unusable'"),
          calls=one(f"SELECT count(*) {paid}"),
          retries=one(f"SELECT count(*) {paid} AND n > 1"),
          errors=errors,
          prompt_tokens=one(f"SELECT sum(attempts.prompt_tokens) {paid}"),
          completion_tokens=one(f"SELECT sum(attempts.completion_tokens) {paid}"))


def format_stats(s: Stats) -> str:
  lines = [
      f"anchors stored:              {s.anchors}"
      + (f" ({s.simulated} SIMULATED: dataset reference answers)"
         if s.simulated else ""),
      f"  truncated (finish=length): {s.truncated}",
      f"  unusable (truncated or empty; never an anchor): {s.unusable}",
      f"requests (intents):          {s.requests}",
      f"  failed after retries:      {s.failed}",
      f"  open (in flight or killed): {s.unfinished}",
      f"teacher calls (HTTP):        {s.calls}",
      f"  retries:                   {s.retries}",
      "  errors:                    "
      + (", ".join(f"{k}={v}" for k, v in s.errors.items()) or "none"),
      f"tokens: prompt {s.prompt_tokens}, completion {s.completion_tokens}",
      f"duplicates (re-sent after a kill, may be paid twice): {s.resent_after_kill}",
      f"asked again after stored (must be 0): {s.asked_after_stored}",
      f"unusable answers re-asked (on_truncated=retry; paid again): {s.reasked}",
  ]
  return "\n".join(lines)
