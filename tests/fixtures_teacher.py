"""Fixtures and helpers shared by the teacher/anchor tests (import them by name)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests import fault_server as fault_server_lib
from tests import llamacpp_server as llamacpp_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fault_server():
  with fault_server_lib.FaultServer() as server:
    yield server


@pytest.fixture(scope="module")
def llamacpp_server():
  pytest.importorskip("llama_cpp")
  with llamacpp_lib.LlamaCppServer() as server:
    yield server


def write_prompts(path, n: int, *, with_answer: bool = True) -> str:
  """n prompts "question i" (answer "i") as JSONL at ``path``."""
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      record = {"id": f"q{i}", "prompt": f"question {i}"}
      if with_answer:
        record["answer"] = str(i)
      f.write(json.dumps(record) + "\n")
  return os.fspath(path)


def cli_args(command: str, *, workdir, prompts=None, extra=(), **teacher) -> list[str]:
  """``python -m purld_jax.anchors <command> ...``; ``teacher`` -> --teacher.*."""
  args = [sys.executable, "-m", "purld_jax.anchors", command,
          f"--workdir={workdir}", "--noprogress"]
  if prompts is not None:
    args.append(f"--prompts={prompts}")
  args += [f"--teacher.{k}={v}" for k, v in teacher.items()]
  return args + list(extra)


def cli_env(**extra) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO, **extra)
  env.pop("OPENAI_API_KEY", None)
  return env


def run_cli(command: str, *, env=None, timeout=120, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(cli_args(command, **kw), capture_output=True, text=True,
                        cwd=REPO, env=env or cli_env(), timeout=timeout)


class ScriptedTeacher:
  """A `teacher.Teacher` whose reply to a prompt is `answer(prompt)`; counts
  its asks (`asked`). Replies carry `latency_s` and, as completion tokens,
  the reply's length in characters."""

  simulated, max_concurrency = False, 1

  def __init__(self, answer, *, label: str = "fake:teacher",
               latency_s: float = 0.0):
    self.answer, self.label, self.latency_s = answer, label, latency_s
    self.asked = 0

  def request(self, prompt):
    from purld_jax import teacher  # pylint: disable=g-import-not-at-top
    return teacher.Request(messages=prompt.messages, backend="fake",
                           model="m", params=())

  def prepare(self):
    pass

  def ask(self, prompt, on_attempt=None):
    from purld_jax import teacher  # pylint: disable=g-import-not-at-top
    self.asked += 1
    text = self.answer(prompt)
    return teacher.Reply(text=text, finish_reason="stop", truncated=False,
                         prompt_tokens=1, completion_tokens=len(text),
                         latency_s=self.latency_s, attempts=(),
                         simulated=False, teacher=self.label)
