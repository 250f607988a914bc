"""The anchor ledger: keys, once-per-prompt, kills, faults, the key canary, the CLI."""

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import textwrap
import threading
import time

import pytest

from purld_jax import anchors
from purld_jax import ledger as ledger_lib
from purld_jax import prompts
from purld_jax import teacher
from purld_jax import teacher_wire
from tests import fault_server as fault_lib
from tests.fixtures_teacher import cli_args, cli_env, run_cli, write_prompts
from tests.fixtures_teacher import fault_server, llamacpp_server  # noqa: F401

Q = [prompts.Prompt.from_text(f"question {i}", id=f"q{i}", answer=str(i))
     for i in range(6)]


def _cfg(base_url, **kw):
  kw = dict(dict(model="m", api_key_env="", timeout_s=2.0, max_retries=2,
                 backoff_base_s=0.01, backoff_max_s=0.05), **kw)
  return teacher.TeacherConfig(base_url=base_url, **kw)


def _store(workdir, base_url, **kw):
  return anchors.AnchorStore(workdir, teacher.make(_cfg(base_url, **kw)))


# ---------------------------------------------------------------- keys

def test_key_is_sha256_of_canonical_json():
  req = teacher.Request(messages=(("user", "hi"),), backend="openai", model="m",
                        params=(("max_tokens", 16), ("temperature", 0.0)))
  want = ('{"backend":"openai","messages":[["user","hi"]],"model":"m",'
          '"params":{"max_tokens":16,"temperature":0.0},"v":1}')
  assert ledger_lib.canonical_json(req) == want
  assert ledger_lib.ledger_key(req) == hashlib.sha256(want.encode()).hexdigest()


def test_key_depends_on_what_is_asked_only():
  key = lambda p, **kw: ledger_lib.ledger_key(
      teacher.make(_cfg(**dict(dict(base_url="http://a/v1"), **kw))).request(p))
  p = Q[0]
  same = [prompts.Prompt("other-id", p.messages, "other answer")]
  assert key(same[0]) == key(p)                                  # id, answer: no
  assert key(p, base_url="http://b/v1", timeout_s=9) == key(p)   # endpoint: no
  assert key(p, temperature=0) == key(p, temperature=0.0)        # 0 == 0.0
  for kw in ({"model": "m2"}, {"temperature": 0.7}, {"max_tokens": 7},
             {"system_prompt": "Be brief."}):
    assert key(p, **kw) != key(p), kw
  dataset = lambda p: ledger_lib.ledger_key(
      teacher.make(teacher.TeacherConfig(backend="dataset")).request(p))
  assert dataset(p) != key(p)
  assert dataset(prompts.Prompt(p.id, p.messages, "new ref")) != dataset(p)


# ---------------------------------------------------------------- the store

def test_get_or_query_asks_once(tmp_path, fault_server):
  twin = prompts.Prompt("twin", Q[0].messages)  # same question, other id
  store = _store(tmp_path, fault_server.base_url)
  got = store.get_or_query(Q[:3] + [twin])
  assert [a.text for a in got] == [fault_lib.answer_for(f"question {i}")
                                   for i in (0, 1, 2, 0)]
  assert [a.prompt_id for a in got] == ["q0", "q1", "q2", "twin"]
  assert fault_server.calls() == 3  # the twin shares q0's key
  store.close()
  store = _store(tmp_path, fault_server.base_url)  # a new process, same workdir
  assert store.get_or_query(Q[:4])[3].text == fault_lib.answer_for("question 3")
  assert fault_server.calls() == 4
  s = store.ledger.stats()
  assert (s.anchors, s.requests, s.calls, s.resent_after_kill, s.asked_after_stored) == (
      4, 4, 4, 0, 0)
  # usage: 2 words in, 3 words out per answer
  assert (s.prompt_tokens, s.completion_tokens) == (8, 12)


def test_failures_lose_nothing_stored(tmp_path, fault_server):
  store = _store(tmp_path, fault_server.base_url)
  store.get_or_query(Q[:2])
  fault_server.push(*[("status", 500)] * 3)  # 1 + max_retries: one prompt fails
  report = store.fetch(Q[:3])
  assert (report.already, report.stored, len(report.failed)) == (2, 0, 1)
  assert "gave up after 3 attempt" in report.failed[0][1]
  fault_server.push(*[("status", 503)] * 3)
  with pytest.raises(anchors.AnchorError, match="1 prompt.*'q2'"):
    store.get_or_query(Q[:3])
  assert [a is not None for a in store.lookup(Q[:3])] == [True, True, False]
  s = store.ledger.stats()
  assert (s.failed, s.calls, s.retries, s.errors) == (
      2, 2 + 3 + 3, 4, {"server_error": 6})
  assert store.get_or_query(Q[:3])[2].text == fault_lib.answer_for("question 2")


def test_fatal_error_stops_fetch_keeps_stored(tmp_path, fault_server):
  store = _store(tmp_path, fault_server.base_url, max_concurrency=1)
  store.get_or_query(Q[:1])
  fault_server.push(("status", 401))
  with pytest.raises(teacher_wire.TeacherError, match="HTTP 401"):
    store.fetch(Q)
  assert fault_server.calls() == 2  # one 401, the rest never sent
  assert store.lookup(Q[:1])[0].text == fault_lib.answer_for("question 0")


def test_truncated_kept_is_flagged(tmp_path, fault_server):
  fault_server.push("truncated")
  a = _store(tmp_path, fault_server.base_url).get_or_query(Q[:1])[0]
  assert (a.truncated, a.finish_reason) == (True, "length")
  assert (a.usable, a.problem) == (False, "truncated")  # stored, never an anchor


def test_killed_intent_is_counted_as_duplicate(tmp_path):
  """An open intent (its process died) makes the next send a counted re-send."""
  ledger = ledger_lib.Ledger(tmp_path)
  rid = ledger.begin("k", "p", "openai")
  ledger.record_attempt(rid, teacher_wire.Attempt(1, "timeout", error="slow"))
  assert ledger.stats().unfinished == 1  # ... and then kill -9
  rid2 = ledger.begin("k", "p", "openai")
  reply = teacher.Reply("A", "stop", False, 1, 1, 0.1,
                        (teacher_wire.Attempt(1, "ok", 200, prompt_tokens=1,
                                              completion_tokens=1),),
                        False, "t")
  request = teacher.Request((("user", "q"),), "openai", "m", ())
  ledger.store(rid2, "k", "p", request, reply)
  assert ledger.begin("k", "p", "openai") is None  # stored: never asked again
  s = ledger.stats()
  assert (s.requests, s.unfinished, s.resent_after_kill, s.asked_after_stored,
          s.anchors, s.calls, s.retries) == (2, 0, 1, 0, 1, 1, 0)
  db = sqlite3.connect(ledger.path)
  assert db.execute("SELECT journal_mode FROM pragma_journal_mode").fetchone() == ("wal",)
  assert db.execute("SELECT outcome, prev_outcome FROM requests ORDER BY id").fetchall() == [
      ("killed", None), ("stored", "killed")]


def test_second_writer_waits_then_asks_nothing(tmp_path, fault_server):
  """Two stores on one workdir: the flock makes the second find the answers."""
  fault_server.delay_s = 0.3
  first, second = (_store(tmp_path, fault_server.base_url) for _ in range(2))
  thread = threading.Thread(target=first.get_or_query, args=(Q[:2],))
  thread.start()
  while fault_server.calls() < 2:  # the first is asking ...
    time.sleep(0.01)
  got = second.get_or_query(Q[:2])  # ... the second waits for its lock
  thread.join()
  assert [a.text for a in got] == [fault_lib.answer_for(f"question {i}") for i in (0, 1)]
  assert fault_server.calls() == 2


def test_dataset_backend_rows_are_labelled(tmp_path):
  store = anchors.AnchorStore(tmp_path, teacher.make(teacher.TeacherConfig(backend="dataset")))
  got = store.get_or_query(Q[:2])
  assert [a.text for a in got] == ["0", "1"] and all(a.simulated for a in got)
  row = sqlite3.connect(store.ledger.path).execute(
      "SELECT simulated, teacher FROM anchors LIMIT 1").fetchone()
  assert row[0] == 1 and "SIMULATED" in row[1]
  s = store.ledger.stats()
  assert (s.simulated, s.calls) == (2, 0)
  assert "2 SIMULATED" in ledger_lib.format_stats(s)


# ---------------------------------------------------------------- kill -9

def _ledger_counts(path):
  db = sqlite3.connect(os.path.join(path, ledger_lib.FILENAME))
  rows = dict(db.execute("SELECT key, count(*) FROM requests GROUP BY key"))
  created = dict(db.execute("SELECT text, created_at FROM anchors"))
  return rows, created


def test_kill9_ten_times_then_resume(tmp_path):
  """Kill the CLI at random moments (each time with requests in flight)."""
  n, rng = 50, random.Random(6)
  path = write_prompts(tmp_path / "p.jsonl", n)
  workdir = tmp_path / "wd"
  with fault_lib.FaultServer(delay_s=0.15) as server:
    args = cli_args("fetch", workdir=workdir, prompts=path, base_url=server.base_url,
                    model="m", api_key_env="", max_concurrency=4)
    for _ in range(10):
      before = server.calls()
      proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
      target, deadline = before + rng.randint(1, 4), time.monotonic() + 60
      while server.calls() < target and time.monotonic() < deadline:
        time.sleep(0.005)
      time.sleep(rng.uniform(0.0, 0.03))  # < delay_s: the request is in flight
      proc.send_signal(signal.SIGKILL)
      assert proc.wait() == -signal.SIGKILL
    done = run_cli("fetch", workdir=workdir, prompts=path, base_url=server.base_url,
                   model="m", api_key_env="", max_concurrency=4)
    assert done.returncode == 0, done.stderr
    received = list(server.requests)
  s = ledger_lib.Ledger(workdir).stats()
  assert (s.anchors, s.unfinished, s.failed, s.asked_after_stored) == (n, 0, 0, 0)
  assert s.resent_after_kill >= 10  # every kill left >= 1 request in flight
  assert "asked again after stored (must be 0): 0" in done.stdout
  assert f"duplicates (re-sent after a kill, may be paid twice): {s.resent_after_kill}" in done.stdout
  # Every prompt exactly once, with its own answer.
  store = anchors.AnchorStore(workdir, teacher.make(_cfg("http://unused/v1")))
  got = store.lookup(prompts.read_jsonl(path))
  assert [a.text for a in got] == [fault_lib.answer_for(f"question {i}") for i in range(n)]
  # The server's view: no prompt was asked after its answer was stored, and the
  # re-sends it saw are within the ledger's count of duplicates.
  rows, created = _ledger_counts(workdir)
  assert sum(rows.values()) - n == s.resent_after_kill
  seen = {}
  for r in received:
    text = fault_lib.answer_for(r["messages"][-1]["content"])
    assert r["at"] < created[text]
    seen[text] = seen.get(text, 0) + 1
  assert sum(seen.values()) - n <= s.resent_after_kill
  # Completed calls plus the killed ones account for all the server saw.
  assert s.calls == n and s.calls + s.resent_after_kill >= len(received)
  # A second fetch makes no call.
  with fault_lib.FaultServer() as server:
    again = run_cli("fetch", workdir=workdir, prompts=path, base_url=server.base_url,
                    model="m", api_key_env="")
    assert (again.returncode, server.calls()) == (0, 0)
  assert ledger_lib.Ledger(workdir).stats() == s


# ---------------------------------------------------------------- the key canary

def test_canary_key_in_no_file_and_no_log(tmp_path, fault_server, caplog):
  canary = "sk-canary-" + os.urandom(8).hex()
  env = cli_env(PURLD_CANARY_KEY=canary)
  path = write_prompts(tmp_path / "p.jsonl", 4)
  workdir = tmp_path / "wd"
  fault_server.push(("status", 429, {"Retry-After": "0"}), ("status", 500), "malformed")
  # In process, every logger at DEBUG (the openai/httpx ones included).
  caplog.set_level(1)
  store = anchors.AnchorStore(workdir, teacher.make(
      _cfg(fault_server.base_url, api_key_env="PURLD_CANARY_KEY"), environ=env))
  store.get_or_query(prompts.read_jsonl(path)[:2])
  fault_server.push(("status", 401))
  with pytest.raises(teacher_wire.TeacherError) as e:
    store.fetch(prompts.read_jsonl(path))
  store.close()
  # The command line, verbose, with retries.
  fault_server.push(("status", 503), "reset")
  out = run_cli("fetch", env=env, workdir=workdir, prompts=path, extra=["--verbosity=1"],
                base_url=fault_server.base_url, model="m",
                api_key_env="PURLD_CANARY_KEY", backoff_base_s=0.01)
  assert out.returncode == 0, out.stderr
  stats = run_cli("stats", env=env, workdir=workdir)
  # The key was used ...
  assert {r["authorization"] for r in fault_server.requests} == {f"Bearer {canary}"}
  # ... and is nowhere else.
  texts = [caplog.text, str(e.value), out.stdout, out.stderr, stats.stdout, stats.stderr]
  assert "HTTP Request" in caplog.text or "openai" in caplog.text  # logs were captured
  for t in texts:
    assert canary not in t
  files = [os.path.join(d, f) for d, _, fs in os.walk(workdir) for f in fs]
  assert any(f.endswith(".sqlite") for f in files)
  for f in files:
    with open(f, "rb") as fh:
      assert canary.encode() not in fh.read(), f


# ---------------------------------------------------------------- command line

def test_cli_fetch_stats_and_config_file(tmp_path, fault_server):
  path = write_prompts(tmp_path / "p.jsonl", 3)
  config = tmp_path / "cfg.py"
  config.write_text(textwrap.dedent(f"""
      import ml_collections
      def get_config():
        c = ml_collections.ConfigDict()
        c.data = dict(train_path={path!r})
        c.teacher = dict(backend="openai", base_url={fault_server.base_url!r},
                         model="from-config", api_key_env="", max_tokens=8)
        return c
      """))
  workdir = tmp_path / "wd"
  r = run_cli("fetch", workdir=workdir, model="from-flag",
              extra=[f"--config={config}", "--config.teacher.max_tokens=12"])
  assert r.returncode == 0, r.stderr
  assert "stored now 3" in r.stdout and "openai:from-flag@" in r.stdout
  assert {x["max_tokens"] for x in fault_server.requests} == {12}
  db = workdir / "anchors.sqlite"
  before = db.read_bytes()
  s = run_cli("stats", workdir=workdir)
  assert s.returncode == 0 and "teacher calls (HTTP):        3" in s.stdout
  assert db.read_bytes() == before  # stats opens the ledger read-only


def test_cli_help():
  r = subprocess.run(cli_args("fetch", workdir="x")[:3] + ["--helpshort"],
                     capture_output=True, text=True, env=cli_env(), timeout=60)
  assert "--teacher.base_url" in r.stdout and "--prompts" in r.stdout


@pytest.mark.parametrize("case, expect", [
    ("backend", "unknown teacher backend 'nope'"),
    ("env", "PURLD_NOT_SET_KEY is not set"),
    ("url", "cannot reach http://127.0.0.1:9/v1"),
    ("line", "p.jsonl:3: field 'messages[0].role'"),
    ("stats", "no anchor ledger at"),
])
def test_cli_bad_input_names_the_problem(tmp_path, case, expect):
  path = write_prompts(tmp_path / "p.jsonl", 2)
  teacher_kw = dict(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="",
                    max_retries=1, backoff_base_s=0.01)
  if case == "backend":
    teacher_kw["backend"] = "nope"
  if case == "env":
    teacher_kw["api_key_env"] = "PURLD_NOT_SET_KEY"
  if case == "line":
    with open(path, "a") as f:
      f.write('{"messages": [{"role": "robot", "content": "x"}]}\n')
  command = "stats" if case == "stats" else "fetch"
  r = run_cli(command, workdir=tmp_path / "wd", prompts=path, **teacher_kw)
  assert r.returncode == 2, r.stdout + r.stderr
  assert expect in r.stderr


# ---------------------------------------------------------------- real server

def _llamacpp_kw(tmp_path, server, n):
  return dict(workdir=tmp_path / "wd", prompts=write_prompts(tmp_path / "p.jsonl", n),
              base_url=server.base_url, model=server.model, api_key_env="",
              max_tokens=16, max_concurrency=2, timeout_s=120)


@pytest.mark.llamacpp
def test_llamacpp_fetch_then_zero_calls(tmp_path, llamacpp_server):
  kw = _llamacpp_kw(tmp_path, llamacpp_server, 8)
  done = run_cli("fetch", timeout=600, **kw)
  assert done.returncode == 0, done.stderr
  s = _stats(kw["workdir"])
  assert (s.anchors, s.requests, s.failed) == (8, 8, 0)
  assert 0 < s.completion_tokens <= 16 * s.calls
  again = run_cli("fetch", **kw)
  assert again.returncode == 0 and "stored now 0" in again.stdout
  assert _stats(kw["workdir"]) == s  # no new intent, no call


def _stats(workdir):
  """The ledger's stats, read-only and closed at once (a test that polls
  must not leave connections behind a killed writer)."""
  ledger = ledger_lib.Ledger(workdir, readonly=True)
  try:
    return ledger.stats()
  finally:
    ledger.close()


@pytest.mark.llamacpp
@pytest.mark.slow
def test_llamacpp_50_prompts_kill_resume_then_zero_calls(tmp_path, llamacpp_server):
  n = 50
  kw = _llamacpp_kw(tmp_path, llamacpp_server, n)
  t0 = time.monotonic()
  proc = subprocess.Popen(cli_args("fetch", **kw), env=cli_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  db = os.path.join(kw["workdir"], ledger_lib.FILENAME)
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline:  # kill once some answers are stored
    if os.path.exists(db) and _stats(kw["workdir"]).anchors >= 5:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = run_cli("fetch", timeout=900, **kw)
  seconds = time.monotonic() - t0
  assert done.returncode == 0, done.stderr
  s = _stats(kw["workdir"])
  assert (s.anchors, s.failed, s.asked_after_stored, s.unfinished) == (n, 0, 0, 0)
  assert s.requests == n + s.resent_after_kill
  again = run_cli("fetch", **kw)
  assert again.returncode == 0 and "stored now 0" in again.stdout
  assert _stats(kw["workdir"]) == s  # no new intent, no call
  print(f"\nllama.cpp: {n} anchors (max_tokens 16) in {seconds:.1f}s with one "
        f"kill; {s.calls} completed calls, {s.resent_after_kill} re-sent after it")


# ---------------------------------------------------------------- schema

V1_ANCHORS = """CREATE TABLE anchors (
  key TEXT PRIMARY KEY, prompt_id TEXT NOT NULL, request_id INTEGER NOT NULL,
  teacher TEXT NOT NULL, backend TEXT NOT NULL, model TEXT NOT NULL,
  simulated INTEGER NOT NULL, messages TEXT NOT NULL, params TEXT NOT NULL,
  text TEXT NOT NULL, finish_reason TEXT NOT NULL, truncated INTEGER NOT NULL,
  prompt_tokens INTEGER, completion_tokens INTEGER, latency_s REAL NOT NULL,
  attempts INTEGER NOT NULL, errors TEXT NOT NULL, created_at REAL NOT NULL);
PRAGMA user_version = 1;"""


def test_a_v1_ledger_keeps_its_rows_and_gains_logprobs(tmp_path, fault_server):
  # A ledger written before logprobs existed (schema 1, by hand) opens: its
  # row is read back without logprobs, and new rows keep theirs.
  db = sqlite3.connect(tmp_path / ledger_lib.FILENAME)
  db.executescript(V1_ANCHORS)
  db.execute("INSERT INTO anchors VALUES ('k1', 'q0', 1, 't', 'openai', 'm', 0, "
             "'[]', '{}', 'old answer', 'stop', 0, 1, 2, 0.5, 1, '[]', 0.0)")
  db.commit()
  db.close()
  store = _store(tmp_path, fault_server.base_url, top_logprobs=1)
  try:
    old = store.ledger.rows(["k1"])["k1"]
    assert (old["text"], old["logprobs"]) == ("old answer", None)
    got, = store.get_or_query(Q[:1])
  finally:
    store.close()
  assert got.logprobs == tuple(((tok, -0.25),)
                               for tok in ("ANSWER:", " question", " 0"))
  db = sqlite3.connect(tmp_path / ledger_lib.FILENAME)
  assert db.execute("PRAGMA user_version").fetchone()[0] == 2
  assert db.execute("SELECT count(*) FROM anchors").fetchone()[0] == 2
  db.close()
