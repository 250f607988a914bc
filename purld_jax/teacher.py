"""The black-box teacher: one chat answer per prompt, over HTTP (the I/O edge).

Backends behind one ``Teacher`` protocol:

  openai   any OpenAI-compatible ``/chat/completions`` endpoint, through the
           ``openai`` package with its own retries off; retries happen here.
  dataset  the prompt's worked reference solution (``Prompt.solution``) or
           else its reference answer (``Prompt.answer``): a SIMULATED
           perfect teacher, for ablations. Its replies say so
           (``Reply.simulated``, ``Teacher.label``).
  recorded a real teacher's answers recorded by tools/record_anchors.py,
           replayed from ``recorded_path`` (``recorded_teacher.py``).

Images (``Prompt.images``): ``openai`` sends them as standard content parts
of the last user message, ``[{"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}, ..., {"type": "text", "text": ...}]``
(``openai_messages``; a text-only prompt keeps its plain string content,
byte for byte as before). ``dataset`` answers the reference whatever the
images (they are still in its ledger key). ``recorded`` refuses a prompt
with images: its file matches prompts by their text alone, so it could not
tell two scenes asked the same question apart. The ledger key covers the
images' bytes (``Request.images``; ``ledger.canonical_json``).

The API key is read from the environment variable whose *name* is
``TeacherConfig.api_key_env``; the key itself is held only by the HTTP client,
never in a config, a log line, an error message or the anchor ledger. An empty
``api_key_env`` means the server needs no key (a local llama.cpp).

Retries: 429, 5xx, timeouts, connection errors (refused or reset), malformed
bodies, empty choices and empty content are retried up to ``max_retries``
times, waiting ``backoff_delay`` (exponential, equal jitter) or the server's
``Retry-After`` (capped at ``backoff_max_s``). Other 4xx fail at once. A
truncated answer (``finish_reason == "length"``) is kept and flagged, retried,
or an error, as ``on_truncated`` says. Every retry of an answered request may
be billed.

Fatal errors (``TeacherError.fatal``: later requests would fail too, so
``ask_many`` starts no more): 401/403/404, and a server that could not be
reached (kind ``unreachable``: connection refused, unknown host) while this
teacher has never had an answer of any kind from it: the URL is wrong or the
server is not up. Once the server has been reached, a refused connection is
transient (a restart); a connection reset or dropped mid-request (kind
``connection``), a timeout, a 429 or a 5xx is never fatal: the request fails
alone once its retries are spent.

``on_truncated`` and the anchor ledger (``anchors.py``, ``ledger.py``): a kept
truncated answer is stored (it was paid for) but never used as an anchor
(``Anchor.usable``); under ``'keep'`` and ``'error'`` it is never asked
again. Under ``'retry'`` a truncated answer stored earlier is re-asked once,
with the same request, and replaced if the new answer is complete; that
re-ask is a new paid request (counted in the ledger's ``calls`` and
``reasked``). Under ``'retry'`` an answer that is still truncated after
``1 + max_retries`` attempts fails the request (each attempt billed).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import email.utils
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from absl import logging

from purld_jax import images as images_lib
from purld_jax import prompts as prompts_lib

BACKENDS = ("openai", "dataset", "recorded")
TRUNCATED_POLICIES = ("keep", "retry", "error")
DATASET_LABEL = "dataset (SIMULATED perfect teacher: the reference answers)"


class TeacherError(RuntimeError):
  """A request that failed for good. ``fatal``: later requests would fail too."""

  def __init__(self, message: str, *, kind: str, fatal: bool = False,
               attempts: tuple[Attempt, ...] = ()):
    super().__init__(message)
    self.kind, self.fatal, self.attempts = kind, fatal, attempts


class ConfigError(ValueError):
  """A teacher config that cannot work (unknown backend, missing key, ...)."""


def _field(default, help_text):
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """Everything a teacher needs; plain data (see ``from_mapping``)."""

  backend: str = _field("openai", f"one of {', '.join(BACKENDS)}")
  base_url: str = _field("http://127.0.0.1:8080/v1",
                         "OpenAI-compatible endpoint, up to /v1")
  model: str = _field("default", "model name the endpoint expects")
  api_key_env: str = _field("OPENAI_API_KEY", "NAME of the environment variable "
                            "holding the API key ('' = the server needs none)")
  system_prompt: str = _field("", "system message, used when a prompt has none")
  temperature: float = _field(0.0, "sampling temperature")
  max_tokens: int = _field(512, "answer length limit (tokens)")
  timeout_s: float = _field(120.0, "time limit of one HTTP attempt (s)")
  max_concurrency: int = _field(4, "requests in flight at once")
  max_retries: int = _field(5, "retries after the first attempt")
  backoff_base_s: float = _field(1.0, "first backoff wait (s), doubled each retry")
  backoff_max_s: float = _field(60.0, "longest wait (s), a server's Retry-After too")
  on_truncated: str = _field("keep", "answer cut at max_tokens: keep (stored, "
                             "flagged, never an anchor), retry (also re-asks a "
                             "stored truncated answer once: paid again) or "
                             "error")
  recorded_path: str = _field("", "backend 'recorded': the JSONL of "
                              "tools/record_anchors.py")
  top_logprobs: int = _field(0, "> 0: also ask for the N most likely tokens "
                             "at each answer position, with log-probabilities "
                             "(OpenAI `logprobs`; a probability judge reads "
                             "them); 0 = not asked")

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ConfigError(f"unknown teacher backend {self.backend!r}; "
                        f"known: {', '.join(BACKENDS)}")
    if self.on_truncated not in TRUNCATED_POLICIES:
      raise ConfigError(f"teacher.on_truncated={self.on_truncated!r}; "
                        f"known: {', '.join(TRUNCATED_POLICIES)}")
    for name in ("max_tokens", "max_concurrency"):
      if getattr(self, name) < 1:
        raise ConfigError(f"teacher.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("timeout_s", "backoff_base_s", "backoff_max_s", "max_retries",
                 "temperature", "top_logprobs"):
      if getattr(self, name) < 0:
        raise ConfigError(f"teacher.{name} must be >= 0, got {getattr(self, name)}")

  @classmethod
  def from_mapping(cls, d: Mapping[str, Any]) -> TeacherConfig:
    """From a dict or a ConfigDict block; unknown keys are an error naming them."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      hint = ("; never put a key in a config: export it and name the variable "
              "in api_key_env" if "api_key" in unknown else "")
      raise ConfigError(f"unknown teacher config keys {unknown}; "
                        f"known: {sorted(known)}{hint}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class Request:
  """What is asked, exactly: the ledger key is a hash of this (``ledger.py``)."""

  messages: tuple[tuple[str, str], ...]  # as sent, system prompt included
  backend: str
  model: str
  params: tuple[tuple[str, Any], ...]    # what shapes the answer, sorted by name
  # Encoded images on the last user message (Prompt.images), in order.
  images: tuple[bytes, ...] = dataclasses.field(default=(), repr=False)


@dataclasses.dataclass(frozen=True)
class Attempt:
  """One HTTP attempt. ``outcome``: ok, or the error kind that was retried/raised."""

  n: int                      # 1-based
  outcome: str
  status: int | None = None   # HTTP status, when a response came back
  error: str = ""
  latency_s: float = 0.0
  wait_s: float = 0.0         # sleep after this attempt before the next
  prompt_tokens: int | None = None
  completion_tokens: int | None = None


Logprobs = tuple[tuple[tuple[str, float], ...], ...]


@dataclasses.dataclass(frozen=True)
class Reply:
  """A teacher's answer to one prompt."""

  text: str
  finish_reason: str
  truncated: bool
  prompt_tokens: int | None
  completion_tokens: int | None
  latency_s: float            # wall time over all attempts and waits
  attempts: tuple[Attempt, ...]
  simulated: bool             # True for the dataset backend
  teacher: str                # Teacher.label
  # Per answer position ((token, log-prob), ...): the chosen token, then the
  # other top alternatives, most likely first; None when not asked for
  # (TeacherConfig.top_logprobs = 0). See parse_logprobs.
  logprobs: Logprobs | None = None


class Teacher(Protocol):
  label: str                  # what answered, for every output and ledger row
  simulated: bool
  max_concurrency: int

  def request(self, prompt: prompts_lib.Prompt) -> Request:
    """The exact request for a prompt (pure; no key, no network)."""

  def prepare(self) -> None:
    """Checks the teacher can be asked (key present); raises ConfigError."""

  def ask(self, prompt: prompts_lib.Prompt,
          on_attempt: Callable[[Attempt], None] | None = None) -> Reply:
    """One answer, retried as configured; raises TeacherError. Thread-safe."""


# ---------------------------------------------------------------- pure parts

def request_messages(prompt: prompts_lib.Prompt, system_prompt: str
                     ) -> tuple[tuple[str, str], ...]:
  """The prompt's messages, ``system_prompt`` first unless it has its own."""
  if not system_prompt or any(r == "system" for r, _ in prompt.messages):
    return prompt.messages
  return (("system", system_prompt),) + prompt.messages


def openai_messages(messages: tuple[tuple[str, str], ...],
                    images: tuple[bytes, ...] = ()) -> list[dict[str, Any]]:
  """The chat ``messages`` field: ``{"role", "content"}`` dicts, the images
  (if any) as ``image_url`` data-URI parts before the text of the last
  message (a user's: ``prompts`` guarantees it)."""
  out = [{"role": r, "content": c} for r, c in messages]
  if images:
    parts = [{"type": "image_url", "image_url": {"url": images_lib.data_uri(x)}}
             for x in images]
    out[-1]["content"] = parts + [{"type": "text", "text": out[-1]["content"]}]
  return out


def backoff_delay(retry: int, *, base_s: float, max_s: float, u: float) -> float:
  """Wait before retry number ``retry`` (1-based): equal jitter, u in [0, 1).

  cap = min(max_s, base_s * 2**(retry - 1)); wait = cap/2 + u * cap/2.
  """
  cap = min(max_s, base_s * 2.0 ** (retry - 1))
  return cap / 2 + u * cap / 2


def retry_after_s(headers: Mapping[str, str], now: float | None = None
                  ) -> float | None:
  """Seconds a ``Retry-After``/``retry-after-ms`` header asks for, or None."""
  lower = {k.lower(): v for k, v in headers.items()}
  if "retry-after-ms" in lower:
    try:
      return max(0.0, float(lower["retry-after-ms"]) / 1000)
    except ValueError:
      pass
  value = lower.get("retry-after")
  if value is None:
    return None
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value).timestamp()
  except (TypeError, ValueError):
    return None
  return max(0.0, when - (time.time() if now is None else now))


class _Retryable(Exception):
  """An attempt that failed in a way worth another try."""

  def __init__(self, kind: str, message: str, *, status: int | None = None,
               retry_after: float | None = None, usage: tuple = (None, None)):
    super().__init__(message)
    self.kind, self.status, self.retry_after, self.usage = (
        kind, status, retry_after, usage)


def parse_completion(body: str, *, on_truncated: str) -> tuple[str, str, tuple]:
  """A chat-completion body -> (text, finish_reason, (prompt_tok, completion_tok)).

  Raises _Retryable (malformed, empty choices, empty content, truncated under
  policy ``retry``) or TeacherError (truncated under policy ``error``).
  """
  try:
    data = json.loads(body)
  except (json.JSONDecodeError, TypeError):
    raise _Retryable("malformed", f"body is not JSON: {body[:80]!r}") from None
  if not isinstance(data, dict):
    raise _Retryable("malformed", f"body is not a JSON object: {body[:80]!r}")
  usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
  tokens = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
  choices = data.get("choices")
  if not isinstance(choices, list) or not choices:
    raise _Retryable("empty_choices", "response has no choices", usage=tokens)
  choice = choices[0]
  message = choice.get("message") if isinstance(choice, dict) else None
  if not isinstance(message, dict):
    raise _Retryable("malformed", "choices[0] has no message object", usage=tokens)
  text, finish = message.get("content"), choice.get("finish_reason") or ""
  if not isinstance(text, str) or not text.strip():
    raise _Retryable("empty_content", f"empty answer (finish_reason={finish!r})",
                     usage=tokens)
  if finish == "length" and on_truncated == "retry":
    raise _Retryable("truncated", "answer truncated at max_tokens", usage=tokens)
  if finish == "length" and on_truncated == "error":
    error = TeacherError("answer truncated at max_tokens (finish_reason "
                         "'length'; teacher.on_truncated='error')", kind="truncated")
    error.usage = tokens  # billed all the same
    raise error
  return text, finish, tokens


def parse_logprobs(body: str) -> Logprobs | None:
  """choices[0].logprobs.content of a chat-completion body, as
  ((token, log-prob), ...) per answer position: the chosen token first, then
  the other `top_logprobs` alternatives, most likely first. None when the
  body has no logprobs (the server ignored the request)."""
  try:
    content = json.loads(body)["choices"][0]["logprobs"]["content"]
  except (json.JSONDecodeError, TypeError, KeyError, IndexError):
    return None
  if not isinstance(content, list):
    return None
  out = []
  for pos in content:
    chosen = (str(pos["token"]), float(pos["logprob"]))
    others = sorted(((str(a["token"]), float(a["logprob"]))
                     for a in pos.get("top_logprobs") or ()
                     if str(a["token"]) != chosen[0]), key=lambda t: -t[1])
    out.append((chosen, *others))
  return tuple(out)


def with_retries(send: Callable[[], tuple[str, str, tuple]], *, max_retries: int,
                 delay: Callable[[int], float], max_wait_s: float,
                 sleep: Callable[[float], None] = time.sleep,
                 on_attempt: Callable[[Attempt], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 fatal: Callable[[str], bool] = lambda kind: False,
                 ) -> tuple[tuple[str, str, tuple], tuple[Attempt, ...]]:
  """Calls ``send`` until it returns, retrying on _Retryable.

  ``delay(retry)`` is the backoff for retry 1, 2, ...; a server's Retry-After
  replaces it; both are capped at ``max_wait_s``. Returns (result, attempts);
  raises TeacherError (with the attempts) once ``1 + max_retries`` are spent,
  fatal if ``fatal(kind of the last attempt)`` says so (asked then, after
  ``on_attempt`` saw it). A retryable fault is never fatal by itself.
  """
  attempts: list[Attempt] = []
  for n in range(1, max_retries + 2):
    t0 = clock()
    try:
      result = send()
    except _Retryable as e:
      last = n == max_retries + 1
      wait = 0.0 if last else min(
          max_wait_s, e.retry_after if e.retry_after is not None else delay(n))
      attempt = Attempt(n, e.kind, e.status, str(e), clock() - t0, wait, *e.usage)
      attempts.append(attempt)
      if on_attempt:
        on_attempt(attempt)
      if last:
        raise TeacherError(
            f"gave up after {n} attempt(s); last: {e.kind}: {e}", kind=e.kind,
            fatal=fatal(e.kind), attempts=tuple(attempts)) from None
      logging.warning("teacher: attempt %d/%d failed (%s: %s); retrying in %.2fs",
                      n, max_retries + 1, e.kind, e, wait)
      sleep(wait)
      continue
    except TeacherError as e:
      attempt = Attempt(n, e.kind, None, str(e), clock() - t0, 0.0,
                        *getattr(e, "usage", (None, None)))
      attempts.append(attempt)
      if on_attempt:
        on_attempt(attempt)
      e.attempts = tuple(attempts)
      raise
    attempt = Attempt(n, "ok", 200, "", clock() - t0, 0.0, *result[2])
    attempts.append(attempt)
    if on_attempt:
      on_attempt(attempt)
    return result, tuple(attempts)
  raise AssertionError("unreachable")


def never_connected(error: BaseException) -> bool:
  """The connection was never opened (refused, unknown host, no route), as
  opposed to one reset or dropped once open: from the exception's causes."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (ConnectionRefusedError, socket.gaierror)):
      return True
    if type(error).__name__ == "ConnectError":  # httpx: connect() failed
      return True
    error = error.__cause__ or error.__context__
  return False


# ---------------------------------------------------------------- backends

def resolve_api_key(env_name: str, environ: Mapping[str, str] = os.environ) -> str:
  """The key from ``environ[env_name]``; errors name the variable, never the key."""
  if not env_name:
    return "no-key"  # the openai client wants a string; keyless servers ignore it
  key = environ.get(env_name, "")
  if not key:
    raise ConfigError(f"the teacher API key variable {env_name} is not set "
                      f"(teacher.api_key_env={env_name!r}); export it, or set "
                      "teacher.api_key_env='' for a server that needs no key")
  return key


class OpenAITeacher:
  """Any OpenAI-compatible chat completions endpoint."""

  simulated = False

  def __init__(self, cfg: TeacherConfig, environ: Mapping[str, str] = os.environ):
    self.cfg, self._environ = cfg, environ
    self.label = f"openai:{cfg.model}@{cfg.base_url}"
    self.max_concurrency = cfg.max_concurrency
    self._client, self._lock = None, threading.Lock()
    self._rng = random.Random()
    self._reached = threading.Event()  # the server has answered, somehow

  def _seen(self, attempt: Attempt) -> None:
    """Notes that the server was reached (any attempt but an unreachable)."""
    if attempt.outcome != "unreachable":
      self._reached.set()

  def _fatal(self, kind: str) -> bool:
    """An unreachable server is fatal only before its first contact."""
    return kind == "unreachable" and not self._reached.is_set()

  def request(self, prompt):
    params = (("max_tokens", int(self.cfg.max_tokens)),
              ("temperature", float(self.cfg.temperature)))
    if self.cfg.top_logprobs:  # only then: earlier ledgers' keys unchanged
      params += (("top_logprobs", int(self.cfg.top_logprobs)),)
    return Request(messages=request_messages(prompt, self.cfg.system_prompt),
                   backend="openai", model=self.cfg.model, params=params,
                   images=prompt.images)

  def prepare(self):
    with self._lock:
      if self._client is None:
        import openai  # pylint: disable=g-import-not-at-top
        self._client = openai.OpenAI(
            base_url=self.cfg.base_url, timeout=self.cfg.timeout_s, max_retries=0,
            api_key=resolve_api_key(self.cfg.api_key_env, self._environ))
    return self._client

  def _send_once(self, messages, images=()):
    import openai  # pylint: disable=g-import-not-at-top
    client, cfg = self.prepare(), self.cfg
    extra = (dict(logprobs=True, top_logprobs=cfg.top_logprobs)
             if cfg.top_logprobs else {})
    try:
      raw = client.chat.completions.with_raw_response.create(
          model=cfg.model, messages=openai_messages(messages, images),
          temperature=cfg.temperature, max_tokens=cfg.max_tokens, **extra)
    except openai.APITimeoutError:
      raise _Retryable("timeout", f"no answer within {cfg.timeout_s}s") from None
    except openai.APIConnectionError as e:
      cause = e.__cause__ or e
      if never_connected(e):
        raise _Retryable("unreachable", f"cannot reach {cfg.base_url}: "
                         f"{type(cause).__name__}: {cause}") from None
      raise _Retryable("connection", f"connection to {cfg.base_url} lost: "
                       f"{type(cause).__name__}: {cause}") from None
    except openai.APIStatusError as e:
      status, msg = e.status_code, str(e.message)[:200]
      if status == 429 or status >= 500 or status == 408:
        kind = "rate_limited" if status == 429 else "server_error"
        raise _Retryable(kind, f"HTTP {status}: {msg}", status=status,
                         retry_after=retry_after_s(e.response.headers)) from None
      fatal = status in (401, 403, 404)
      key = (f"the key in ${cfg.api_key_env}" if cfg.api_key_env
             else "teacher.api_key_env: this server wants a key")
      hint = {401: f" (check {key})",
              404: f" (check base_url {cfg.base_url!r} and model {cfg.model!r})"}
      raise TeacherError(f"HTTP {status}: {msg}{hint.get(status, '')}",
                         kind=f"http_{status}", fatal=fatal) from None
    parsed = parse_completion(raw.text, on_truncated=cfg.on_truncated)
    return parsed + ((parse_logprobs(raw.text) if cfg.top_logprobs else None),)

  def ask(self, prompt, on_attempt=None):
    cfg, request = self.cfg, self.request(prompt)
    delay = lambda n: backoff_delay(n, base_s=cfg.backoff_base_s,
                                    max_s=cfg.backoff_max_s, u=self._rng.random())
    def seen(attempt):
      self._seen(attempt)
      if on_attempt:
        on_attempt(attempt)

    t0 = time.monotonic()
    (text, finish, tokens, logprobs), attempts = with_retries(
        lambda: self._send_once(request.messages, request.images),
        max_retries=cfg.max_retries,
        delay=delay, max_wait_s=cfg.backoff_max_s, on_attempt=seen,
        fatal=self._fatal)
    return Reply(text=text, finish_reason=finish, truncated=finish == "length",
                 prompt_tokens=tokens[0], completion_tokens=tokens[1],
                 latency_s=time.monotonic() - t0, attempts=attempts,
                 simulated=False, teacher=self.label, logprobs=logprobs)


class DatasetTeacher:
  """The reference answer as the anchor: a simulated perfect teacher."""

  simulated = True
  label = DATASET_LABEL

  def __init__(self, cfg: TeacherConfig):
    self.cfg, self.max_concurrency = cfg, 1

  def request(self, prompt):
    # The answer is part of the request: a changed reference is a new anchor.
    return Request(messages=request_messages(prompt, self.cfg.system_prompt),
                   backend="dataset", model="reference-answer",
                   params=(("answer", prompt.answer),)
                   + ((("solution", prompt.solution),) if prompt.solution
                      else ()), images=prompt.images)

  def prepare(self):
    pass

  def ask(self, prompt, on_attempt=None):
    if prompt.answer is None:
      raise TeacherError(f"prompt {prompt.id!r} has no reference 'answer'; the "
                         "dataset teacher needs one", kind="no_answer")
    attempt = Attempt(1, "ok")
    if on_attempt:
      on_attempt(attempt)
    return Reply(text=prompt.solution or prompt.answer, finish_reason="stop",
                 truncated=False,
                 prompt_tokens=None, completion_tokens=None, latency_s=0.0,
                 attempts=(attempt,), simulated=True, teacher=self.label)


def make(cfg: TeacherConfig, environ: Mapping[str, str] = os.environ) -> Teacher:
  """The teacher for ``cfg.backend``."""
  if cfg.backend == "openai":
    return OpenAITeacher(cfg, environ)
  if cfg.backend == "recorded":
    from purld_jax import recorded_teacher  # pylint: disable=g-import-not-at-top
    return recorded_teacher.RecordedTeacher(cfg)
  return DatasetTeacher(cfg)


def ask_many(teacher: Teacher, items: Iterable[Any], *,
             ask: Callable[[Any], Reply]) -> Iterator[tuple[Any, Reply | TeacherError]]:
  """Runs ``ask(item)`` on a pool of ``teacher.max_concurrency`` threads.

  Yields (item, reply or TeacherError) as each finishes. After a fatal
  TeacherError no new item starts; the error is raised once those running
  have finished (and been yielded).
  """
  stop = threading.Event()

  def guarded(item):
    if stop.is_set():
      return _NOT_STARTED
    try:
      return ask(item)
    except TeacherError as e:
      if e.fatal:
        stop.set()
      raise

  fatal = None
  with concurrent.futures.ThreadPoolExecutor(
      teacher.max_concurrency, thread_name_prefix="teacher") as pool:
    futures = {pool.submit(guarded, item): item for item in items}
    try:
      for future in concurrent.futures.as_completed(futures):
        try:
          result = future.result()
        except TeacherError as e:
          fatal = fatal or (e if e.fatal else None)
          result = e
        if result is not _NOT_STARTED:
          yield futures[future], result
    finally:
      stop.set()  # also when the caller stops early or raises
  if fatal is not None:
    raise fatal


_NOT_STARTED = object()
