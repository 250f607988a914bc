"""Truncated and empty teacher answers: paid for once, stored, never an anchor.

A truncated (finish_reason 'length') or empty answer stays in the ledger (it
was paid for) but is unusable: SFT's batch builder trains on none of its
tokens, PU-RL's group for it is invalid. Under on_truncated='keep' it is
never asked again; under 'retry' it is re-asked once, with the same request,
and replaced when a complete answer comes back (a new paid call).

Expected numbers are counted by hand from the fake teacher's script.
"""

import sqlite3

import jax
import numpy as np
import pytest

from purld_jax import anchors
from purld_jax import data as data_lib
from purld_jax import ledger as ledger_lib
from purld_jax import prompts as prompts_lib
from purld_jax import rollout
from purld_jax import sampling as sampling_lib
from purld_jax import shared_anchors
from purld_jax import teacher as teacher_lib
from purld_jax import teacher_wire
from purld_jax.train import sft
from tests import fault_server as fault_lib
from tests.fixtures_teacher import fault_server  # noqa: F401
from tests.train_fixtures import SMALL_TRAIN
from tests.train_fixtures import char_tok  # noqa: F401
from tests.train_fixtures import jit_cache  # noqa: F401
from tests.train_fixtures import tiny_config

P = [prompts_lib.Prompt.from_text(q, id=i, answer=a) for i, q, a in
     (("a", "1+1?", "2"), ("b", "2+2?", "4"), ("c", "20+22?", "42"))]
FULL = {"a": "2", "b": "4", "c": "42"}
FRAGMENT = "The ans"  # what a teacher cut at max_tokens sends back


class FakeTeacher:
  """A teacher whose n-th answer to prompt id `i` is `script[i][n]` (the
  last one repeats): (text, finish_reason), or a TeacherError to raise.
  Each ask is one billed attempt (1 prompt token, len(text) completion
  tokens), reported through on_attempt as the real teacher does. `asked`
  (prompt id -> asks) may be shared by the teachers of several stores: the
  script goes on where the last one stopped, as a server would."""

  simulated, max_concurrency, label = False, 1, "fake:teacher"

  def __init__(self, script, *, on_truncated="keep", asked=None):
    self.script = script
    self.cfg = teacher_lib.TeacherConfig(on_truncated=on_truncated)
    self.asked = {} if asked is None else asked

  def request(self, prompt):
    return teacher_lib.Request(messages=prompt.messages, backend="fake",
                               model="m", params=(("max_tokens", 8),))

  def prepare(self):
    pass

  def ask(self, prompt, on_attempt=None):
    n = self.asked.get(prompt.id, 0)
    self.asked[prompt.id] = n + 1
    answers = self.script.get(prompt.id) or [(FULL[prompt.id], "stop")]
    answer = answers[min(n, len(answers) - 1)]
    if isinstance(answer, Exception):
      if on_attempt:
        on_attempt(teacher_wire.Attempt(1, "truncated", 200, str(answer)))
      raise answer
    text, finish = answer
    attempt = teacher_wire.Attempt(1, "ok", 200, prompt_tokens=1,
                                   completion_tokens=len(text))
    if on_attempt:
      on_attempt(attempt)
    return teacher_lib.Reply(
        text=text, finish_reason=finish, truncated=finish == "length",
        prompt_tokens=1, completion_tokens=len(text), latency_s=0.0,
        attempts=(attempt,), simulated=False, teacher=self.label)


def _store(workdir, script, on_truncated="keep", asked=None):
  """A store on `workdir` (a new process, each call) under `on_truncated`,
  which the store reads from its teacher's config."""
  t = FakeTeacher(script, on_truncated=on_truncated, asked=asked)
  return anchors.AnchorStore(workdir, t), t


def _requests(store, prompt):
  """(outcome, prev_outcome) of the ledger's requests for `prompt`'s key."""
  key = ledger_lib.ledger_key(store.teacher.request(prompt))
  db = sqlite3.connect(store.ledger.path)
  try:
    return db.execute("SELECT outcome, prev_outcome FROM requests WHERE key=? "
                      "ORDER BY id", (key,)).fetchall()
  finally:
    db.close()


# ---------------------------------------------------------------- what is usable

@pytest.mark.parametrize("text, finish, truncated, want", [
    ("The answer is 4.", "stop", False, None),
    (FRAGMENT, "length", True, "truncated"),
    (FRAGMENT, "length", False, "truncated"),   # the finish reason alone
    ("", "stop", False, "empty"),
    (" \n\t", "stop", False, "empty"),
])
def test_answer_problem(text, finish, truncated, want):
  assert ledger_lib.answer_problem(text, finish, truncated) == want


def test_truncated_answer_is_stored_once_and_marked_unusable(tmp_path):
  store, t = _store(tmp_path, {"b": [(FRAGMENT, "length")]})
  got = store.get_or_query(P)
  assert [a.text for a in got] == ["2", FRAGMENT, "42"]
  assert [a.usable for a in got] == [True, False, True]
  assert [a.problem for a in got] == [None, "truncated", None]
  s = store.ledger.stats()
  # 3 prompts, 3 paid calls; 1 row truncated, and so 1 unusable; no re-ask.
  assert (s.anchors, s.truncated, s.unusable, s.requests, s.calls, s.reasked,
          s.asked_after_stored) == (3, 1, 1, 3, 3, 0, 0)
  assert "unusable (truncated or empty; never an anchor): 1" in (
      ledger_lib.format_stats(s))
  assert t.asked == {"a": 1, "b": 1, "c": 1}


def test_empty_answer_is_unusable(tmp_path):
  store, _ = _store(tmp_path, {"c": [("  \n", "stop")]})
  got = store.get_or_query(P)
  assert [a.problem for a in got] == [None, None, "empty"]
  s = store.ledger.stats()
  assert (s.truncated, s.unusable) == (0, 1)


# ---------------------------------------------------------------- keep

def test_keep_never_asks_a_truncated_answer_again(tmp_path):
  script = {"b": [(FRAGMENT, "length"), ("4", "stop")]}
  asked = {}
  store, _ = _store(tmp_path, script, asked=asked)
  store.get_or_query(P)
  assert store.get_or_query(P)[1].text == FRAGMENT
  assert store.missing(P) == {}
  assert store.fetch(P).stored == 0
  store.close()
  store, _ = _store(tmp_path, script, asked=asked)  # a new process
  assert store.get_or_query(P)[1].text == FRAGMENT
  assert asked == {"a": 1, "b": 1, "c": 1}  # paid once, ever
  s = store.ledger.stats()
  assert (s.requests, s.calls, s.reasked, s.unusable) == (3, 3, 0, 1)
  assert _requests(store, P[1]) == [("stored", None)]


# ---------------------------------------------------------------- retry

def test_retry_reasks_a_stored_truncated_answer_once_and_replaces_it(tmp_path):
  script = {"b": [(FRAGMENT, "length"), ("4", "stop")]}
  asked = {}
  keep, _ = _store(tmp_path, script, asked=asked)
  keep.get_or_query(P)  # stored truncated under 'keep'
  keep.close()
  store, _ = _store(tmp_path, script, on_truncated="retry", asked=asked)
  assert list(store.missing(P).values()) == [P[1]]
  got = store.get_or_query(P)
  assert [a.text for a in got] == ["2", "4", "42"]
  assert all(a.usable for a in got)
  assert asked == {"a": 1, "b": 2, "c": 1}  # b once more; a and c not
  s = store.ledger.stats()
  # 3 + 1 requests, each one paid call; the row replaced: nothing unusable.
  assert (s.anchors, s.truncated, s.unusable, s.requests, s.calls, s.reasked,
          s.asked_after_stored, s.resent_after_kill) == (3, 0, 0, 4, 4, 1, 0, 0)
  assert _requests(store, P[1]) == [("stored", None), ("replaced", "unusable")]
  store.get_or_query(P)
  store.close()
  store, _ = _store(tmp_path, script, on_truncated="retry", asked=asked)
  assert store.get_or_query(P)[1].text == "4"
  assert asked == {"a": 1, "b": 2, "c": 1}


@pytest.mark.parametrize("second", [
    (FRAGMENT + "wer is", "length"),   # cut again
    teacher_wire.TeacherError("gave up: truncated", kind="truncated"),
])
def test_retry_reasks_only_once(tmp_path, second):
  script = {"b": [(FRAGMENT, "length"), second, ("4", "stop")]}
  asked = {}
  keep, _ = _store(tmp_path, script, asked=asked)
  keep.get_or_query(P)
  keep.close()
  store, _ = _store(tmp_path, script, on_truncated="retry", asked=asked)
  got = store.get_or_query(P)  # a failed re-ask is not an error ...
  assert (got[1].text, got[1].usable) == (FRAGMENT, False)  # ... the row stays
  assert store.missing(P) == {}
  store.get_or_query(P)
  store.close()
  store, _ = _store(tmp_path, script, on_truncated="retry", asked=asked)
  store.get_or_query(P)
  assert asked == {"a": 1, "b": 2, "c": 1}  # the "4" is never reached
  s = store.ledger.stats()
  assert (s.requests, s.calls, s.reasked, s.unusable, s.asked_after_stored,
          s.failed) == (4, 4, 1, 1, 0, int(isinstance(second, Exception)))
  outcome = "failed" if isinstance(second, Exception) else "still_unusable"
  assert _requests(store, P[1]) == [("stored", None), (outcome, "unusable")]


def test_retry_through_the_real_teacher_and_fault_server(tmp_path, fault_server):  # noqa: F811
  """keep stores the server's half answer; retry re-asks it once (the
  server sees the same max_tokens) and stores the whole one."""
  def store(policy):
    return anchors.AnchorStore(tmp_path, teacher_lib.make(teacher_lib.TeacherConfig(
        base_url=fault_server.base_url, model="m", api_key_env="",
        timeout_s=2.0, max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05,
        max_tokens=32, on_truncated=policy)))
  q = [prompts_lib.Prompt.from_text(f"question {i}", id=f"q{i}")
       for i in range(2)]
  fault_server.push("truncated")
  keep = store("keep")
  first = keep.get_or_query(q)
  assert sum(not a.usable for a in first) == 1
  assert keep.get_or_query(q) == first and fault_server.calls() == 2
  keep.close()
  retry = store("retry")
  got = retry.get_or_query(q)
  assert [a.text for a in got] == [fault_lib.answer_for(f"question {i}")
                                   for i in range(2)]
  assert fault_server.calls() == 3
  assert [r["max_tokens"] for r in fault_server.requests] == [32] * 3
  retry.get_or_query(q)
  assert fault_server.calls() == 3
  s = retry.ledger.stats()
  assert (s.calls, s.reasked, s.unusable, s.asked_after_stored) == (3, 1, 0, 0)


# ---------------------------------------------------------------- the ledger

def _reply(text, finish="stop"):
  return teacher_lib.Reply(
      text, finish, finish == "length", 1, 1, 0.1,
      (teacher_wire.Attempt(1, "ok", 200, prompt_tokens=1, completion_tokens=1),),
      False, "t")


REQUEST = teacher_lib.Request((("user", "q"),), "openai", "m", ())


def test_killed_reask_is_resent_once_and_counted(tmp_path):
  ledger = ledger_lib.Ledger(tmp_path)
  rid = ledger.begin("k", "p", "openai")
  assert ledger.store(rid, "k", "p", REQUEST, _reply(FRAGMENT, "length")) == (
      "stored")
  assert ledger.begin("k", "p", "openai") is None  # 'keep': never again
  assert ledger.reaskable(["k"]) == {"k"}
  ledger.begin("k", "p", "openai", reask_unusable=True)  # ... then kill -9
  rid3 = ledger.begin("k", "p", "openai", reask_unusable=True)
  assert ledger.store(rid3, "k", "p", REQUEST, _reply("whole")) == "replaced"
  assert ledger.begin("k", "p", "openai", reask_unusable=True) is None
  assert ledger.reaskable(["k"]) == set()
  s = ledger.stats()
  assert (s.requests, s.reasked, s.resent_after_kill, s.asked_after_stored,
          s.unusable) == (3, 1, 1, 0, 0)
  assert ledger.rows(["k"])["k"]["text"] == "whole"


def test_asked_after_stored_still_counts_real_repeats(tmp_path):
  """Only the one re-ask of an unusable answer is excused: an ask after a
  usable answer, or a second re-ask (written by hand: begin refuses it), is
  counted."""
  ledger = ledger_lib.Ledger(tmp_path)
  for key, text, finish in (("ok", "fine", "stop"), ("cut", FRAGMENT, "length")):
    ledger.store(ledger.begin(key, "p", "openai"), key, "p", REQUEST,
                 _reply(text, finish))
  rid = ledger.begin("cut", "p", "openai", reask_unusable=True)
  ledger.fail(rid, RuntimeError("x"))  # the one re-ask, finished
  assert ledger.begin("cut", "p", "openai", reask_unusable=True) is None
  assert ledger.stats().asked_after_stored == 0
  db = sqlite3.connect(ledger.path)
  with db:
    for key, prev in (("ok", "stored"), ("cut", "unusable")):
      db.execute("INSERT INTO requests (key, prompt_id, backend, pid, "
                 "started_at, outcome, prev_outcome) VALUES (?, 'p', 'openai',"
                 " 1, 0, 'failed', ?)", (key, prev))
  db.close()
  assert ledger.stats().asked_after_stored == 2


# ---------------------------------------------------------------- SFT and PU-RL

def _batch(tok):
  source = data_lib.encode(P, tok, max_len=100)
  return data_lib.collate(source, [0, 1, 2], buckets=(64,))


def test_sft_batch_trains_on_no_token_of_a_truncated_anchor(tmp_path, char_tok):  # noqa: F811
  t = FakeTeacher({"b": [(FRAGMENT, "length")]})
  shared = shared_anchors.SharedAnchors(tmp_path, t, process_index=0)
  batch = _batch(char_tok)
  marked, texts = shared.for_batch(batch)
  assert texts == ["2", FRAGMENT, "42"]
  np.testing.assert_array_equal(marked.valid, [True, False, True])
  np.testing.assert_array_equal(batch.valid, [True, True, True])  # a copy
  out = sft.make_batch(char_tok, marked, texts, max_response_len=16,
                       buckets=(64,))
  # Response tokens = the answer's characters + <|im_end|>: "2" -> 2,
  # "42" -> 3; the truncated row -> none.
  assert out["loss_mask"].sum(axis=1).tolist() == [2, 0, 3]
  assert shared.usable(P) == [True, False, True]
  assert shared.summary() == (
      "1 anchors truncated by the teacher's max_tokens; not trained on")
  shared.close()


def test_summary_counts_each_prompt_once(tmp_path):
  t = FakeTeacher({"b": [(FRAGMENT, "length")], "c": [("", "stop")]})
  shared = shared_anchors.SharedAnchors(tmp_path, t, process_index=0)
  assert shared.summary() is None
  for _ in range(3):
    shared.anchors(P)
  assert shared.summary() == ("1 anchors truncated by the teacher's max_tokens;"
                              " 1 anchors empty; not trained on")
  assert t.asked == {"a": 1, "b": 1, "c": 1}
  shared.close()


def test_pu_rl_group_of_a_truncated_anchor_is_invalid(tmp_path, char_tok):  # noqa: F811
  """`rollout.collect` copies the batch's `valid` into `Group.valid`, which
  every recipe masks with: for_batch's batch makes the group invalid."""
  t = FakeTeacher({"b": [(FRAGMENT, "length")]})
  shared = shared_anchors.SharedAnchors(tmp_path, t, process_index=0)
  marked, texts = shared.for_batch(_batch(char_tok))
  k, tok = 2, char_tok
  ids = [tok.encode(s) + [tok.stop_ids[0]] for s in ("2", "5")]
  width = max(map(len, ids))
  tokens = np.full((3, k, width), tok.pad_id, np.int32)
  for j, c in enumerate(ids):
    tokens[:, j, :len(c)] = c
  lengths = np.tile(np.array([len(c) for c in ids], np.int32), (3, 1))

  def sampler(params, prompt_tokens, prompt_mask, key, index):
    del params, prompt_tokens, prompt_mask, key, index
    zeros = np.zeros(tokens.shape, np.float32)
    return sampling_lib.Candidates(
        tokens=tokens, lengths=lengths, finished=np.ones((3, k), bool),
        logps=zeros, sample_logps=zeros,
        mask=np.arange(width)[None, None] < lengths[..., None])
  group = rollout.collect(
      None, None, None, tok, marked, texts, jax.random.PRNGKey(0), k=k,
      sampling=sampling_lib.SamplingParams(max_new_tokens=8),
      ranking_params=rollout.RankingParams(scheme="similarity"),
      max_anchor_len=16, sampler=sampler, scorers=object())
  np.testing.assert_array_equal(group.valid, [True, False, True])
  shared.close()


class _NoTeacher:
  label = "never"

  def request(self, prompt):
    raise AssertionError("process 1 must not reach the teacher")


def test_other_processes_get_the_texts_and_the_marks(tmp_path, monkeypatch,
                                                     char_tok):  # noqa: F811
  """Process 1 (faked) asks nothing and reads what process 0 broadcast:
  lengths and codes (0 usable, 1 truncated, 2 empty) in one i32[2n], then
  the UTF-8 bytes."""
  from jax.experimental import multihost_utils
  texts = ["2", FRAGMENT, ""]
  blob = "".join(texts).encode()
  sent = [np.asarray([1, len(FRAGMENT), 0, 0, 1, 2], np.int32),
          np.frombuffer(blob, np.uint8)]
  calls = []

  def broadcast(x):
    calls.append(np.shape(x))
    return sent[len(calls) - 1]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", broadcast)
  shared = shared_anchors.SharedAnchors(tmp_path, _NoTeacher())
  marked, got = shared.for_batch(_batch(char_tok))
  assert got == texts and calls == [(6,), (len(blob),)]
  np.testing.assert_array_equal(marked.valid, [True, False, False])
  assert shared.summary() == ("1 anchors truncated by the teacher's max_tokens;"
                              " 1 anchors empty; not trained on")
  shared.close()


def test_sft_run_trains_on_no_truncated_anchor_and_says_so_once(
    tmp_path, monkeypatch, capsys, jit_cache):  # noqa: F811
  """A tiny 2-step SFT run whose teacher cuts every answer: no response
  token is trained on (the NLL's `tokens` and the gradient are 0 at every
  step), and the stage says so once, counting all SMALL_TRAIN prompts
  (the anchors are prefetched)."""
  del jit_cache
  from purld_jax import metrics as metrics_lib
  cfg = tiny_config(**{"sft.steps": 2, "data.prefetch_anchors": True})

  class AllCut(FakeTeacher):
    def ask(self, prompt, on_attempt=None):
      self.script[prompt.id] = [(FRAGMENT, "length")]
      return super().ask(prompt, on_attempt)
  monkeypatch.setattr(teacher_lib, "make", lambda _: AllCut({}))
  sft.run(cfg, str(tmp_path))
  err = capsys.readouterr().err
  line = (f"[sft] {SMALL_TRAIN} anchors truncated by the teacher's max_tokens;"
          " not trained on")
  assert err.count(line) == 1 and err.count("anchors truncated") == 1
  records = metrics_lib.read(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2]
  assert [(r["tokens"], r["grad_norm"]) for r in records] == [(0.0, 0.0)] * 2
  s = ledger_lib.Ledger(tmp_path, create=False).stats()
  assert (s.anchors, s.unusable, s.calls) == (SMALL_TRAIN, SMALL_TRAIN,
                                              SMALL_TRAIN)
