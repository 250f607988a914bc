"""The teacher client: config, backoff arithmetic, response checks, faults over HTTP."""

import email.utils
import json
import time

import pytest

from purld_jax import prompts
from purld_jax import teacher
from purld_jax import teacher_wire
from tests import fault_server as fault_lib
from tests.fixtures_teacher import fault_server  # noqa: F401  (fixture)

PROMPT = prompts.Prompt.from_text("two words", id="p", answer="ref")


def _cfg(base_url, **kw):
  kw = dict(dict(model="m", api_key_env="", timeout_s=2.0, max_retries=3,
                 backoff_base_s=0.01, backoff_max_s=0.05), **kw)
  return teacher.TeacherConfig(base_url=base_url, **kw)


# ---------------------------------------------------------------- config

def test_from_mapping_names_unknown_keys():
  cfg = teacher.TeacherConfig.from_mapping({"backend": "dataset", "max_tokens": 8})
  assert (cfg.backend, cfg.max_tokens, cfg.temperature) == ("dataset", 8, 0.0)
  with pytest.raises(teacher.ConfigError, match=r"\['modle', 'tempreature'\]"):
    teacher.TeacherConfig.from_mapping({"modle": "x", "tempreature": 1.0})
  with pytest.raises(teacher.ConfigError, match="never put a key in a config") as e:
    teacher.TeacherConfig.from_mapping({"api_key": "sk-secret"})
  assert "sk-secret" not in str(e.value)


@pytest.mark.parametrize("kw, msg", [
    ({"backend": "anthropic"}, "unknown teacher backend 'anthropic'; known: openai, dataset"),
    ({"on_truncated": "ignore"}, "on_truncated='ignore'"),
    ({"max_concurrency": 0}, "max_concurrency must be >= 1"),
    ({"max_retries": -1}, "max_retries must be >= 0"),
])
def test_config_rejects(kw, msg):
  with pytest.raises(teacher.ConfigError, match=msg.replace("(", r"\(")):
    teacher.TeacherConfig(**kw)


def test_missing_key_names_the_variable_not_a_key():
  with pytest.raises(teacher.ConfigError, match="MY_TEACHER_KEY is not set"):
    teacher.resolve_api_key("MY_TEACHER_KEY", {})
  assert teacher.resolve_api_key("K", {"K": "secret"}) == "secret"
  assert teacher.resolve_api_key("", {}) == "no-key"


def test_request_messages_system_prompt():
  with_system = prompts.Prompt("a", (("system", "own"), ("user", "q")))
  assert teacher_wire.request_messages(PROMPT, "sys") == (("system", "sys"),
                                                     ("user", "two words"))
  assert teacher_wire.request_messages(PROMPT, "") == (("user", "two words"),)
  assert teacher_wire.request_messages(with_system, "sys") == with_system.messages


# ---------------------------------------------------------------- pure parts

@pytest.mark.parametrize("retry, u, want", [
    (1, 0.0, 0.5),    # cap = min(60, 1 * 2**0) = 1: 1/2 + 0
    (1, 0.5, 0.75),   # 1/2 + 0.5 * 1/2
    (3, 0.0, 2.0),    # cap = 4
    (3, 0.5, 3.0),    # 2 + 0.5 * 2
    (10, 0.0, 30.0),  # cap = min(60, 512) = 60
])
def test_backoff_delay(retry, u, want):
  assert teacher_wire.backoff_delay(retry, base_s=1.0, max_s=60.0, u=u) == pytest.approx(want)


def test_retry_after_forms():
  assert teacher_wire.retry_after_s({"Retry-After": "2"}) == 2.0
  assert teacher_wire.retry_after_s({"retry-after-ms": "1500", "Retry-After": "9"}) == 1.5
  date = email.utils.formatdate(1000.0 + 30, usegmt=True)
  assert teacher_wire.retry_after_s({"Retry-After": date}, now=1000.0) == 30.0
  assert teacher_wire.retry_after_s({"Retry-After": "soon"}) is None
  assert teacher_wire.retry_after_s({}) is None


def _body(content="hi there", finish="stop", usage=(3, 2)):
  return json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                  "finish_reason": finish}],
                     "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}})


def test_parse_completion_ok_and_truncated_kept():
  assert teacher_wire.parse_completion(_body(), on_truncated="keep") == ("hi there", "stop", (3, 2))
  assert teacher_wire.parse_completion(_body(finish="length"), on_truncated="keep")[1] == "length"


@pytest.mark.parametrize("body, kind", [
    ("{not json", "malformed"),
    ("[1, 2]", "malformed"),
    ('{"choices": []}', "empty_choices"),
    ('{"object": "error"}', "empty_choices"),
    ('{"choices": [{"finish_reason": "stop"}]}', "malformed"),
    (_body(content=""), "empty_content"),
    (_body(content="  \n"), "empty_content"),
    (_body(finish="length"), "truncated"),  # under on_truncated="retry"
])
def test_parse_completion_retryable(body, kind):
  with pytest.raises(teacher_wire.Retryable) as e:
    teacher_wire.parse_completion(body, on_truncated="retry")
  assert e.value.kind == kind


def test_parse_completion_truncated_error_policy():
  with pytest.raises(teacher_wire.TeacherError, match="on_truncated='error'") as e:
    teacher_wire.parse_completion(_body(finish="length"), on_truncated="error")
  assert e.value.usage == (3, 2)


def _script(*steps):
  """send() that raises/returns the given steps in order."""
  steps = list(steps)

  def send():
    step = steps.pop(0)
    if isinstance(step, Exception):
      raise step
    return step
  return send


def test_with_retries_waits_backoff_then_retry_after_capped():
  sleeps = []
  send = _script(teacher_wire.Retryable("server_error", "500"),
                 teacher_wire.Retryable("rate_limited", "429", retry_after=0.7),
                 teacher_wire.Retryable("rate_limited", "429", retry_after=99.0),
                 ("ok", "stop", (1, 1)))
  result, attempts = teacher_wire.with_retries(
      send, max_retries=3, delay=lambda n: 0.1 * n, max_wait_s=5.0, sleep=sleeps.append)
  assert result == ("ok", "stop", (1, 1))
  assert sleeps == [0.1, 0.7, 5.0]  # backoff(1); Retry-After; Retry-After capped
  assert [a.outcome for a in attempts] == ["server_error", "rate_limited",
                                           "rate_limited", "ok"]
  assert [a.n for a in attempts] == [1, 2, 3, 4]


def test_with_retries_gives_up_with_attempts():
  sleeps, seen = [], []
  send = _script(*[teacher_wire.Retryable("timeout", "slow")] * 3)
  with pytest.raises(teacher_wire.TeacherError, match="gave up after 3 attempt") as e:
    teacher_wire.with_retries(send, max_retries=2, delay=lambda n: 1.0, max_wait_s=5.0,
                         sleep=sleeps.append, on_attempt=seen.append)
  assert sleeps == [1.0, 1.0]  # no sleep after the last attempt
  assert len(e.value.attempts) == 3 and seen == list(e.value.attempts)
  assert e.value.kind == "timeout" and not e.value.fatal


def test_with_retries_does_not_retry_teacher_error():
  send = _script(teacher_wire.TeacherError("HTTP 400", kind="http_400"), ("never",))
  with pytest.raises(teacher_wire.TeacherError, match="HTTP 400") as e:
    teacher_wire.with_retries(send, max_retries=5, delay=lambda n: 0.0, max_wait_s=1.0,
                         sleep=lambda s: None)
  assert len(e.value.attempts) == 1


# ---------------------------------------------------------------- over HTTP

def test_ok_answer_usage_and_system_prompt(fault_server):
  t = teacher.make(_cfg(fault_server.base_url, system_prompt="Be brief."))
  reply = t.ask(PROMPT)
  assert reply.text == fault_lib.answer_for("two words")
  # usage: words in "Be brief." + "two words" = 4; "ANSWER: two words" = 3
  assert (reply.prompt_tokens, reply.completion_tokens) == (4, 3)
  assert (reply.finish_reason, reply.truncated, reply.simulated) == ("stop", False, False)
  assert fault_server.requests[0]["messages"] == [
      {"role": "system", "content": "Be brief."}, {"role": "user", "content": "two words"}]
  assert fault_server.requests[0]["authorization"] == "Bearer no-key"


@pytest.mark.parametrize("fault, kind", [
    (("status", 429, {"Retry-After": "0"}), "rate_limited"),
    (("status", 500), "server_error"),
    (("status", 503), "server_error"),
    (("slow", 1.5), "timeout"),
    ("reset", "connection"),
    ("malformed", "malformed"),
    ("empty_choices", "empty_choices"),
    ("empty_content", "empty_content"),
])
def test_fault_survived_then_clear_error_after_retries(fault_server, fault, kind):
  t = teacher.make(_cfg(fault_server.base_url, timeout_s=0.3, max_retries=2))
  fault_server.push(fault, fault)  # two faults, then an answer: survived
  reply = t.ask(PROMPT)
  assert reply.text == fault_lib.answer_for("two words")
  assert [a.outcome for a in reply.attempts] == [kind, kind, "ok"]
  fault_server.push(fault, fault, fault)  # three = 1 + max_retries: error
  with pytest.raises(teacher_wire.TeacherError, match=f"gave up after 3 attempt.*{kind}") as e:
    t.ask(PROMPT)
  assert e.value.kind == kind


def test_retry_after_is_honoured(fault_server):
  t = teacher.make(_cfg(fault_server.base_url, backoff_max_s=5.0))
  fault_server.push(("status", 429, {"Retry-After": "0.4"}))
  t.ask(PROMPT)
  first, second = fault_server.requests
  assert second["at"] - first["at"] >= 0.4


@pytest.mark.parametrize("policy", ["keep", "retry", "error"])
def test_truncated_policies(fault_server, policy):
  t = teacher.make(_cfg(fault_server.base_url, on_truncated=policy))
  fault_server.push("truncated")
  if policy == "error":
    with pytest.raises(teacher_wire.TeacherError, match="truncated"):
      t.ask(PROMPT)
    return
  reply = t.ask(PROMPT)
  if policy == "keep":
    assert (reply.truncated, reply.finish_reason, len(reply.attempts)) == (True, "length", 1)
  else:
    assert (reply.truncated, [a.outcome for a in reply.attempts]) == (False, ["truncated", "ok"])


@pytest.mark.parametrize("status, fatal, hint", [
    (400, False, "HTTP 400"), (401, True, "check teacher.api_key_env"),
    (404, True, "check base_url"), (422, False, "HTTP 422")])
def test_client_errors_fail_at_once(fault_server, status, fatal, hint):
  t = teacher.make(_cfg(fault_server.base_url))
  fault_server.push(("status", status))
  with pytest.raises(teacher_wire.TeacherError, match=hint) as e:
    t.ask(PROMPT)
  assert (e.value.fatal, len(e.value.attempts), fault_server.calls()) == (fatal, 1, 1)


def test_unreachable_url_names_it():
  t = teacher.make(_cfg("http://127.0.0.1:9/v1", max_retries=1))
  t0 = time.monotonic()
  with pytest.raises(teacher_wire.TeacherError, match=r"cannot reach http://127.0.0.1:9/v1") as e:
    t.ask(PROMPT)
  assert e.value.fatal and time.monotonic() - t0 < 5


def test_dataset_teacher_is_labelled_simulated():
  t = teacher.make(teacher.TeacherConfig(backend="dataset"))
  reply = t.ask(PROMPT)
  assert (reply.text, reply.simulated) == ("ref", True)
  assert "SIMULATED" in t.label and reply.teacher == t.label
  with pytest.raises(teacher_wire.TeacherError, match="no reference 'answer'"):
    t.ask(prompts.Prompt.from_text("q", id="x"))


def test_ask_many_bounded_and_fatal_cancels(fault_server):
  fault_server.delay_s = 0.1
  t = teacher.make(_cfg(fault_server.base_url, max_concurrency=2))
  items = [prompts.Prompt.from_text(f"q{i}", id=str(i)) for i in range(4)]
  got = dict(teacher.ask_many(t, items, ask=t.ask))
  assert {p.id: r.text for p, r in got.items()} == {
      str(i): fault_lib.answer_for(f"q{i}") for i in range(4)}
  times = sorted(r["at"] for r in fault_server.requests)
  assert times[2] - times[0] >= 0.09  # the third waits for a free slot of two
  fault_server.push(*[("status", 401)] * 2)
  fault_server.delay_s = 0.0
  with pytest.raises(teacher_wire.TeacherError, match="HTTP 401"):
    list(teacher.ask_many(t, items * 5, ask=t.ask))
  assert fault_server.calls() < 4 + 20  # the rest were cancelled


# ---------------------------------------------------------------- logprobs

def test_parse_logprobs_chosen_first_then_alternatives():
  body = json.dumps({"choices": [{"message": {"content": "Verdict: B."},
                                  "logprobs": {"content": [
      {"token": "Verdict:", "logprob": -0.1,
       "top_logprobs": [{"token": "Verdict:", "logprob": -0.1}]},
      {"token": " B", "logprob": -0.9, "top_logprobs": [
          {"token": " tie", "logprob": -2.0}, {"token": " A", "logprob": -0.6},
          {"token": " B", "logprob": -0.9}]},
      {"token": ".", "logprob": -0.2}]}}]})
  # The sampled " B" first although " A" was likelier; the rest by log-prob.
  assert teacher_wire.parse_logprobs(body) == (
      (("Verdict:", -0.1),),
      ((" B", -0.9), (" A", -0.6), (" tie", -2.0)),
      ((".", -0.2),))
  no_logprobs = json.dumps({"choices": [{"message": {"content": "x"}}]})
  assert teacher_wire.parse_logprobs(no_logprobs) is None
  assert teacher_wire.parse_logprobs("not json") is None


def test_top_logprobs_asked_and_kept_only_when_configured(fault_server):
  plain = teacher.make(_cfg(fault_server.base_url))
  asked = teacher.make(_cfg(fault_server.base_url, top_logprobs=2))
  # Not asking keeps the request (so earlier ledgers' keys) as it was.
  assert plain.request(PROMPT).params == (("max_tokens", 512),
                                          ("temperature", 0.0))
  assert asked.request(PROMPT).params[-1] == ("top_logprobs", 2)
  assert plain.ask(PROMPT).logprobs is None
  reply = asked.ask(PROMPT)
  # "ANSWER: two words": one token per word, the fault server's scheme.
  assert reply.logprobs == tuple(((tok, -0.25), ("?", -3.0))
                                 for tok in ("ANSWER:", " two", " words"))
  with pytest.raises(teacher.ConfigError, match="top_logprobs must be >= 0"):
    _cfg(fault_server.base_url, top_logprobs=-1)
