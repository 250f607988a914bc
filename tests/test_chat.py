"""purld_jax.chat: the conversation loop, one compile per bucket, errors."""

import dataclasses
import io
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from purld_jax import chat
from purld_jax import models
from tests.core_fixtures import tiny_model, tiny_tok  # noqa: F401
from tests.train_fixtures import REPO, subprocess_env


class FakeModel:
  """`generate` for chat_loop: records the messages, answers "answer N"."""

  def __init__(self):
    self.calls = []

  def __call__(self, messages):
    self.calls.append([dict(m) for m in messages])
    return f"answer {len(self.calls)}"


def _user(text):
  return {"role": "user", "content": text}


def _assistant(text):
  return {"role": "assistant", "content": text}


def test_two_piped_lines_are_answered_with_the_history_kept():
  gen = FakeModel()
  lines = io.StringIO("What is 2 + 3?\n\nAnd times 4?\n")  # a blank line too
  turns = chat.chat_loop(lines, gen, system="Be brief.", err=io.StringIO())
  system = {"role": "system", "content": "Be brief."}
  assert gen.calls == [
      [system, _user("What is 2 + 3?")],
      [system, _user("What is 2 + 3?"), _assistant("answer 1"),
       _user("And times 4?")]]
  assert turns == [_user("What is 2 + 3?"), _assistant("answer 1"),
                   _user("And times 4?"), _assistant("answer 2")]


def test_reset_clears_the_history_and_exit_stops():
  gen, err = FakeModel(), io.StringIO()
  chat.chat_loop(["a\n", "/reset\n", "b\n", "/exit\n", "c\n"], gen, err=err)
  assert gen.calls == [[_user("a")], [_user("b")]]  # "c" is never read
  assert "history cleared" in err.getvalue()


def test_the_oldest_exchanges_are_dropped_when_the_prompt_outgrows_the_limit():
  # A prompt's "tokens": the characters of its messages. Limit 12:
  #   aaaa -> 4; + xx + bbbb -> 10; + xx + cccc -> 16 > 12, so (aaaa, xx)
  #   goes: bbbb xx cccc -> 10. A 13-character message never fits: it is
  #   not sent and the history stays.
  gen, err = FakeModel(), io.StringIO()
  gen_xx = lambda m: (gen(m), "xx")[1]
  count = lambda msgs: sum(len(m["content"]) for m in msgs)
  turns = chat.chat_loop(["aaaa", "bbbb", "cccc", "z" * 13], gen_xx,
                         count=count, limit=12, err=err)
  assert gen.calls[2] == [_user("bbbb"), _assistant("xx"), _user("cccc")]
  assert len(gen.calls) == 3
  assert turns == [_user("bbbb"), _assistant("xx"), _user("cccc"),
                   _assistant("xx")]
  assert "dropped the oldest 1 exchange(s)" in err.getvalue()
  assert "message too long: 13 prompt tokens, at most 12" in err.getvalue()


def _never_stops(tok):
  """`tok` without stop ids: every answer has max_new_tokens tokens."""
  return dataclasses.replace(tok, stop_ids=())


def test_one_compile_per_bucket(tiny_model, tiny_tok):  # noqa: F811
  err = io.StringIO()
  dec = chat.Decoder(tiny_model, _never_stops(tiny_tok), max_new_tokens=3,
                     buckets=(16, 32), err=err)
  short = [_user("the cat sat")]
  longer = [_user("what is 2 + 3 ?")]
  longest = [_user("the cat sat on the mat and the dog sat on the mat .")]
  # <|im_start|> user ... <|im_end|> <|im_start|> assistant: 5 + the words.
  assert [dec.count(m) for m in (short, longer, longest)] == [8, 11, 19]
  for m in (short, longer):
    assert len(dec.reply(m).ids) == 3
  assert dict(dec.traces) == {("prefill", 16): 1, ("step", 16): 1}
  assert err.getvalue().count("compiling") == 1
  dec.reply(longest)
  assert dict(dec.traces) == {("prefill", 16): 1, ("step", 16): 1,
                              ("prefill", 32): 1, ("step", 32): 1}
  assert err.getvalue().count("compiling") == 2
  assert "prompts of 32 tokens" in err.getvalue()


def test_the_streamed_answer_is_greedy_under_the_full_forward(
    tiny_model, tiny_tok):  # noqa: F811
  tok = _never_stops(tiny_tok)
  dec = chat.Decoder(tiny_model, tok, max_new_tokens=5, buckets=(16,),
                     err=io.StringIO())
  messages = [_user("what is 2 + 3 ?")]
  out = io.StringIO()
  reply = dec.reply(messages, out=out)
  prompt = tok.encode_chat(messages)
  assert len(reply.ids) == 5 and reply.steps == 4
  logits = np.asarray(tiny_model(jnp.asarray([prompt + reply.ids])))[0]
  np.testing.assert_array_equal(logits[len(prompt) - 1:-1].argmax(-1),
                                reply.ids)
  assert out.getvalue() == reply.text + "\n"


def test_a_prompt_longer_than_every_bucket_is_refused(tiny_model, tiny_tok):  # noqa: F811
  dec = chat.Decoder(tiny_model, tiny_tok, max_new_tokens=2, buckets=(8,),
                     err=io.StringIO())
  with pytest.raises(ValueError, match="prompt of 11 tokens > 8"):
    dec.reply([_user("what is 2 + 3 ?")])


def _chat(args, stdin=""):
  return subprocess.run(
      [sys.executable, "-m", "purld_jax.chat", "--jit_cache_dir=", *args],
      input=stdin,
      capture_output=True, text=True, cwd=REPO, env=subprocess_env(),
      timeout=900, check=False)


def test_a_missing_model_directory_is_one_line_without_traceback(tmp_path):
  missing = str(tmp_path / "no_such_model")
  r = _chat([f"--model={missing}", "--prompt=hi"])
  assert r.returncode == 2
  assert "Traceback" not in r.stderr
  assert r.stderr.strip() == f"error: --model={missing}: no such directory"
  assert r.stdout == ""


def test_piped_conversation_end_to_end_with_a_clean_stderr(
    tiny_model, tiny_tok, tmp_path):  # noqa: F811
  models.save_pretrained(tiny_model, tiny_tok, tmp_path)
  env = subprocess_env()
  env.pop("JAX_PLATFORMS", None)  # backend discovery: its INFO line is quiet
  env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
  r = subprocess.run(
      [sys.executable, "-m", "purld_jax.chat", "--jit_cache_dir=",
       f"--model={tmp_path}", "--max_new_tokens=4"], input="what is 2 + 3 ?\nthe cat sat\n",
      capture_output=True, text=True, cwd=REPO, env=env, timeout=900,
      check=False)
  assert r.returncode == 0, r.stderr
  assert len(r.stdout.splitlines()) == 2  # one line per answer
  lines = r.stderr.splitlines()
  assert [ln for ln in lines if "compiling (first reply)" in ln] == [
      "[chat] compiling (first reply) ..."]
  for noise in ("Traceback", "Unable to initialize backend", "libtpu",
                "PyTorch was not found"):
    assert noise not in r.stderr, r.stderr
