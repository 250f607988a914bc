"""A walk through bad inputs to the main job: each one exits non-zero with
one short message that names the file, line, field or URL, never a
traceback, and never shows a key."""

import concurrent.futures
import json
import os
import subprocess
import sys

from tests.test_export import tiny_model_dir
from tests.train_fixtures import ONE_DEVICE
from tests.train_fixtures import REPO
from tests.train_fixtures import subprocess_env

KEY = "sk-proj-Zq81bXv2ElTe5tNoTaRealKey0"  # a canary: must never be shown


def _cases(tmp):
  """(name, extra args, text the message must contain)."""
  (tmp / "nonutf8.jsonl").write_bytes(
      b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
  (tmp / "empty.jsonl").write_text("\n")
  (tmp / "badjson.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
  (tmp / "afile").write_text("not a directory")
  (tmp / "unsupported").mkdir()
  (tmp / "unsupported" / "config.json").write_text('{"model_type": "gpt2"}')
  tiny_model_dir(tmp / "torn", "llama_untied")
  weights = tmp / "torn" / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:200])  # a torn download
  url = "http://127.0.0.1:9/v1"  # nothing listens on port 9
  live = ["--config.teacher.backend=openai", f"--config.teacher.base_url={url}",
          "--config.teacher.max_tokens=8", "--config.sft.max_response_len=8"]
  return [
      ("non-UTF-8 prompts", [f"--config.data.train_path={tmp}/nonutf8.jsonl"],
       f"{tmp}/nonutf8.jsonl:2: not UTF-8"),
      ("empty prompt file", [f"--config.data.train_path={tmp}/empty.jsonl"],
       f"{tmp}/empty.jsonl: no prompts"),
      ("bad JSON line", [f"--config.data.eval_path={tmp}/badjson.jsonl"],
       f"{tmp}/badjson.jsonl:2: bad JSON"),
      ("workdir is a file", [f"--workdir={tmp}/afile"],
       f"--workdir={tmp}/afile: exists and is not a directory"),
      ("unsupported model", [f"--config.model.path={tmp}/unsupported"],
       f"{tmp}/unsupported/config.json: model_type='gpt2'"),
      ("torn weights", [f"--config.model.path={tmp}/torn"],
       f"{tmp}/torn/model.safetensors"),
      ("unknown key", ["--config.sft.stepz=1"], "unknown config key"),
      ("key as a flag", [f"--config.teacher.api_key={KEY}"],
       "--config.teacher.api_key=<hidden>"),
      ("key in api_key_env", [f"--config.teacher.api_key_env={KEY}"],
       "teacher.api_key_env: not the NAME of an environment variable"),
      ("missing key variable",
       [*live, "--config.teacher.api_key_env=PURLD_NO_SUCH_KEY_VAR"],
       "PURLD_NO_SUCH_KEY_VAR"),
      ("refused teacher URL", [*live, "--config.teacher.api_key_env=",
                               "--config.teacher.max_retries=1",
                               "--config.teacher.backoff_base_s=0.1"], url),
  ]


def _run(tmp, name, extra):
  workdir = [] if any(a.startswith("--workdir") for a in extra) else [
      f"--workdir={tmp}/run_{abs(hash(name))}"]
  cmd = [sys.executable, "-m", "purld_jax.main",
         "--config=configs/demo.py:tiny", "--config.sft.steps=1",
         "--config.rl.steps=1", ONE_DEVICE, *workdir, *extra]
  env = subprocess_env()
  env.pop("PURLD_NO_SUCH_KEY_VAR", None)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def test_every_bad_input_is_one_short_error(tmp_path):
  cases = _cases(tmp_path)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    procs = list(pool.map(lambda c: _run(tmp_path, c[0], c[1]), cases))
  failures = []
  for (name, _, needle), proc in zip(cases, procs):
    err = proc.stderr
    # The teacher's retry warnings may come first; the error is one line.
    lines = [l for l in err.splitlines()
             if l.strip() and "teacher: attempt" not in l]
    ok = (proc.returncode != 0 and "Traceback" not in err
          and KEY not in err + proc.stdout and len(lines) <= 6
          and any(l.startswith("error:") for l in lines)
          and needle in "\n".join(lines))
    if not ok:
      failures.append(f"{name}: rc={proc.returncode}, wanted {needle!r}; "
                      f"stderr tail:\n{err[-1500:]}")
  assert not failures, "\n\n".join(failures)
  # Nothing written holds the key (the run refused it before config.json).
  for root, _, files in os.walk(tmp_path):
    for f in files:
      if f.endswith((".json", ".txt", ".jsonl")):
        with open(os.path.join(root, f), encoding="utf-8",
                  errors="replace") as fh:
          assert KEY not in fh.read(), os.path.join(root, f)


def test_what_looks_like_a_key_by_hand():
  from purld_jax import redact
  for name in ("OPENAI_API_KEY", "MY_TEAM_OPENAI_API_KEY_2", "", "TOKEN"):
    assert not redact.looks_like_key(name) and redact.check_key_env(
        name) is None, name
  for key in ("sk-abc", "hf_Xyz", "a1b2c3d4e5f6a7b8c9d0e1f2"):
    assert redact.looks_like_key(key), key
    assert key not in redact.check_key_env(key)
  assert redact.check_key_env("NOT-A-NAME") is not None  # not a variable
  assert not redact.looks_like_key("/tmp/run_12345678901234567890abc")
  argv = ["--config.teacher.api_key=abcd", "--config.teacher.api_key_env=XY12",
          "--config.teacher.max_tokens=8000"]
  # api_key's value goes; api_key_env holds a name, max_tokens a number.
  assert redact.hide("abcd XY12 8000", argv) == "<hidden> XY12 8000"


def test_a_bad_image_is_one_short_error(tmp_path):
  """A prompt whose image cannot be read stops the job before any model or
  teacher work, with file:line and the images[i] entry."""
  path = tmp_path / "pics.jsonl"
  (tmp_path / "notes.txt").write_text("not a picture")
  path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(
      {"prompt": "How many?", "images": ["notes.txt"]}) + "\n")
  proc = _run(tmp_path, "bad image", [f"--config.data.train_path={path}"])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
  assert len(lines) <= 6 and any(l.startswith("error:") for l in lines)
  assert f"{path}:2: field 'images[0]': not an image PIL can open" in proc.stderr
