"""Prompt -> anchor, through a ledger: the teacher is paid once per prompt, ever.

The ledger is ``<workdir>/anchors.sqlite`` (SQLite, WAL, synchronous=FULL). A
row is keyed by ``ledger_key``: sha256 of the canonical JSON of the exact
request (messages as sent, system prompt included; teacher backend and model;
the generation params that shape the answer). Prompt ids, base URLs and keys
are not part of it. Tables: ``anchors`` (one answer per key: text,
finish_reason, usage tokens, latency, attempts, errors, created time, teacher
label, ``simulated`` for the dataset backend), ``requests`` (one intent row
per request a process starts) and ``attempts`` (one row per HTTP attempt).

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

Several training processes (`SharedAnchors`): only process 0 opens the
ledger and talks to the teacher; the texts of a batch reach the other
processes by `multihost_utils.broadcast_one_to_all` (UTF-8 bytes: lengths,
with `for_batch` each anchor's usability code too, then one buffer), so the
workdir's ledger is read and written by one process only, and every process
holds the same anchors, and marks the same rows invalid, for the same
(global) batch.

Command line (``--help`` for all flags)::

  python -m purld_jax.anchors fetch --prompts=FILE.jsonl --workdir=DIR \\
      --teacher.base_url=http://host/v1 --teacher.model=NAME \\
      --teacher.api_key_env=OPENAI_API_KEY
  python -m purld_jax.anchors fetch --config=configs/x.py --workdir=DIR
  python -m purld_jax.anchors stats --workdir=DIR

With ``--config``, the prompt file is ``data.train_path`` and the teacher is
the ``teacher`` block (override with ``--config.teacher.model=...``); explicit
``--prompts`` and ``--teacher.*`` flags win over both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence

from purld_jax import prompts as prompts_lib
from purld_jax import teacher as teacher_lib

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
  """Anchors that could not be had; the message names the prompts and why."""


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
  """The request as canonical JSON (sorted keys, no spaces, UTF-8 kept)."""
  return json.dumps(
      {"v": 1, "backend": request.backend, "model": request.model,
       "messages": [list(m) for m in request.messages],
       "params": dict(request.params)},
      sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def ledger_key(request: teacher_lib.Request) -> str:
  """sha256 hex of ``canonical_json(request)``."""
  return hashlib.sha256(canonical_json(request).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Anchor:
  """The teacher's one answer to a prompt."""

  prompt_id: str
  key: str
  text: str
  finish_reason: str
  truncated: bool
  simulated: bool   # True: a reference answer (dataset backend), not a teacher
  teacher: str      # the teacher's label
  logprobs: teacher_lib.Logprobs | None = None  # when the request asked for them

  @property
  def problem(self) -> str | None:
    """Why it cannot be an anchor ("truncated", "empty"), or None."""
    return answer_problem(self.text, self.finish_reason, self.truncated)

  @property
  def usable(self) -> bool:
    """False for a truncated or empty answer: stored (paid for), never
    trained on."""
    return self.problem is None


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


@dataclasses.dataclass(frozen=True)
class FetchReport:
  prompts: int
  distinct: int             # distinct ledger keys among them
  already: int              # keys that had an answer before this fetch
  stored: int               # answers stored by this fetch (replacements too)
  failed: tuple             # ((prompt_id, message), ...)
  reasked: int = 0          # unusable answers re-asked (on_truncated='retry')


def _logprobs(stored: str | None) -> teacher_lib.Logprobs | None:
  """The `logprobs` column back as tuples (JSON made them lists)."""
  if stored is None:
    return None
  return tuple(tuple((str(t), float(lp)) for t, lp in pos)
               for pos in json.loads(stored))


class Ledger:
  """The SQLite ledger; thread-safe (one connection behind a lock)."""

  def __init__(self, workdir: str | os.PathLike, *, create: bool = True,
               filename: str = FILENAME):
    # `filename`: another ledger of the same schema beside the anchors'
    # (teacher_judge.FILENAME holds the teacher-as-judge's judgements).
    self.path = os.path.join(os.fspath(workdir), filename)
    if not create and not os.path.exists(self.path):
      raise AnchorError(f"no anchor ledger at {self.path}")
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                               check_same_thread=False)
    self._lock = threading.Lock()
    self._db.execute("PRAGMA journal_mode=WAL")
    self._db.execute("PRAGMA synchronous=FULL")
    version = self._db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
      raise AnchorError(f"{self.path} has ledger schema {version}; this code "
                        f"reads up to {SCHEMA_VERSION}")
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

  def record_attempt(self, request_id: int, a: teacher_lib.Attempt):
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
             json.dumps(dict(request.params), ensure_ascii=False), reply.text,
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


class AnchorStore:
  """Anchors for prompts, asking the teacher only for keys not in the ledger.

  `on_truncated` (default: the teacher's `cfg.on_truncated`, else "keep"):
  under "retry" a stored unusable answer (truncated or empty) is re-asked
  once, with the same request, and replaced if the new answer is usable; the
  re-ask is a new paid request (in the ledger's `calls` and `reasked`).
  Under "keep" or "error" it is never asked again.
  """

  def __init__(self, workdir: str | os.PathLike, teacher: teacher_lib.Teacher,
               *, filename: str = FILENAME, on_truncated: str | None = None):
    self.teacher = teacher
    if on_truncated is None:
      on_truncated = getattr(getattr(teacher, "cfg", None), "on_truncated", None)
      if not isinstance(on_truncated, str):  # a teacher with no such config
        on_truncated = "keep"
    if on_truncated not in teacher_lib.TRUNCATED_POLICIES:
      raise teacher_lib.ConfigError(
          f"on_truncated={on_truncated!r}; known: "
          f"{', '.join(teacher_lib.TRUNCATED_POLICIES)}")
    self.on_truncated = on_truncated
    self.ledger = Ledger(workdir, filename=filename)

  @property
  def reasks(self) -> bool:
    """Unusable stored answers are re-asked (once): on_truncated='retry'."""
    return self.on_truncated == "retry"

  def close(self):
    self.ledger.close()

  def _by_key(self, prompts: Sequence[prompts_lib.Prompt]
              ) -> dict[str, prompts_lib.Prompt]:
    """Ledger key -> the first prompt with that key."""
    todo = {}
    for p in prompts:
      todo.setdefault(ledger_key(self.teacher.request(p)), p)
    return todo

  def _reaskable(self, keys: Sequence[str]) -> set[str]:
    return self.ledger.reaskable(list(keys)) if self.reasks else set()

  def lookup(self, prompts: Sequence[prompts_lib.Prompt]) -> list[Anchor | None]:
    """The stored anchors (None where absent); never asks the teacher.
    Unusable ones (`Anchor.usable` False) are returned too."""
    keys = [ledger_key(self.teacher.request(p)) for p in prompts]
    rows = self.ledger.rows(keys)
    return [Anchor(prompt_id=p.id, key=k, **rows[k]) if k in rows else None
            for p, k in zip(prompts, keys)]

  def missing(self, prompts: Sequence[prompts_lib.Prompt]
              ) -> dict[str, prompts_lib.Prompt]:
    """Ledger key -> first prompt with that key, for keys `fetch` would ask:
    without an answer, or (on_truncated='retry') with an unusable one not yet
    re-asked."""
    todo = self._by_key(prompts)
    have = self.ledger.rows(list(todo))
    again = self._reaskable([k for k in todo if k in have])
    return {k: p for k, p in todo.items() if k not in have or k in again}

  def fetch(self, prompts: Sequence[prompts_lib.Prompt], *,
            on_done: Callable[[str, object], None] | None = None) -> FetchReport:
    """Asks for every distinct key without an answer; commits each as it comes.

    Under on_truncated='retry' it also re-asks, once, each key whose stored
    answer is unusable (see the class docstring).
    ``on_done(prompt_id, reply_or_error)`` is called per finished request.
    Failed requests are reported, not raised; a fatal one (unreachable server,
    401/403/404) is raised once the requests already running are stored.
    """
    todo = self._by_key(prompts)
    already = len(self.ledger.rows(list(todo)))
    stored, failed, reasked = 0, [], 0
    with self.ledger.writer():
      have = self.ledger.rows(list(todo))  # again, under the lock
      again = self._reaskable([k for k in todo if k in have])
      missing = [(k, p) for k, p in todo.items() if k not in have or k in again]
      if missing:
        self.teacher.prepare()
      for (key, prompt), result in teacher_lib.ask_many(
          self.teacher, missing, ask=self._ask_and_store):
        reasked += key in again and result is not None
        if isinstance(result, teacher_lib.TeacherError):
          failed.append((prompt.id, str(result)))
        elif result is not None:
          result, outcome = result
          stored += outcome in ("stored", "replaced")
        if on_done:
          on_done(prompt.id, result)
    return FetchReport(len(prompts), len(todo), already, stored, tuple(failed),
                       reasked=reasked)

  def _ask_and_store(self, item):
    key, prompt = item
    request = self.teacher.request(prompt)
    rid = self.ledger.begin(key, prompt.id, request.backend,
                            reask_unusable=self.reasks)
    if rid is None:
      return None
    try:
      reply = self.teacher.ask(
          prompt, on_attempt=lambda a: self.ledger.record_attempt(rid, a))
    except Exception as e:
      self.ledger.fail(rid, e)
      raise
    return reply, self.ledger.store(rid, key, prompt.id, request, reply)

  def get_or_query(self, prompts: Sequence[prompts_lib.Prompt]) -> list[Anchor]:
    """One anchor per prompt; asks only for those not yet in the ledger (and,
    under on_truncated='retry', once for those whose answer is unusable).

    Unusable anchors are returned as they are (check `Anchor.usable`); a
    failed re-ask is logged, not raised.
    """
    anchors = self.lookup(prompts)
    again = self._reaskable(list({a.key for a in anchors
                                  if a is not None and not a.usable}))
    todo = [p for p, a in zip(prompts, anchors) if a is None or a.key in again]
    if todo:
      report = self.fetch(todo)
      anchors = self.lookup(prompts)
      reasons = dict(report.failed)
      lost = [p.id for p, a in zip(prompts, anchors) if a is None]
      if lost:
        why = reasons.get(lost[0]) or (report.failed[0][1] if report.failed
                                       else "no answer stored")
        raise AnchorError(f"{len(lost)} prompt(s) got no anchor, e.g. "
                          f"{lost[0]!r}: {why}")
      for pid, msg in report.failed:
        logging.warning("anchors: re-asking the unusable answer of %r failed "
                        "(it stays unusable; not asked again): %s", pid, msg)
    return anchors


def broadcast_texts(texts: Sequence[str] | None, n: int) -> list[str]:
  """Process 0's `n` texts on every process (the others pass None).

  Two collectives: the UTF-8 lengths i32[n], then the bytes u8[sum]. On one
  process: `texts` itself, no collective.
  """
  return _broadcast(texts, None, n, with_codes=False)[0]


def _broadcast(texts: Sequence[str] | None, codes: Sequence[int] | None,
               n: int, *, with_codes: bool
               ) -> tuple[list[str], list[int] | None]:
  """`broadcast_texts`; `with_codes`: process 0's `codes` (an int per text)
  ride along with the lengths (i32[2n] instead of i32[n])."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return list(texts), (list(codes) if with_codes else None)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  first = jax.process_index() == 0
  blobs = [t.encode("utf-8") for t in texts] if first else []
  head = (np.asarray([len(b) for b in blobs]
                     + (list(codes) if with_codes else []), np.int32)
          if first else np.zeros(2 * n if with_codes else n, np.int32))
  head = np.asarray(multihost_utils.broadcast_one_to_all(head))
  lengths = head[:n]
  total = int(lengths.sum())
  buf = (np.frombuffer(b"".join(blobs), np.uint8) if first
         else np.zeros(total, np.uint8))
  if total:
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  ends = np.cumsum(lengths)
  out = [bytes(buf[e - l:e]).decode("utf-8") for l, e in zip(lengths, ends)]
  return out, ([int(c) for c in head[n:]] if with_codes else None)


class SharedAnchors:
  """Anchor texts on every process; the ledger and teacher on process 0.

    anchors = SharedAnchors(workdir, teacher)
    batch, texts = anchors.for_batch(batch)  # a collective: every process calls
    anchors.close()

  `for_batch` marks rows whose anchor is unusable (truncated at the
  teacher's max_tokens, or empty) invalid; `texts` gives the texts alone,
  unusable ones included. On one process it is `AnchorStore.get_or_query`.
  Process 0 raising (e.g. AnchorError) leaves the others waiting in the
  broadcast until jax.distributed's heartbeat ends them.
  """

  def __init__(self, workdir: str | os.PathLike, teacher: teacher_lib.Teacher,
               *, process_index: int | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    pi = jax.process_index() if process_index is None else process_index
    self.store = AnchorStore(workdir, teacher) if pi == 0 else None
    self.unusable: dict[str, str] = {}  # prompt id -> problem, seen so far

  def texts(self, prompts: Sequence[prompts_lib.Prompt]) -> list[str]:
    """The anchor of each prompt (process 0 asks for missing ones), unusable
    ones included: training reads `for_batch` (or `anchors`)."""
    local = (None if self.store is None
             else [a.text for a in self.store.get_or_query(prompts)])
    return broadcast_texts(local, len(prompts))

  def anchors(self, prompts: Sequence[prompts_lib.Prompt]
              ) -> tuple[list[str], list[str | None]]:
    """(texts, problems): each prompt's anchor text and why it cannot be an
    anchor ("truncated", "empty") or None; the same on every process. The
    unusable ones are remembered (`unusable`, `summary`)."""
    local, codes = None, None
    if self.store is not None:
      got = self.store.get_or_query(prompts)
      local = [a.text for a in got]
      codes = [0 if a.usable else 1 + PROBLEMS.index(a.problem) for a in got]
    texts, codes = _broadcast(local, codes, len(prompts), with_codes=True)
    problems = [PROBLEMS[c - 1] if c else None for c in codes]
    for p, problem in zip(prompts, problems):
      if problem:
        self.unusable[p.id] = problem
      else:
        self.unusable.pop(p.id, None)
    return texts, problems

  def usable(self, prompts: Sequence[prompts_lib.Prompt]) -> list[bool]:
    """Per prompt: its anchor can be trained on (a collective, as `texts`)."""
    return [p is None for p in self.anchors(prompts)[1]]

  def for_batch(self, batch):
    """(batch, texts): `batch` (a `data.PromptBatch`) with `valid` False
    where the anchor is unusable, and the anchor texts (unusable ones too:
    their rows are invalid, so nothing is trained on them)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    texts, problems = self.anchors(batch.prompts)
    ok = np.asarray([p is None for p in problems], bool)
    return dataclasses.replace(
        batch, valid=np.asarray(batch.valid, bool) & ok), texts

  def summary(self) -> str | None:
    """One line on the unusable anchors seen so far, or None if none: "N
    anchors truncated by the teacher's max_tokens; not trained on"."""
    n = {p: sum(1 for v in self.unusable.values() if v == p) for p in PROBLEMS}
    parts = []
    if n["truncated"]:
      parts.append(f"{n['truncated']} anchors truncated by the teacher's "
                   "max_tokens")
    if n["empty"]:
      parts.append(f"{n['empty']} anchors empty")
    return "; ".join(parts) + "; not trained on" if parts else None

  def teacher_calls(self) -> float:
    """Teacher requests in the ledger (0 on processes other than 0)."""
    return 0.0 if self.store is None else float(self.store.ledger.stats().calls)

  def close(self):
    if self.store is not None:
      self.store.close()


# ---------------------------------------------------------------- command line

_TEACHER_FLAG_KIND = {str: "string", float: "float", int: "integer"}


def _define_flags():
  """Flags of the command line only (library users import this module)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "optional config file with a `teacher` block and "
      "`data.train_path`; override fields with --config.teacher.model=...",
      lock_config=True)
  flags.DEFINE_string("prompts", None, "JSONL prompt file (default: the "
                      "config's data.train_path)")
  flags.DEFINE_string("workdir", None, "run directory holding anchors.sqlite")
  flags.DEFINE_bool("progress", True, "show a progress bar (stderr)")
  # --teacher.* flags win over the config's teacher block.
  defaults = teacher_lib.TeacherConfig()
  for f in dataclasses.fields(teacher_lib.TeacherConfig):
    kind = _TEACHER_FLAG_KIND[type(getattr(defaults, f.name))]
    getattr(flags, f"DEFINE_{kind}")(
        f"teacher.{f.name}", None,
        f"{f.metadata['help']} (default {getattr(defaults, f.name)!r})")
  return flags.FLAGS


def _teacher_config(flags_, config) -> teacher_lib.TeacherConfig:
  """Defaults < the config's teacher block < explicit --teacher.* flags."""
  values = {}
  if config is not None and "teacher" in config:
    values.update(config.teacher.to_dict())
  for f in dataclasses.fields(teacher_lib.TeacherConfig):
    if flags_[f"teacher.{f.name}"].present:
      values[f.name] = flags_[f"teacher.{f.name}"].value
  return teacher_lib.TeacherConfig.from_mapping(values)


def _prompts_path(flags_, config) -> str:
  if flags_.prompts:
    return flags_.prompts
  try:
    return config.data.train_path
  except (AttributeError, KeyError):
    raise AnchorError("no prompt file: give --prompts=FILE.jsonl, or a "
                      "--config with data.train_path") from None


def _fetch(flags_, config) -> int:
  import tqdm  # pylint: disable=g-import-not-at-top
  cfg = _teacher_config(flags_, config)
  prompts = prompts_lib.read_jsonl(_prompts_path(flags_, config))
  store = AnchorStore(flags_.workdir, teacher_lib.make(cfg))
  print(f"teacher: {store.teacher.label}")
  todo = len(store.missing(prompts))
  bar = tqdm.tqdm(total=todo, unit="prompt", disable=not flags_.progress,
                  dynamic_ncols=True)
  try:
    report = store.fetch(prompts, on_done=lambda *_: bar.update())
  finally:
    bar.close()
    stats = store.ledger.stats()
    store.close()
  print(f"prompts {report.prompts}, distinct {report.distinct}, already stored "
        f"{report.already}, stored now {report.stored}, failed {len(report.failed)}"
        + (f", unusable re-asked {report.reasked}" if report.reasked else ""))
  for pid, msg in report.failed[:10]:
    print(f"  failed {pid}: {msg}")
  print(format_stats(stats))
  return 1 if report.failed else 0


def _main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  flags_ = _FLAGS
  if len(argv) != 2 or argv[1] not in ("fetch", "stats"):
    raise app.UsageError("usage: python -m purld_jax.anchors fetch|stats "
                         "--workdir=DIR [...]; see --help")
  if not flags_.workdir:
    raise app.UsageError("--workdir is required")
  if flags_.verbosity < 1:  # one INFO line per HTTP request is noise
    for name in ("httpx", "httpx2"):
      logging.getLogger(name).setLevel(logging.WARNING)
  try:
    if argv[1] == "stats":
      ledger = Ledger(flags_.workdir, create=False)
      print(format_stats(ledger.stats()))
      return 0
    return _fetch(flags_, flags_.config)
  except (AnchorError, teacher_lib.ConfigError, teacher_lib.TeacherError,
          prompts_lib.PromptFileError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def console_main():
  """The `purld-anchors` command: the same as `python -m purld_jax.anchors`."""
  global _FLAGS
  from absl import app  # pylint: disable=g-import-not-at-top
  from purld_jax import quiet  # pylint: disable=g-import-not-at-top
  quiet.libraries()
  _FLAGS = _define_flags()
  app.run(_main)


if __name__ == "__main__":
  console_main()
