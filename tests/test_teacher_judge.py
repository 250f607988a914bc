"""Teacher-as-judge (RLAIF baseline): reply parsing, the judgement ledger
(never paid twice, resume pays only the missing), the simulated dataset judge,
and a tiny PU-RL run with ranking.scheme = teacher_judge."""

import json
import re
import sqlite3

import numpy as np
import pytest

from purld_jax import evaluate
from purld_jax import ledger as ledger_lib
from purld_jax import prompts as prompts_lib
from purld_jax import ranking
from purld_jax import self_scoring
from purld_jax import teacher as teacher_lib
from purld_jax import teacher_judge
from purld_jax import teacher_wire
from tests import train_fixtures
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)


@pytest.mark.parametrize("reply, want", [
    ("Score: 7", 7.0),
    ("**Score**: 8/10", 8.0),            # rule 1 wins over rule 2
    ("score of 2, since it is wrong", 2.0),
    ("Rating = 3.5", 3.5),
    ("7/10", 7.0),
    ("I'd rate it 9 out of 10.", 9.0),
    ("6", 6.0),
    ("  10.\n", 10.0),
    ("On a scale of 1 to 10: 4", 4.0),   # the scale is not a score
    ("I cannot judge this.", None),
    ("Between 3 and 4.", None),          # ambiguous
    ("Score: 11", None),                 # out of [1, 10]
    ("Score: 0", None),
    ("", None),
])
def test_parse_score(reply, want):
  assert teacher_judge.parse_score(reply) == want


def test_group_scores_give_unparseable_the_group_minimum():
  # group 0: 4 and 8 parse, "??" -> min 4; group 1: nothing parses -> 1.
  s, bad = teacher_judge.group_scores([["Score: 4", "??", "Score: 8"],
                                       ["no", "none", "x"]])
  np.testing.assert_array_equal(s, [[4, 4, 8], [1, 1, 1]])
  assert bad == 4


class FakeTeacher:
  """An OpenAI-like teacher that counts asks. Replies "Score: n" with n the
  candidate's length (1..10), or the scripted `replies` in order; raises a
  fatal TeacherError on ask number `fail_at` (1-based)."""

  simulated = False
  label = "fake"
  max_concurrency = 1  # one worker: items run in order

  def __init__(self, *, replies=(), fail_at=None, max_retries=2):
    self.cfg = teacher_lib.TeacherConfig(max_retries=max_retries)
    self.asked, self.replies, self.fail_at = [], list(replies), fail_at

  def request(self, prompt):
    return teacher_lib.Request(messages=prompt.messages, backend="fake",
                               model="m", params=())

  def prepare(self):
    pass

  def ask(self, prompt, on_attempt=None):
    if self.fail_at is not None and len(self.asked) + 1 == self.fail_at:
      raise teacher_wire.TeacherError("server gone", kind="connection",
                                      fatal=True)
    text = prompt.messages[-1][1]
    self.asked.append(text)
    if self.replies:
      reply = self.replies.pop(0)
    else:
      cand = re.search(r"Candidate answer:\n(.*)\n\nRate", text, re.S).group(1)
      reply = f"Score: {min(10, max(1, len(cand)))}"
    a = teacher_wire.Attempt(1, "ok", 200)
    if on_attempt:
      on_attempt(a)
    return teacher_lib.Reply(reply, "stop", False, None, None, 0.0, (a,),
                             False, self.label)


PROMPTS = [prompts_lib.Prompt.from_text("q one", id="p0", answer="12"),
           prompts_lib.Prompt.from_text("q two", id="p1", answer="3")]
TEXTS = [["a", "abc", "ab"], ["abcd", "a", "abcdef"]]  # lengths = scores


def _judge(workdir, teacher):
  return teacher_judge.TeacherJudge(workdir, teacher, process_index=0)


def test_second_run_pays_no_judge_call(tmp_path):
  fake = FakeTeacher()
  judge = _judge(tmp_path, fake)
  s, s_a = judge(PROMPTS, TEXTS)
  np.testing.assert_array_equal(s, [[1, 3, 2], [4, 1, 6]])
  np.testing.assert_array_equal(s_a, [3, 6])  # the anchor: the group's max
  assert len(fake.asked) == 6 and judge.calls() == 6.0  # B x K
  assert "q one" in fake.asked[0] and "Candidate answer:\na\n" in fake.asked[0]
  judge.close()
  again = FakeTeacher()
  judge = _judge(tmp_path, again)  # a new process on the same workdir
  s2, _ = judge(PROMPTS, TEXTS)
  np.testing.assert_array_equal(s2, s)
  assert again.asked == [] and judge.calls() == 6.0
  judge.close()


def test_resume_after_interrupted_batch_pays_only_the_missing(tmp_path):
  broken = FakeTeacher(fail_at=5)  # 4 judgements stored, then the server dies
  judge = _judge(tmp_path, broken)
  # The 5th ask fails fatally and the 6th is never sent: 2 of 6 unanswered.
  with pytest.raises(ledger_lib.AnchorError,
                     match=r"teacher judge .*: 2 prompt\(s\) of 6 unanswered"
                     r".*server gone"):
    judge(PROMPTS, TEXTS)
  judge.close()
  assert len(broken.asked) == 4
  healthy = FakeTeacher()
  judge = _judge(tmp_path, healthy)
  s, _ = judge(PROMPTS, TEXTS)
  assert len(healthy.asked) == 2  # 6 - 4
  np.testing.assert_array_equal(s, [[1, 3, 2], [4, 1, 6]])
  st = judge.store.ledger.stats()
  assert (st.anchors, st.failed, st.asked_after_stored) == (6, 1, 0)
  judge.close()


def test_unparseable_is_reasked_then_stored_and_given_group_min(tmp_path):
  # K = 2: candidate 0 answers "no idea" then "Score: 7" (re-asked once);
  # candidate 1 never parses (1 + max_retries = 2 asks) -> group min 7.
  fake = FakeTeacher(replies=["no idea", "Score: 7", "hmm", "hmm?"],
                     max_retries=1)
  judge = _judge(tmp_path, fake)
  s, _ = judge(PROMPTS[:1], [["x", "y"]])
  np.testing.assert_array_equal(s, [[7, 7]])
  assert len(fake.asked) == 4 and judge.last_unparseable == 1
  assert teacher_judge.metrics(judge) == {"judge_calls": 2.0,
                                          "judge_unparseable": 1.0}
  with sqlite3.connect(judge.store.ledger.path) as db:  # attempts numbered
    assert sorted(db.execute("SELECT n FROM attempts")) == [(1,), (1,), (2,),
                                                           (2,)]
  judge.close()
  again = FakeTeacher()
  judge = _judge(tmp_path, again)  # the stored reply is reused, not re-asked
  s2, _ = judge(PROMPTS[:1], [["x", "y"]])
  np.testing.assert_array_equal(s2, s)
  assert again.asked == [] and judge.last_unparseable == 1
  judge.close()


def test_simulated_dataset_judge_is_the_oracle(tmp_path):
  teacher = teacher_lib.make(teacher_lib.TeacherConfig(backend="dataset"))
  judge = _judge(tmp_path, teacher)
  texts = [["The answer is 12", "12 + 1 = 13", "", "it is 12."],
           ["3", "three", "x = 3.0", "-3"]]
  s, s_a = judge(PROMPTS, texts, valid=[True, True])
  # last number == reference answer ("12", "3") -> 10, else 1
  np.testing.assert_array_equal(s, [[10, 1, 1, 10], [10, 1, 1, 1]])
  oracle = ranking.oracle(texts, evaluate.batch_verifier(["12", "3"]))
  np.testing.assert_array_equal(s, 1 + 9 * oracle)
  np.testing.assert_array_equal(s_a, [10, 10])
  assert judge.calls() == 8.0
  with sqlite3.connect(judge.store.ledger.path) as db:
    assert db.execute("SELECT min(simulated) FROM anchors").fetchone() == (1,)
  judge.close()


def test_filler_rows_are_not_judged(tmp_path):
  fake = FakeTeacher()
  judge = _judge(tmp_path, fake)
  s, s_a = judge(PROMPTS, TEXTS, valid=[True, False])
  assert len(fake.asked) == 3
  np.testing.assert_array_equal(s[1], [1, 1, 1])
  judge.close()


def test_self_ranking_refuses_the_teacher_scheme():
  with pytest.raises(ValueError, match="scored by the teacher"):
    self_scoring.score_group(None, None, [], [], [[[1]]],
                             scheme="teacher_judge")


def test_tiny_pu_rl_run_logs_judge_calls(tmp_path, jit_cache):  # noqa: F811
  from purld_jax.train import pu_rl
  steps, b, k = 2, 2, 2
  c = train_fixtures.tiny_config(**{
      "recipe": "dpo", "rl.steps": steps, "rl.batch_size": b,
      "sampling.num_candidates": k, "sft.steps": 1,
      "ranking.scheme": "teacher_judge", "log.tensorboard": False,
      "ckpt.async_save": False})
  pu_rl.run(c, str(tmp_path))
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [r for r in map(json.loads, f) if r["stage"] == "dpo"]
  assert [r["step"] for r in rows] == [1, 2]
  # judge_calls is cumulative: B x K per step (distinct candidates: the tiny
  # model samples 8 random tokens); the dataset teacher's anchors cost 0.
  assert [r["judge_calls"] for r in rows] == [b * k, steps * b * k]
  assert all(r["teacher_calls"] == 0.0 and r["judge_unparseable"] == 0.0
             for r in rows)
  assert (tmp_path / teacher_judge.FILENAME).is_file()


def _judge_url_config(**kw):
  return train_fixtures.tiny_config(**{
      "recipe": "dpo", "ranking.scheme": "teacher_judge", **kw})


def test_a_recorded_teacher_needs_a_judge_url():
  from purld_jax import config_check  # pylint: disable=g-import-not-at-top
  c = _judge_url_config(**{"teacher.backend": "recorded"})
  assert any("set ranking.judge_url" in e
             for e in teacher_judge.config_problems(c))
  c.ranking.judge_url = "http://127.0.0.1:9/v1"
  assert not teacher_judge.config_problems(c)
  cfg = teacher_judge.judge_config(c)
  assert (cfg.backend, cfg.base_url, cfg.api_key_env, cfg.recorded_path) == (
      "openai", "http://127.0.0.1:9/v1", "", "")
  assert cfg.max_tokens == c.teacher.max_tokens  # the teacher's params
  # A key typed where its variable's NAME belongs: refused, never echoed.
  c.ranking.judge_api_key_env = "sk-" + "a1B2" * 8
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(c)
  assert "ranking.judge_api_key_env: not the NAME" in str(e.value)
  assert "a1B2" not in str(e.value)


def test_judge_url_judges_while_the_anchors_stay_the_teachers(
    tmp_path, monkeypatch, jit_cache):  # noqa: F811
  """Anchors from the dataset teacher, judgements from the endpoint at
  ranking.judge_url: B x K requests a step reach it, each the judge
  template around one candidate, none asks for an anchor."""
  from purld_jax.train import pu_rl  # pylint: disable=g-import-not-at-top
  from tests import fault_server  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(fault_server, "answer_for",
                      lambda text: f"Score: {len(text) % 10 + 1}")
  steps, b, k = 2, 2, 2
  with fault_server.FaultServer() as server:
    c = _judge_url_config(**{
        "rl.steps": steps, "rl.batch_size": b, "sampling.num_candidates": k,
        "sft.steps": 1, "log.tensorboard": False, "ckpt.async_save": False,
        "ranking.judge_url": server.base_url, "ranking.judge_model": "j"})
    pu_rl.run(c, str(tmp_path))
    asked = [fault_server.text_of(r["messages"][-1]["content"])
             for r in server.requests]
  assert len(asked) == steps * b * k
  assert all("Candidate answer:" in t for t in asked)
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [r for r in map(json.loads, f) if r["stage"] == "dpo"]
  assert [r["judge_calls"] for r in rows] == [b * k, steps * b * k]
  assert all(r["teacher_calls"] == 0.0 for r in rows)  # dataset anchors
