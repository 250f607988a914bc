"""The `recorded` teacher backend and the `dataset` backend's worked solutions."""

import json

import pytest

from purld_jax import ledger as ledger_lib
from purld_jax import prompts as prompts_lib
from purld_jax import shared_anchors
from purld_jax import teacher as teacher_lib
from purld_jax import teacher_wire


def _file(tmp_path, rows, side=None):
  path = tmp_path / "a.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows),
                  encoding="utf-8")
  if side is not None:
    (tmp_path / "a.json").write_text(json.dumps(side), encoding="utf-8")
  return str(path)


def _teacher(path):
  return teacher_lib.make(teacher_lib.TeacherConfig(
      backend="recorded", recorded_path=path, api_key_env=""))


ROWS = [dict(prompt="What is 2 + 3?", anchor="2 + 3 = 5.",
             finish_reason="stop"),
        dict(prompt="What is 9 - 4?", anchor="9 - 4 =", finish_reason="length")]


def test_replays_the_recorded_answer_and_names_the_teacher(tmp_path):
  t = _teacher(_file(tmp_path, ROWS, side={"teacher": {"file": "q.gguf"}}))
  r = t.ask(prompts_lib.Prompt.from_text("What is 2 + 3?", id="p0"))
  assert (r.text, r.truncated, r.simulated) == ("2 + 3 = 5.", False, False)
  assert t.label == "recorded q.gguf (a.jsonl)" and r.teacher == t.label
  assert t.ask(prompts_lib.Prompt.from_text("What is 9 - 4?",
                                            id="p1")).truncated


def test_a_prompt_never_recorded_is_a_fatal_error_naming_the_file(tmp_path):
  path = _file(tmp_path, ROWS)
  with pytest.raises(teacher_wire.TeacherError, match="'p9' is not in") as e:
    _teacher(path).ask(prompts_lib.Prompt.from_text("What is 1 + 1?",
                                                    id="p9"))
  assert e.value.fatal and path in str(e.value)


def test_malformed_or_missing_file_names_it(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "x", "anchor": "y", "finish_reason": "stop"}\n'
                 '{"prompt": "z"}\n', encoding="utf-8")
  with pytest.raises(teacher_lib.ConfigError, match=r"bad.jsonl:2"):
    _teacher(str(bad))
  with pytest.raises(teacher_lib.ConfigError, match="no such file"):
    _teacher(str(tmp_path / "none.jsonl"))


def test_truncated_recording_is_stored_but_never_an_anchor(tmp_path):
  t = _teacher(_file(tmp_path, ROWS))
  ps = [prompts_lib.Prompt.from_text(r["prompt"], id=f"p{i}")
        for i, r in enumerate(ROWS)]
  store = shared_anchors.SharedAnchors(str(tmp_path / "w"), t)
  try:
    assert store.usable(ps) == [True, False]
  finally:
    store.close()


def test_a_rerecorded_anchor_is_a_new_request(tmp_path):
  p = prompts_lib.Prompt.from_text("What is 2 + 3?", id="p0")
  a = _teacher(_file(tmp_path, ROWS)).request(p)
  rows = [dict(ROWS[0], anchor="5")] + ROWS[1:]
  b = _teacher(_file(tmp_path, rows)).request(p)
  assert ledger_lib.ledger_key(a) != ledger_lib.ledger_key(b)


def test_dataset_backend_answers_with_the_worked_solution(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps(dict(id="a", prompt="2 + 3?", answer="5",
                                  solution="2 + 3 = 5.")) + "\n"
                  + json.dumps(dict(id="b", prompt="1 + 1?", answer="2"))
                  + "\n", encoding="utf-8")
  ps = prompts_lib.read_jsonl(path)
  t = teacher_lib.make(teacher_lib.TeacherConfig(backend="dataset",
                                                 api_key_env=""))
  assert [t.ask(p).text for p in ps] == ["2 + 3 = 5.", "2"]
  with pytest.raises(prompts_lib.PromptFileError, match="p.jsonl:1"):
    path.write_text(json.dumps(dict(prompt="x", solution=[1])) + "\n",
                    encoding="utf-8")
    prompts_lib.read_jsonl(path)
