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

Here: ``TeacherConfig``, ``Request``, ``Reply``, the ``Teacher`` protocol, the
``openai`` and ``dataset`` backends, ``make`` and ``ask_many``. The pure parts
they share (chat messages, body parsing, backoff, the retry loop, ``Attempt``,
``TeacherError``, ``Logprobs``) are in ``teacher_wire.py``.

Images (``Prompt.images``): ``openai`` sends them as standard content parts
of the last user message, ``[{"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}, ..., {"type": "text", "text": ...}]``
(``teacher_wire.openai_messages``; a text-only prompt keeps its plain
string content, byte for byte as before). ``dataset`` answers the reference
whatever the images (they are still in its ledger key). ``recorded`` refuses
a prompt with images: its file matches prompts by their text alone, so it
could not tell two scenes asked the same question apart. The ledger key covers the
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
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from purld_jax import prompts as prompts_lib
from purld_jax import teacher_wire as wire

BACKENDS = ("openai", "dataset", "recorded")
TRUNCATED_POLICIES = ("keep", "retry", "error")
DATASET_LABEL = "dataset (SIMULATED perfect teacher: the reference answers)"


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
class Reply:
  """A teacher's answer to one prompt."""

  text: str
  finish_reason: str
  truncated: bool
  prompt_tokens: int | None
  completion_tokens: int | None
  latency_s: float            # wall time over all attempts and waits
  attempts: tuple[wire.Attempt, ...]
  simulated: bool             # True for the dataset backend
  teacher: str                # Teacher.label
  # Per answer position ((token, log-prob), ...): the chosen token, then the
  # other top alternatives, most likely first; None when not asked for
  # (TeacherConfig.top_logprobs = 0). See teacher_wire.parse_logprobs.
  logprobs: wire.Logprobs | None = None


class Teacher(Protocol):
  label: str                  # what answered, for every output and ledger row
  simulated: bool
  max_concurrency: int

  def request(self, prompt: prompts_lib.Prompt) -> Request:
    """The exact request for a prompt (pure; no key, no network)."""

  def prepare(self) -> None:
    """Checks the teacher can be asked (key present); raises ConfigError."""

  def ask(self, prompt: prompts_lib.Prompt,
          on_attempt: Callable[[wire.Attempt], None] | None = None) -> Reply:
    """One answer, retried as configured; raises TeacherError. Thread-safe."""


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

  def _seen(self, attempt: wire.Attempt) -> None:
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
    return Request(
        messages=wire.request_messages(prompt, self.cfg.system_prompt),
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
          model=cfg.model, messages=wire.openai_messages(messages, images),
          temperature=cfg.temperature, max_tokens=cfg.max_tokens, **extra)
    except openai.APITimeoutError:
      raise wire.Retryable("timeout",
                            f"no answer within {cfg.timeout_s}s") from None
    except openai.APIConnectionError as e:
      cause = e.__cause__ or e
      if wire.never_connected(e):
        raise wire.Retryable("unreachable", f"cannot reach {cfg.base_url}: "
                              f"{type(cause).__name__}: {cause}") from None
      raise wire.Retryable("connection", f"connection to {cfg.base_url} lost: "
                            f"{type(cause).__name__}: {cause}") from None
    except openai.APIStatusError as e:
      status, msg = e.status_code, str(e.message)[:200]
      if status == 429 or status >= 500 or status == 408:
        kind = "rate_limited" if status == 429 else "server_error"
        raise wire.Retryable(
            kind, f"HTTP {status}: {msg}", status=status,
            retry_after=wire.retry_after_s(e.response.headers)) from None
      fatal = status in (401, 403, 404)
      key = (f"the key in ${cfg.api_key_env}" if cfg.api_key_env
             else "teacher.api_key_env: this server wants a key")
      hint = {401: f" (check {key})",
              404: f" (check base_url {cfg.base_url!r} and model {cfg.model!r})"}
      raise wire.TeacherError(f"HTTP {status}: {msg}{hint.get(status, '')}",
                              kind=f"http_{status}", fatal=fatal) from None
    parsed = wire.parse_completion(raw.text, on_truncated=cfg.on_truncated)
    return parsed + ((wire.parse_logprobs(raw.text) if cfg.top_logprobs
                      else None),)

  def ask(self, prompt, on_attempt=None):
    cfg, request = self.cfg, self.request(prompt)
    delay = lambda n: wire.backoff_delay(
        n, base_s=cfg.backoff_base_s, max_s=cfg.backoff_max_s,
        u=self._rng.random())
    def seen(attempt):
      self._seen(attempt)
      if on_attempt:
        on_attempt(attempt)

    t0 = time.monotonic()
    (text, finish, tokens, logprobs), attempts = wire.with_retries(
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
    return Request(
        messages=wire.request_messages(prompt, self.cfg.system_prompt),
        backend="dataset", model="reference-answer",
        params=(("answer", prompt.answer),)
        + ((("solution", prompt.solution),) if prompt.solution else ()),
        images=prompt.images)

  def prepare(self):
    pass

  def ask(self, prompt, on_attempt=None):
    if prompt.answer is None:
      raise wire.TeacherError(f"prompt {prompt.id!r} has no reference 'answer'; "
                              "the dataset teacher needs one", kind="no_answer")
    attempt = wire.Attempt(1, "ok")
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
             ask: Callable[[Any], Reply]
             ) -> Iterator[tuple[Any, Reply | wire.TeacherError]]:
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
    except wire.TeacherError as e:
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
        except wire.TeacherError as e:
          fatal = fatal or (e if e.fatal else None)
          result = e
        if result is not _NOT_STARTED:
          yield futures[future], result
    finally:
      stop.set()  # also when the caller stops early or raises
  if fatal is not None:
    raise fatal


_NOT_STARTED = object()
