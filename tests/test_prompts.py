"""Prompt files: the two record forms, defaults, and errors naming file:line and field."""

import base64
import io
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


# ------------------------------------------------------------------ images


def _png(colour, size=(4, 3), fmt="PNG"):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, format=fmt)
  return buf.getvalue()


def test_images_paths_and_data_uris(tmp_path):
  red, blue = _png("red"), _png("blue", fmt="JPEG")
  (tmp_path / "img").mkdir()
  (tmp_path / "img" / "red.png").write_bytes(red)
  absolute = tmp_path / "blue.jpg"
  absolute.write_bytes(blue)
  uri = "data:image/png;base64," + base64.b64encode(red).decode()
  path = _write(tmp_path, [
      json.dumps({"prompt": "What colour?", "images": ["img/red.png"]}),
      json.dumps({"messages": [{"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"},
                               {"role": "user", "content": "Compare."}],
                  "images": [str(absolute), uri]}),
      json.dumps({"prompt": "text only", "images": []}),
  ])
  first, second, third = prompts.read_jsonl(path)
  assert first.images == (red,)
  assert second.images == (blue, red)  # in order, the file's bytes as read
  assert third == prompts.Prompt(id="3", messages=(("user", "text only"),))
  assert len({first, second, third}) == 3  # still hashable
  assert "images" not in repr(first)  # no bytes in logs
  # Relative to the file's folder, not the working directory.
  assert first == prompts.parse_lines(
      [json.dumps({"prompt": "What colour?", "images": ["img/red.png"]})],
      name="x", base_dir=str(tmp_path))[0]
  # Same text, another image: another prompt.
  assert first != prompts.Prompt.from_text("What colour?", id="1",
                                           images=(_png("green"),))


def test_image_limit(tmp_path):
  (tmp_path / "a.png").write_bytes(_png("red"))
  ok = _write(tmp_path, [json.dumps({"prompt": "x", "images": ["a.png"] * 8})])
  assert len(prompts.read_jsonl(ok)[0].images) == 8
  too_many = _write(tmp_path, [json.dumps({"prompt": "x", "images": ["a.png"] * 9})])
  with pytest.raises(prompts.PromptFileError, match=r":1: field 'images': 9 images; "
                     "at most 8"):
    prompts.read_jsonl(too_many)


@pytest.mark.parametrize("images, field, why", [
    ("a.png", "'images'", "must be a list"),
    ({"x": 1}, "'images'", "must be a list"),
    (["a.png", "missing.png"], "'images[1]'", "no such image file"),
    (["a.png", 3], "'images[1]'", "non-empty string"),
    (["data:image/png;base64,***notbase64"], "'images[0]'", "bad base64"),
    (["data:text/plain;base64,aGVsbG8="], "'images[0]'", "data:image/"),
    (["data:image/png;base64,aGVsbG8="], "'images[0]'", "not an image PIL can open"),
    (["notes.txt"], "'images[0]'", "not an image PIL can open"),
    (["cut.png"], "'images[0]'", "not an image PIL can open"),
    (["a.bmp"], "'images[0]'", "BMP is not accepted"),
])
def test_bad_images_name_file_line_and_entry(tmp_path, images, field, why):
  (tmp_path / "a.png").write_bytes(_png("red"))
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "cut.png").write_bytes(_png("red", size=(64, 64))[:60])  # truncated
  (tmp_path / "a.bmp").write_bytes(_png("red", fmt="BMP"))
  path = _write(tmp_path, [json.dumps({"prompt": "fine"}),
                           json.dumps({"prompt": "x", "images": images})])
  with pytest.raises(prompts.PromptFileError) as e:
    prompts.read_jsonl(path)
  message = str(e.value)
  assert message.startswith(f"{path}:2: field {field}: ")
  assert why in message and "Traceback" not in message
