"""Is this file a healthy SQLite database? Checked without writing to it.

``problem(path)`` reads the header bytes itself (the magic string, the page
size and, when no connection can be open, the file size the header gives),
then asks SQLite (``PRAGMA quick_check``) on a read-only connection. With no
``-wal`` or ``-journal`` file beside it (no connection open in WAL mode, no
crash to recover), that
connection is also ``immutable``: no lock is taken and no ``-wal``/``-shm``
file is made. With one, it is read-only and locked as usual (a live writer
may be checkpointing), which may add a ``-shm`` file but never writes the
database itself.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse

_MAGIC = b"SQLite format 3\x00"


def _header_problem(path: str, *, sized: bool) -> str | None:
  """What the first 100 bytes say is wrong (not SQLite, a bad page size, and
  with `sized` a file shorter than its header's page count), or None."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(100)
  if not head.startswith(_MAGIC[:len(head)]):
    return "not an SQLite database (no SQLite header)"
  if len(head) < 100:
    return f"truncated: {size} bytes, shorter than an SQLite header"
  page = int.from_bytes(head[16:18], "big")
  page = 65536 if page == 1 else page
  if page < 512 or page & (page - 1):
    return f"a bad SQLite header (page size {page})"
  pages = int.from_bytes(head[28:32], "big")
  if sized and pages and head[24:28] == head[92:96] and size < pages * page:
    return (f"truncated: {size} bytes, its header says {pages} pages of "
            f"{page} bytes ({pages * page})")
  return None


def _sqlite_problem(path: str, *, live: bool, table: str | None
                    ) -> tuple[str | None, int]:
  """(what SQLite finds wrong or None, user_version), on a read-only
  connection; without `live` an immutable one."""
  uri = (f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
         + ("" if live else "&immutable=1"))
  try:
    db = sqlite3.connect(uri, uri=True, timeout=60)
    try:
      found = [r[0] for r in db.execute("PRAGMA quick_check(3)")]
      tables = {r[0] for r in db.execute(
          "SELECT name FROM sqlite_master WHERE type='table'")}
      version = db.execute("PRAGMA user_version").fetchone()[0]
    finally:
      db.close()
  except sqlite3.DatabaseError as e:
    return f"SQLite: {e}", 0
  if found != ["ok"]:
    return f"SQLite quick_check: {' '.join(' '.join(found).split())[:200]}", 0
  if table and tables and table not in tables:
    return (f"an SQLite database with no {table!r} table (its tables: "
            f"{', '.join(sorted(tables))})"), 0
  return None, version


def problem(path: str, *, table: str | None = None) -> tuple[str | None, int]:
  """(what is wrong with the SQLite file at `path`, or None; its
  user_version). A missing or empty file is fine (SQLite starts it anew).
  With `table`, a database with tables but not that one is wrong too.
  Raises OSError when the file cannot be read."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return None, 0
  live = any(os.path.exists(path + end) for end in ("-wal", "-journal"))
  found = _header_problem(path, sized=not live)
  if found is not None:
    return found, 0
  return _sqlite_problem(path, live=live, table=table)
