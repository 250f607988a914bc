"""A hostile teacher: transient faults stay transient, one prompt's failure
fails it alone, a rerun asks only the unanswered, training stops in one line.

Every count below follows from max_retries = 2 (3 attempts per request) and
the faults pushed; the fault server counts what it was sent.
"""

import subprocess
import sys

import pytest

from purld_jax import anchors
from purld_jax import ledger as ledger_lib
from purld_jax import prompts
from purld_jax import teacher
from purld_jax import teacher_wire
from tests import fault_server as fault_lib
from tests.fixtures_teacher import run_cli, write_prompts
from tests.fixtures_teacher import fault_server  # noqa: F401  (fixture)
from tests.train_fixtures import REPO, subprocess_env, small_train_path

Q = [prompts.Prompt.from_text(f"question {i}", id=f"q{i}") for i in range(4)]
FAST = dict(model="m", api_key_env="", timeout_s=2.0, max_retries=2,
            backoff_base_s=0.01, backoff_max_s=0.05)


def _teacher(base_url, **kw):
  return teacher.make(teacher.TeacherConfig(base_url=base_url,
                                            **dict(FAST, **kw)))


def _asked(server, text):
  """How many requests the server got for the question `text`."""
  return sum(r["messages"][-1]["content"] == text for r in server.requests)


# ---------------------------------------------------------------- the client

def test_a_reset_on_every_attempt_is_a_failure_not_unreachable(fault_server):
  t = _teacher(fault_server.base_url)
  fault_server.push("reset", "reset", "reset")  # 1 + max_retries attempts
  with pytest.raises(teacher_wire.TeacherError) as e:
    t.ask(Q[0])
  assert (e.value.kind, e.value.fatal) == ("connection", False)
  assert "lost" in str(e.value) and fault_server.calls() == 3


def test_refused_is_fatal_only_before_the_first_contact():
  with fault_lib.FaultServer() as server:
    url = server.base_url
    seen = _teacher(url)
    assert seen.ask(Q[0]).text == fault_lib.answer_for("question 0")
  # The server is gone: its port refuses connections now.
  with pytest.raises(teacher_wire.TeacherError, match=f"cannot reach {url}") as e:
    seen.ask(Q[1])
  assert (e.value.kind, e.value.fatal) == ("unreachable", False)  # a restart
  with pytest.raises(teacher_wire.TeacherError, match=f"cannot reach {url}") as e:
    _teacher(url).ask(Q[1])  # never reached: the URL is wrong or it is down
  assert (e.value.kind, e.value.fatal) == ("unreachable", True)


# ---------------------------------------------------------------- the store

def test_reset_on_the_last_retry_fails_one_prompt_and_a_rerun_answers_it(
    tmp_path, fault_server):
  # One worker: q0's three attempts come first (500, 503, then a reset on
  # the last retry); q1..q3 are asked after it, once each.
  fault_server.push(("status", 500), ("status", 503), "reset")
  store = anchors.AnchorStore(
      tmp_path, _teacher(fault_server.base_url, max_concurrency=1))
  report = store.fetch(Q)
  store.close()
  assert (report.stored, [pid for pid, _ in report.failed], report.skipped,
          report.unanswered, report.answered) == (3, ["q0"], 0, 1, 3)
  assert "last: connection" in report.failed[0][1]
  assert fault_server.calls() == 3 + 3
  store = anchors.AnchorStore(tmp_path, _teacher(fault_server.base_url))
  again = store.fetch(Q)  # a later run: q0 alone is asked
  assert (again.already, again.stored, again.failed, again.unanswered) == (
      3, 1, (), 0)
  assert fault_server.calls() == 7 and _asked(fault_server, "question 0") == 4
  assert store.lookup(Q[:1])[0].text == fault_lib.answer_for("question 0")
  store.close()


def test_training_gets_one_line_naming_the_teacher_and_the_count(
    tmp_path, fault_server):
  fault_server.always("question 2", ("status", 503))
  store = anchors.AnchorStore(tmp_path, _teacher(fault_server.base_url))
  with pytest.raises(anchors.AnchorError) as e:
    store.get_or_query(Q)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("1 prompt(s) of 4 unanswered by the teacher "
                            f"openai:m@{fault_server.base_url} (e.g. 'q2': "
                            "gave up after 3 attempt(s)")
  assert str(tmp_path / ledger_lib.FILENAME) in message
  assert [a is not None for a in store.lookup(Q)] == [True, True, False, True]
  store.close()


# ---------------------------------------------------------------- the CLI

@pytest.mark.parametrize("fault, kind", [("reset", "connection"),
                                         (("status", 503), "server_error")])
def test_cli_one_prompt_always_fails_the_others_are_stored(
    tmp_path, fault_server, fault, kind):
  path = write_prompts(tmp_path / "p.jsonl", 5)
  kw = dict(workdir=tmp_path / "wd", prompts=path, max_concurrency=2,
            base_url=fault_server.base_url, **FAST)
  fault_server.always("question 2", fault)
  first = run_cli("fetch", **kw)
  assert first.returncode == 1, first.stderr
  assert ("prompts 5 (distinct 5): answered 4 (already stored 0, stored now "
          "4), failed 1, skipped 0") in first.stdout
  assert f"failed q2: gave up after 3 attempt(s); last: {kind}" in first.stdout
  assert "1 prompt(s) unanswered: run the same command again" in first.stdout
  assert "Traceback" not in first.stderr
  assert fault_server.calls() == 4 + 3
  fault_server.always("question 2", None)  # the teacher is well again
  second = run_cli("fetch", **kw)
  assert second.returncode == 0, second.stderr
  assert ("answered 5 (already stored 4, stored now 1), failed 0, skipped 0"
          in second.stdout)
  assert fault_server.calls() == 8 and _asked(fault_server, "question 2") == 4
  third = run_cli("fetch", **kw)  # nothing left to ask
  assert third.returncode == 0 and fault_server.calls() == 8


def test_cli_unreachable_at_first_contact_skips_the_rest_and_names_the_url(
    tmp_path):
  # Port 9 (discard) refuses: q0 fails fatally, q1 and q2 are never sent.
  path = write_prompts(tmp_path / "p.jsonl", 3)
  url = "http://127.0.0.1:9/v1"
  r = run_cli("fetch", workdir=tmp_path / "wd", prompts=path, base_url=url,
              max_concurrency=1, **dict(FAST, max_retries=1))
  assert r.returncode == 2, r.stdout + r.stderr
  assert "answered 0 (already stored 0, stored now 0), failed 1, skipped 2" in (
      r.stdout)
  assert "3 prompt(s) unanswered" in r.stdout
  # stderr: the one retry's warning, then the error; no traceback.
  err = r.stderr.strip().splitlines()
  assert len(err) <= 3 and "Traceback" not in r.stderr, r.stderr
  assert err[-1].startswith("error: gave up after 2 attempt(s); last: "
                            f"unreachable: cannot reach {url}")


# ---------------------------------------------------------------- training

def test_sft_run_stops_in_one_line_not_a_traceback(tmp_path, fault_server):
  """The tiny SFT run prefetches its anchors (data.prefetch_anchors) before
  anything is compiled; one prompt always gets a 503."""
  path = small_train_path()
  unlucky = prompts.read_jsonl(path)[3]
  fault_server.always(unlucky.messages[-1][1], ("status", 503))
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "purld_jax.main", "--config=configs/sft.py:tiny",
       f"--workdir={workdir}", "--config.mesh.data=1",
       f"--config.data.train_path={path}", "--config.teacher.backend=openai",
       f"--config.teacher.base_url={fault_server.base_url}",
       "--config.teacher.model=m", "--config.teacher.api_key_env=",
       "--config.teacher.max_tokens=8",  # = the tiny sft.max_response_len
       "--config.teacher.max_retries=1", "--config.teacher.backoff_base_s=0.01"],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert errors[0].startswith("error: 1 prompt(s) of 16 unanswered by the "
                              f"teacher openai:m@{fault_server.base_url} "
                              f"(e.g. {unlucky.id!r}")
  s = ledger_lib.Ledger(workdir, create=False).stats()
  assert (s.anchors, s.failed) == (15, 1)  # the others are kept
