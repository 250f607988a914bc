"""A small OpenAI-compatible teacher on 127.0.0.1 that misbehaves on cue.

``POST /v1/chat/completions`` answers ``answer_for(last user message)``, with
usage = (words in all messages, words in the answer). Faults are queued with
``push(...)`` and consumed one per request, in order; then it answers normally.
``always(text, fault)`` gives every request whose last message is ``text`` that
fault instead (the queue untouched): one prompt that always fails. Faults:

  "ok"                    a normal answer
  ("status", code, hdrs)  an error status with a JSON error body and headers
  ("slow", seconds)       a normal answer after ``seconds``
  "reset"                 read the request, then reset the connection (RST)
  "malformed"             200 with a body that is not JSON
  "empty_choices"         200 with ``"choices": []``
  "empty_content"         200 with content ""
  "truncated"             200 with half the answer and finish_reason "length"

A request with ``"logprobs": true`` also gets ``choices[0].logprobs.content``
from ``logprobs_for(answer, top_logprobs)`` (tests replace it to script a
judge's verdict probabilities).

Every request is recorded (``requests``: messages, Authorization header, fault).
A message whose content is a list of parts (images) is answered and matched
by its text parts (``text_of``); its image parts are kept in ``requests``.
"""

from __future__ import annotations

import collections
import http.server
import json
import re
import socket
import struct
import threading
import time


def answer_for(text: str) -> str:
  return f"ANSWER: {text}"


def logprobs_for(text: str, top: int) -> list[dict]:
  """One token per word (with its leading space), log-prob -0.25, and `top`
  alternatives: the token itself, then "?" at -3.0."""
  out = []
  for tok in re.findall(r"\s*\S+", text):
    alts = [{"token": tok, "logprob": -0.25}, {"token": "?", "logprob": -3.0}]
    out.append({"token": tok, "logprob": -0.25, "top_logprobs": alts[:top]})
  return out


def text_of(content) -> str:
  """A message's text: the string, or its "text" parts joined by newlines."""
  if isinstance(content, list):
    return "\n".join(p.get("text", "") for p in content
                     if isinstance(p, dict) and p.get("type") == "text")
  return content if isinstance(content, str) else ""


def _words(content) -> int:
  return len(text_of(content).split())


class FaultServer:
  """Start with ``with FaultServer() as s:``; ``s.base_url`` ends in /v1."""

  def __init__(self, *, delay_s: float = 0.0):
    self.delay_s = delay_s
    self.requests: list[dict] = []
    self._faults = collections.deque()
    self._always: dict[str, object] = {}
    self._lock = threading.Lock()
    self._stop = threading.Event()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def log_message(self, *args):  # quiet
        pass

      def finish(self):
        try:
          super().finish()
        except OSError:
          pass

      def do_GET(self):
        if self.path.rstrip("/").endswith("/models"):
          self._json(200, {"object": "list", "data": [{"id": "fault"}]})
        else:
          self._json(404, {"error": {"message": "not found"}})

      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        fault = server._next_fault(body)
        with server._lock:
          server.requests.append({
              "messages": body.get("messages"), "fault": fault,
              "authorization": self.headers.get("Authorization"),
              "max_tokens": body.get("max_tokens"), "at": time.time()})
        try:
          server._respond(self, body, fault)
        except OSError:
          pass  # the client went away (timeout): nothing to do

      def _json(self, code, obj, headers=None, raw=None):
        data = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
          self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._httpd.daemon_threads = True
    self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
    self._thread = threading.Thread(target=self._httpd.serve_forever,
                                    kwargs={"poll_interval": 0.05}, daemon=True)

  def push(self, *faults):
    with self._lock:
      self._faults.extend(faults)

  def always(self, text: str, fault) -> None:
    """Every request whose last message is `text` gets `fault`; None: no more."""
    with self._lock:
      if fault is None:
        self._always.pop(text, None)
      else:
        self._always[text] = fault

  def _next_fault(self, body):
    messages = body.get("messages") or [{}]
    with self._lock:
      text = text_of(messages[-1].get("content"))
      if text in self._always:
        return self._always[text]
      return self._faults.popleft() if self._faults else "ok"

  def calls(self) -> int:
    with self._lock:
      return len(self.requests)

  def _respond(self, h, body, fault):
    kind = fault[0] if isinstance(fault, tuple) else fault
    if self.delay_s:
      self._stop.wait(self.delay_s)
    if kind == "status":
      code, headers = fault[1], (fault[2] if len(fault) > 2 else {})
      h._json(code, {"error": {"message": f"injected {code}", "type": "fault"}},
              headers)
      return
    if kind == "slow":
      self._stop.wait(fault[1])
    if kind == "reset":
      h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                              struct.pack("ii", 1, 0))
      h.connection.close()
      return
    if kind == "malformed":
      h._json(200, None, raw=b'{"choices": [ this is not json')
      return
    messages = body.get("messages") or []
    text = answer_for(text_of(messages[-1]["content"])) if messages else ""
    finish = "stop"
    if kind == "empty_content":
      text = ""
    if kind == "truncated":
      text, finish = text[:len(text) // 2], "length"
    choices = [] if kind == "empty_choices" else [{
        "index": 0, "finish_reason": finish,
        "message": {"role": "assistant", "content": text}}]
    if choices and body.get("logprobs"):
      choices[0]["logprobs"] = {
          "content": logprobs_for(text, int(body.get("top_logprobs") or 0))}
    h._json(200, {
        "id": "chatcmpl-fault", "object": "chat.completion", "created": 0,
        "model": body.get("model", "fault"), "choices": choices,
        "usage": {"prompt_tokens": sum(_words(m["content"]) for m in messages),
                  "completion_tokens": _words(text),
                  "total_tokens": 0}})

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._httpd.shutdown()
    self._httpd.server_close()
