r"""Records a real teacher's anchors for a prompt file, with their provenance.

  python -m purld_jax.tools.get_teacher --model=1.5b      # once: the GGUF
  python -m purld_jax.tools.record_anchors \
      --prompts=data/arith/train.jsonl --teacher=1.5b \
      --out=third_party/anchors/arith_train.qwen2.5-coder-1.5b.jsonl
  python -m purld_jax.tools.record_anchors --prompts=... --out=... \
      --base_url=http://HOST:PORT/v1 --model=NAME       # any live endpoint

`--teacher` serves the GGUF of `get_teacher` with llama.cpp on this machine
(`llama-cpp-python[server]`, the test extras); `--base_url` asks a running
OpenAI-compatible endpoint instead. Every prompt is asked once through the
anchor ledger in --workdir (a killed run resumes; nothing is paid twice),
greedy, with --system_prompt asking for a short worked solution that ends
with the number. Writes --out (JSONL: id, prompt, anchor, finish_reason,
usable, correct against the file's reference answer, anchor tokens) and
--out's `.json` sidecar: the teacher (file, sha256), generation parameters,
date, the anchors' accuracy, share truncated and length quantiles. The
`recorded` teacher backend (teacher.backend = "recorded",
teacher.recorded_path = --out) replays the file, so a fresh clone trains on
these anchors without running the teacher. The teacher is imperfect on
purpose: that is the PU setting (its wrong anchors stay, and are counted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

SYSTEM_PROMPT = (
    "You are a careful math tutor. Reply with one short sentence in plain "
    "text (no LaTeX) that shows the calculation and ends with the final "
    "number, e.g. 'Mia has 7 + 5 = 12 apples now.'")


def _sha256(path: str) -> str:
  from purld_jax.models import embedded  # pylint: disable=g-import-not-at-top
  return embedded.sha256_file(path)


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog="python -m purld_jax.tools.record_anchors", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--prompts", required=True, help="JSONL prompt file")
  p.add_argument("--out", required=True, help="the anchors' JSONL file")
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--teacher", choices=("0.5b", "1.5b"),
                 help="serve get_teacher's Qwen2.5-Coder GGUF here")
  g.add_argument("--base_url", help="a running OpenAI-compatible endpoint")
  p.add_argument("--model", default="default", help="with --base_url")
  p.add_argument("--system_prompt", default=SYSTEM_PROMPT)
  p.add_argument("--max_tokens", type=int, default=256)
  p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
  p.add_argument("--workdir", default="", help="the ledger's folder "
                 "(default workdirs/anchors/<out's name>)")
  p.add_argument("--limit", type=int, default=0, help="first N prompts only")
  return p.parse_args(argv)


def record(a, base_url: str, model: str, teacher_file: dict) -> dict:
  """Fetches (resumably) and writes --out and its sidecar; the summary."""
  from purld_jax import anchors as anchors_lib  # pylint: disable=g-import-not-at-top
  from purld_jax import evaluate  # pylint: disable=g-import-not-at-top
  from purld_jax import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  from purld_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  from purld_jax.models import embedded  # pylint: disable=g-import-not-at-top
  prompts = prompts_lib.read_jsonl(a.prompts)
  if a.limit:
    prompts = prompts[:a.limit]
  with_images = [p.id for p in prompts if p.images]
  if with_images:  # the recorded backend matches by text: it cannot replay them
    raise SystemExit(f"error: {a.prompts}: {len(with_images)} prompts have "
                     f"images (first {with_images[0]!r}); recorded anchors "
                     "are text-only: fetch with a live teacher instead")
  cfg = teacher_lib.TeacherConfig(
      backend="openai", base_url=base_url, model=model, api_key_env="",
      system_prompt=a.system_prompt, temperature=0.0,
      max_tokens=a.max_tokens, max_concurrency=1, on_truncated="keep")
  workdir = a.workdir or os.path.join(
      "workdirs", "anchors", os.path.basename(a.out).removesuffix(".jsonl"))
  store = anchors_lib.AnchorStore(workdir, teacher_lib.make(cfg))
  t0, done = time.perf_counter(), [0]

  def progress(prompt_id, reply):
    done[0] += 1
    if done[0] % 16 == 0:
      rate = done[0] / (time.perf_counter() - t0)
      print(f"[anchors] {done[0]} asked ({rate:.2f}/s)", file=sys.stderr)
  try:
    report = store.fetch(prompts, on_done=progress)
    got = store.lookup(prompts)
  finally:
    store.close()
  # Anchor lengths in the STUDENT's tokens (what sft.max_response_len and
  # the sampling budget must cover), from the embedded SmolLM2's tokenizer.
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  tok = AutoTokenizer.from_pretrained(str(embedded.ensure_converted()))
  rows, lengths = [], []
  for p, anc in zip(prompts, got):
    if anc is None:
      continue
    ok = evaluate.verify(anc.text, p.answer) if p.answer is not None else None
    n = len(tok.encode(anc.text, add_special_tokens=False))
    lengths.append(n)
    rows.append(dict(id=p.id, prompt=p.messages[-1][1], anchor=anc.text,
                     finish_reason=anc.finish_reason, usable=anc.usable,
                     correct=None if ok is None else bool(ok),
                     tokens=n))
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  scored = [r for r in rows if r["correct"] is not None]
  import numpy as np  # pylint: disable=g-import-not-at-top
  q = (np.percentile(lengths, [50, 95, 100]).tolist() if lengths else [])
  summary = dict(
      prompts_file=a.prompts, prompts_sha256=_sha256(a.prompts),
      prompts=len(prompts), answered=len(rows),
      missing=len(prompts) - len(rows),
      failed=len(report.failed),
      usable=sum(r["usable"] for r in rows),
      truncated=sum(r["finish_reason"] == "length" for r in rows),
      accuracy=(sum(r["correct"] for r in scored) / len(scored)
                if scored else None),
      anchor_tokens_p50_p95_max=q, teacher=teacher_file,
      endpoint_model=model, system_prompt=a.system_prompt,
      temperature=0.0, max_tokens=a.max_tokens,
      date=datetime.date.today().isoformat(),
      command="python -m purld_jax.tools.record_anchors " + " ".join(
          sys.argv[1:]))
  with open(a.out.removesuffix(".jsonl") + ".json", "w",
            encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv=None) -> int:
  a = parse_args(sys.argv[1:] if argv is None else argv)
  if not os.path.isfile(a.prompts):
    print(f"record_anchors: --prompts={a.prompts}: no such file",
          file=sys.stderr)
    return 2
  if a.base_url:
    s = record(a, a.base_url, a.model, dict(endpoint=a.base_url))
  else:
    from purld_jax.tools import get_teacher  # pylint: disable=g-import-not-at-top
    from purld_jax.tools import llamacpp  # pylint: disable=g-import-not-at-top
    path = str(get_teacher.default_out(get_teacher.MODELS[a.teacher]))
    if not os.path.isfile(path):
      print(f"record_anchors: {path}: not fetched; run python -m "
            f"purld_jax.tools.get_teacher --model={a.teacher}",
            file=sys.stderr)
      return 2
    info = dict(file=os.path.basename(path), sha256=_sha256(path),
                served_by="llama-cpp-python server (llama.cpp), greedy")
    with llamacpp.LlamaCppServer(model_path=path, n_threads=a.threads,
                                 ready_timeout_s=600) as server:
      s = record(a, server.base_url, server.model, info)
  print(json.dumps({k: v for k, v in s.items() if k != "system_prompt"},
                   indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
