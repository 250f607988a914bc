"""Prompt files: the two record forms, defaults, and errors naming file:line and field."""

import json

import pytest

from purld_jax import prompts


def _write(tmp_path, lines):
  path = tmp_path / "p.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def test_both_forms_ids_and_answers(tmp_path):
  path = _write(tmp_path, [
      json.dumps({"prompt": "2+2?", "answer": 4}),
      "",  # blank lines are skipped but still count for line numbers
      json.dumps({"id": "chat", "messages": [
          {"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Hi"}], "source": "ignored metadata"}),
      json.dumps({"id": 7, "prompt": "x", "answer": "seven"}),
  ])
  got = prompts.read_jsonl(path)
  assert got == [
      prompts.Prompt(id="1", messages=(("user", "2+2?"),), answer="4"),
      prompts.Prompt(id="chat", messages=(("system", "Be brief."), ("user", "Hi"))),
      prompts.Prompt(id="7", messages=(("user", "x"),), answer="seven"),
  ]
  assert len(set(got)) == 3  # hashable
  assert got[1].as_dicts() == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi"}]


def test_from_text():
  p = prompts.Prompt.from_text("hello", id="a", answer="b")
  assert p == prompts.Prompt("a", (("user", "hello"),), "b")


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "x"', "bad JSON"),
    ('["not", "an", "object"]', "JSON object"),
    ('{"answer": "4"}', "'messages' or 'prompt'"),
    ('{"prompt": "x", "messages": [{"role": "user", "content": "y"}]}', "'messages'"),
    ('{"prompt": 3}', "'prompt'"),
    ('{"messages": []}', "'messages'"),
    ('{"messages": ["hi"]}', "'messages[0]'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "'messages[0].role'"),
    ('{"messages": [{"role": "user", "content": 5}]}', "'messages[0].content'"),
    ('{"messages": [{"role": "user", "content": "x", "name": "n"}]}', "'messages[0]'"),
    ('{"messages": [{"role": "user", "content": "x"}, '
     '{"role": "assistant", "content": "y"}]}', "'messages[1].role'"),
    ('{"prompt": "x", "answer": [1]}', "'answer'"),
    ('{"prompt": "x", "id": true}', "'id'"),
])
def test_bad_line_names_file_line_and_field(tmp_path, line, field):
  path = _write(tmp_path, [json.dumps({"prompt": "fine"}), line])
  with pytest.raises(prompts.PromptFileError) as e:
    prompts.read_jsonl(path)
  assert f"{path}:2" in str(e.value)
  assert field in str(e.value)


def test_duplicate_id(tmp_path):
  path = _write(tmp_path, ['{"id": "a", "prompt": "x"}', '{"id": "a", "prompt": "y"}'])
  with pytest.raises(prompts.PromptFileError, match=r":2: field 'id': duplicate id 'a' "
                     r"\(first at line 1\)"):
    prompts.read_jsonl(path)


def test_missing_file(tmp_path):
  with pytest.raises(prompts.PromptFileError, match="no such prompt file"):
    prompts.read_jsonl(tmp_path / "nope.jsonl")
