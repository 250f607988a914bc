"""One teacher request on the wire, as pure parts (no client, no network).

What ``teacher.py``'s backends send and read back, and how they retry:

  request_messages, openai_messages   the prompt as chat ``messages``
                                      (images as ``image_url`` data URIs)
  parse_completion, parse_logprobs    a chat-completion body -> answer,
                                      finish reason, usage, logprobs
  backoff_delay, retry_after_s        the wait before a retry
  with_retries, never_connected       the retry loop; a connection never
                                      opened (refused, unknown host)
  Attempt, TeacherError, Logprobs     what each attempt records, the error a
                                      request fails with for good, and the
                                      top-logprobs of an answer

``Retryable`` is an attempt that failed in a way worth another try. What is
retried and what is fatal: ``teacher.py``'s module docstring.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

from purld_jax import images as images_lib
from purld_jax import prompts as prompts_lib


class TeacherError(RuntimeError):
  """A request that failed for good. ``fatal``: later requests would fail too."""

  def __init__(self, message: str, *, kind: str, fatal: bool = False,
               attempts: tuple[Attempt, ...] = ()):
    super().__init__(message)
    self.kind, self.fatal, self.attempts = kind, fatal, attempts


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


class Retryable(Exception):
  """An attempt that failed in a way worth another try."""

  def __init__(self, kind: str, message: str, *, status: int | None = None,
               retry_after: float | None = None, usage: tuple = (None, None)):
    super().__init__(message)
    self.kind, self.status, self.retry_after, self.usage = (
        kind, status, retry_after, usage)


def parse_completion(body: str, *, on_truncated: str) -> tuple[str, str, tuple]:
  """A chat-completion body -> (text, finish_reason, (prompt_tok, completion_tok)).

  Raises Retryable (malformed, empty choices, empty content, truncated under
  policy ``retry``) or TeacherError (truncated under policy ``error``).
  """
  try:
    data = json.loads(body)
  except (json.JSONDecodeError, TypeError):
    raise Retryable("malformed", f"body is not JSON: {body[:80]!r}") from None
  if not isinstance(data, dict):
    raise Retryable("malformed", f"body is not a JSON object: {body[:80]!r}")
  usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
  tokens = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
  choices = data.get("choices")
  if not isinstance(choices, list) or not choices:
    raise Retryable("empty_choices", "response has no choices", usage=tokens)
  choice = choices[0]
  message = choice.get("message") if isinstance(choice, dict) else None
  if not isinstance(message, dict):
    raise Retryable("malformed", "choices[0] has no message object", usage=tokens)
  text, finish = message.get("content"), choice.get("finish_reason") or ""
  if not isinstance(text, str) or not text.strip():
    raise Retryable("empty_content", f"empty answer (finish_reason={finish!r})",
                     usage=tokens)
  if finish == "length" and on_truncated == "retry":
    raise Retryable("truncated", "answer truncated at max_tokens", usage=tokens)
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
  """Calls ``send`` until it returns, retrying on Retryable.

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
    except Retryable as e:
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
