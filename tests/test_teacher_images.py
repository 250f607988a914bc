"""Prompts with images at the teacher: content parts on the wire, ledger keys
that cover the image bytes (text-only keys unchanged), backends that refuse."""

import base64
import hashlib
import io
import json
import logging
import sqlite3

import pytest

from purld_jax import anchors
from purld_jax import ledger
from purld_jax import prompts
from purld_jax import recorded_teacher
from purld_jax import teacher
from purld_jax import teacher_judge
from purld_jax import teacher_wire
from purld_jax import winrate
from tests.fixtures_teacher import fault_server  # noqa: F401  (fixture)


def _image(colour, fmt="PNG"):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  Image.new("RGB", (5, 4), colour).save(buf, format=fmt)
  return buf.getvalue()


RED, BLUE, JPEG = _image("red"), _image("blue"), _image("green", "JPEG")


def _cfg(base_url="http://127.0.0.1:9/v1", **kw):
  kw = dict(dict(model="m", api_key_env="", timeout_s=2.0, max_retries=2,
                 backoff_base_s=0.01, backoff_max_s=0.05), **kw)
  return teacher.TeacherConfig(base_url=base_url, **kw)


def _uri(data, mime):
  return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------- the wire

def test_openai_messages_parts_on_the_last_message_only():
  messages = (("system", "s"), ("user", "first"), ("assistant", "a"),
              ("user", "Which is red?"))
  assert teacher_wire.openai_messages(messages) == [
      {"role": r, "content": c} for r, c in messages]  # text-only: as before
  got = teacher_wire.openai_messages(messages, (RED, JPEG))
  assert got[:3] == [{"role": r, "content": c} for r, c in messages[:3]]
  assert got[3] == {"role": "user", "content": [
      {"type": "image_url", "image_url": {"url": _uri(RED, "image/png")}},
      {"type": "image_url", "image_url": {"url": _uri(JPEG, "image/jpeg")}},
      {"type": "text", "text": "Which is red?"}]}


def test_server_receives_image_parts_and_no_key_is_logged(
    fault_server, caplog, monkeypatch):
  secret = "sk-test-never-logged-0123456789"
  t = teacher.make(_cfg(fault_server.base_url, api_key_env="IMG_TEACHER_KEY",
                        system_prompt="Be brief."),
                   environ={"IMG_TEACHER_KEY": secret})
  prompt = prompts.Prompt.from_text("How many shapes?", id="p",
                                    images=(RED, BLUE))
  fault_server.push(("status", 500))  # one retry, logged
  with caplog.at_level(logging.DEBUG):
    reply = t.ask(prompt)
  assert reply.text == "ANSWER: How many shapes?"
  assert [a.outcome for a in reply.attempts] == ["server_error", "ok"]
  for sent in fault_server.requests:  # both attempts sent the same parts
    system, user = sent["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user["role"] == "user"
    urls = [p["image_url"]["url"] for p in user["content"][:2]]
    assert [base64.b64decode(u.split(",", 1)[1]) for u in urls] == [RED, BLUE]
    assert all(u.startswith("data:image/png;base64,") for u in urls)
    assert user["content"][2] == {"type": "text", "text": "How many shapes?"}
    assert sent["authorization"] == f"Bearer {secret}"  # the header only
  assert "retrying" in caplog.text and secret not in caplog.text
  assert secret not in repr(t.request(prompt))


def test_text_only_prompt_still_plain_string(fault_server):
  t = teacher.make(_cfg(fault_server.base_url))
  t.ask(prompts.Prompt.from_text("plain", id="p"))
  assert fault_server.requests[0]["messages"] == [{"role": "user",
                                                   "content": "plain"}]


# ---------------------------------------------------------------- ledger keys

# Computed with ledger.py as it was before images (commit 43d5734): a
# text-only request must keep its key, so existing ledgers stay valid.
OLD_KEY = "f68b7723089b1a688428ab8f70bb9d041fa271c68f1b5daaa0021a85ad132af3"


def test_text_only_key_unchanged():
  request = teacher.Request(
      messages=(("system", "Be brief."), ("user", "What is 2+2?")),
      backend="openai", model="m",
      params=(("max_tokens", 64), ("temperature", 0.0)))
  want = ('{"backend":"openai","messages":[["system","Be brief."],["user",'
          '"What is 2+2?"]],"model":"m","params":{"max_tokens":64,'
          '"temperature":0.0},"v":1}')
  assert ledger.ledger_key(request) == hashlib.sha256(want.encode()).hexdigest()
  assert ledger.ledger_key(request) == OLD_KEY
  # The same through the teacher, from a prompt without images.
  t = teacher.make(_cfg(system_prompt="Be brief.", max_tokens=64))
  assert ledger.ledger_key(t.request(
      prompts.Prompt.from_text("What is 2+2?", id="x"))) == OLD_KEY


@pytest.mark.parametrize("backend", ["openai", "dataset"])
def test_key_covers_image_bytes(backend):
  t = teacher.make(_cfg(backend=backend))
  key = lambda *images: ledger.ledger_key(t.request(prompts.Prompt.from_text(
      "How many?", id="any", answer="3", images=images)))
  red_again = bytes(bytearray(RED))  # equal bytes, another object
  assert key(RED) == key(red_again)
  assert len({key(), key(RED), key(BLUE), key(RED, BLUE), key(BLUE, RED)}) == 5
  request = t.request(prompts.Prompt.from_text("How many?", id="a",
                                               images=(RED, BLUE)))
  canonical = json.loads(ledger.canonical_json(request))
  assert canonical["images"] == [hashlib.sha256(x).hexdigest()
                                 for x in (RED, BLUE)]


def test_anchor_store_pays_once_per_scene(fault_server, tmp_path):
  t = teacher.make(_cfg(fault_server.base_url))
  asked = [prompts.Prompt.from_text("How many?", id=str(i), images=images)
           for i, images in enumerate([(RED,), (BLUE,), (RED,), ()])]
  store = anchors.AnchorStore(tmp_path, t)
  report = store.fetch(asked)
  assert (report.distinct, report.stored, fault_server.calls()) == (3, 3, 3)
  again = store.fetch(asked)
  assert (again.stored, fault_server.calls()) == (0, 3)
  got = store.lookup(asked)
  assert got[0].key == got[2].key != got[1].key != got[3].key
  store.close()
  db = sqlite3.connect(tmp_path / ledger.FILENAME)
  params = {k: json.loads(p) for k, p in db.execute(
      "SELECT key, params FROM anchors")}
  assert params[got[1].key]["images"] == [hashlib.sha256(BLUE).hexdigest()]
  assert "images" not in params[got[3].key]


# ---------------------------------------------------------------- backends

def test_dataset_teacher_answers_the_reference_with_images():
  t = teacher.make(_cfg(backend="dataset"))
  reply = t.ask(prompts.Prompt.from_text("How many?", id="a", answer="3",
                                         images=(RED,)))
  assert reply.text == "3" and reply.simulated


def test_recorded_teacher_refuses_images(tmp_path):
  path = tmp_path / "rec.jsonl"
  path.write_text(json.dumps({"prompt": "How many?", "anchor": "3",
                              "finish_reason": "stop"}) + "\n")
  t = teacher.make(_cfg(backend="recorded", recorded_path=str(path)))
  assert t.ask(prompts.Prompt.from_text("How many?", id="a")).text == "3"
  with pytest.raises(teacher_wire.TeacherError, match="has images; the recorded "
                     "backend matches prompts by text alone") as e:
    t.ask(prompts.Prompt.from_text("How many?", id="b", images=(RED,)))
  assert e.value.fatal and e.value.kind == "images_unsupported"
  assert isinstance(t, recorded_teacher.RecordedTeacher)


def test_callable_judge_refuses_images():
  judge = winrate.CallableJudge(lambda messages: "Verdict: A")
  assert judge.ask(prompts.Prompt.from_text("q", id="a")).text == "Verdict: A"
  with pytest.raises(teacher_wire.TeacherError, match="callable judge takes text"):
    judge.ask(prompts.Prompt.from_text("q", id="b", images=(RED,)))


def test_teacher_judge_shows_the_images(fault_server):
  judge = teacher_judge.JudgeTeacher(teacher.make(_cfg(fault_server.base_url)))
  [[item]] = teacher_judge.items(
      [prompts.Prompt.from_text("How many?", id="p", answer="2",
                                images=(BLUE,))], [["2"]])
  assert item.images == (BLUE,)
  judge.ask(item)
  content = fault_server.requests[0]["messages"][-1]["content"]
  assert content[0]["image_url"]["url"] == _uri(BLUE, "image/png")
  assert content[1]["type"] == "text" and "How many?" in content[1]["text"]


def test_winrate_judge_sees_the_images(fault_server, tmp_path):
  store = anchors.AnchorStore(tmp_path, teacher.make(_cfg(fault_server.base_url)))
  prompt = prompts.Prompt.from_text("Describe it.", id="p", images=(RED,))
  winrate.judge_pairs(store, [prompt], ["a red square"], ["a blue square"])
  store.close()
  assert fault_server.calls() == 2  # both orders
  for sent in fault_server.requests:
    content = sent["messages"][-1]["content"]
    assert content[0]["image_url"]["url"] == _uri(RED, "image/png")
    assert "Describe it." in content[-1]["text"]
