"""Shared harness of the side-by-side benchmarks against TRL (issue 9).

`grpo_iteration.py` and `dpo_step.py` run each side in its own child process
(`python -m benchmarks.<bench> --child SIDE ...`), so each side's peak RSS is
its own and neither imports the other's framework; the parent collects one
JSON result per side, prints the table and appends one line to
`results.jsonl`. This module holds what both benchmarks and both sides share:
the prompts, the reward, the FLOP count, per-phase timers, the matmul rate of
torch, the child launcher and the table.

FLOPs are counted the same way for every side: the *useful* work of the job
(each prompt once, the completion tokens, the LM head only where a token is
predicted; 2 FLOPs per weight per token for a forward, 3 forwards for a
forward and backward; attention left out), so the roofline fraction of a
side is (useful FLOPs / its seconds) / the machine's f32 matmul rate, the
best of XLA's and torch's measured in the same run at the training shapes.
A side that repeats work (a prompt once per completion, a row scored twice)
shows a lower fraction.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import sampling as sampling_bench

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN = ROOT / "data" / "demo" / "train.jsonl"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# ----------------------------------------------------------------------------
# The job


def demo_prompts(n: int) -> list[dict]:
  """The first n records of data/demo/train.jsonl (prompt, answer)."""
  with open(TRAIN, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return rows[:n]


def exact_match(text: str, answer: str) -> float:
  """1.0 when the last number in `text` equals `answer`: the reward of both
  sides (the oracle check of `purld_jax.evaluate.verify`, restated here so
  that the TRL child does not import jax)."""
  found = _NUMBER.findall(text)
  return float(bool(found) and found[-1].replace(",", "") == str(answer))


def model_dims(hf_dir: str) -> dict:
  """Weight counts of the decoder in `hf_dir`/config.json."""
  with open(os.path.join(hf_dir, "config.json")) as f:
    c = json.load(f)
  d, f_, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
  n, g = c["num_attention_heads"], c.get("num_key_value_heads",
                                         c["num_attention_heads"])
  h = c.get("head_dim", d // n)
  body = layers * (d * (n + 2 * g) * h + n * h * d + 3 * d * f_)
  return dict(body=body, head=c["vocab_size"] * d, hidden=d, inter=f_,
              vocab=c["vocab_size"], q=n * h)


def forward_flops(dims: dict, prompt_tokens: int, response_tokens: int
                  ) -> float:
  """One forward over prompts (once) and responses, head on the responses."""
  return (2.0 * dims["body"] * (prompt_tokens + response_tokens)
          + 2.0 * dims["head"] * response_tokens)


# ----------------------------------------------------------------------------
# Measuring


class Phases:
  """Seconds per named phase, summed, reset per iteration; and the process's
  RSS high-water mark (MB) the first time each phase ends (`rss_mb`, in
  that order; 'start' when made): the first phase whose mark equals the
  final peak is where the peak happened."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self.rss_mb: dict[str, float] = {"start": sampling_bench.peak_rss_mb()}

  @contextlib.contextmanager
  def __call__(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - start)

  def add(self, name: str, secs: float):
    self.seconds[name] = self.seconds.get(name, 0.0) + secs
    self.rss_mb.setdefault(name, sampling_bench.peak_rss_mb())

  def take(self) -> dict:
    out, self.seconds = self.seconds, {}
    return out

  def wrap(self, obj, attr: str, name):
    """Times every call of obj.attr under `name` (a str, or a function of
    nothing returning one, read at call time)."""
    inner = getattr(obj, attr)

    def timed(*args, **kwargs):
      with self(name() if callable(name) else name):
        return inner(*args, **kwargs)
    setattr(obj, attr, timed)


def torch_matmul_gflops(rows: int, dims: dict, repeats: int = 3) -> float:
  """torch's f32 matmul rate at the decoder's shapes, [rows, k] x [k, n]."""
  import torch
  shapes = [(dims["hidden"], dims["inter"]), (dims["inter"], dims["hidden"]),
            (dims["hidden"], dims["q"]), (dims["hidden"], dims["vocab"])]
  flops, secs = 0.0, 0.0
  with torch.no_grad():
    for k, n in shapes:
      x, w = torch.ones(rows, k), torch.ones(k, n)
      x @ w
      best = float("inf")
      for _ in range(repeats):
        start = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - start)
      flops += 2.0 * rows * k * n
      secs += best
  return flops / secs / 1e9


def jax_matmul_gflops(rows: int, model_cfg) -> float:
  return sampling_bench.measure_rates(rows, model_cfg)["matmul_gflops"]


def summary(iterations: list[dict]) -> dict:
  """Median seconds per phase and in total over the timed iterations."""
  keys = sorted({k for it in iterations for k in it})
  return {k: float(np.median([it.get(k, 0.0) for it in iterations]))
          for k in keys}


# ----------------------------------------------------------------------------
# Children


BENCH_INSTALL = (".venv/bin/pip install -r benchmarks/requirements-bench.txt "
                 "(TRL and its peers; not part of the project's own installs)")


def child_main(run_side, argv) -> None:
  """`--child SIDE --settings JSON --result FILE`: runs one side, writes its
  result (with peak RSS) as JSON."""
  side, settings, result = argv[argv.index("--child") + 1], \
      json.loads(argv[argv.index("--settings") + 1]), \
      argv[argv.index("--result") + 1]
  try:
    out = run_side(side, settings)
  except ModuleNotFoundError as e:  # a peer side without the bench extras
    sys.exit(f"[{side}] needs {e.name!r}, which is not installed: "
             f"{BENCH_INSTALL}")
  out.update(side=side, peak_rss_mb=sampling_bench.peak_rss_mb())
  with open(result, "w") as f:
    json.dump(out, f)


def succeeded(sides: dict) -> dict:
  """The sides that ran; exits with a one-line message when none did."""
  ok = {n: s for n, s in sides.items() if "failed" not in s}
  if not ok:
    sys.exit("every side failed (their messages are above); nothing to report")
  return ok


def run_child(module: str, side: str, settings: dict) -> dict:
  """One side in a fresh interpreter; its JSON result plus the load average
  before and after.

  OMP_WAIT_POLICY (settings["omp_wait"], default passive) is set for the
  child: torch's OpenMP threads spin between ops by default, and on a 2-core
  machine shared with other jobs that made TRL's forward 3.4x and its
  generation 6.5x slower (measured here at load average 4-6); XLA does not
  use OpenMP."""
  with tempfile.TemporaryDirectory() as tmp:
    result = os.path.join(tmp, "result.json")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
               OMP_WAIT_POLICY=settings.get("omp_wait", "passive"))
    before = sampling_bench.load()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", module, "--child", side, "--settings",
         json.dumps(settings), "--result", result], cwd=ROOT, env=env)
    if proc.returncode != 0:  # e.g. -9: killed for memory
      print(f"[{side}] failed (exit {proc.returncode})", flush=True)
      return dict(failed=proc.returncode, load_before=before,
                  load_after=sampling_bench.load())
    with open(result) as f:
      out = json.load(f)
  out.update(load_before=before, load_after=sampling_bench.load(),
             wall_s=time.perf_counter() - start)
  return out


def header(settings: dict) -> dict:
  """The row's common fields: date, commit, machine, versions."""
  from importlib import metadata
  versions = {}
  for pkg in ("jax", "flax", "torch", "transformers", "trl", "accelerate"):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      versions[pkg] = None
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
  dirty = subprocess.run(["git", "status", "--porcelain", "--", "benchmarks",
                          "purld_jax"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
  # XLA_FLAGS change what ours compiles (e.g. the scheduler): part of the row.
  return dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
              commit=commit + ("+uncommitted" if dirty else ""),
              **sampling_bench.machine(), versions=versions,
              xla_flags=os.environ.get("XLA_FLAGS", ""), settings=settings)


def report(bench: str, settings: dict, sides: dict, useful_gflop: float,
           phase_names: list[str], out_path: str) -> dict:
  """Prints the table (median seconds, phases, RSS, roofline, ratios) and
  appends the row to `out_path`."""
  failed = {n: s for n, s in sides.items() if "failed" in s}
  sides = {n: s for n, s in sides.items() if "failed" not in s}
  rate = max(s["matmul_gflops"] for s in sides.values())
  names = list(sides)
  row = dict(header(settings), bench=bench, useful_gflop=useful_gflop,
             machine_matmul_gflops=rate, sides=sides, failed=failed)
  for name, s in failed.items():
    why = " (-9: killed, e.g. by the kernel's OOM killer)" if s["failed"] == -9 else ""
    print(f"{name}: FAILED (exit {s['failed']}{why}), "
          f"load {s['load_before']}/{s['load_after']}")
  for s in sides.values():
    s["roofline"] = useful_gflop / s["median"]["total"] / rate
  print("\nsettings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
  width = max(14, *(len(n) + 2 for n in names),
              *(len(",".join(f"{x:.1f}" for x in s["runs"])) + 2
                for s in sides.values()))
  print(f"{'median s (of ' + str(settings['iterations']) + ')':26}"
        + "".join(f"{n:>{width}}" for n in names))
  for phase in phase_names + ["total"]:
    print(f"{'  ' + phase if phase != 'total' else 'iteration':26}"
          + "".join(f"{s['median'].get(phase, 0.0):>{width}.2f}"
                    for s in sides.values()))
  lines = [
      ("runs (s)", lambda s: ",".join(f"{x:.1f}" for x in s["runs"])),
      ("warm-up (s)", lambda s: f"{s['warmup_s']:.1f}"),
      ("peak RSS (MB)", lambda s: f"{s['peak_rss_mb']:.0f}"),
      ("matmul GFLOP/s (own)", lambda s: f"{s['matmul_gflops']:.1f}"),
      ("useful GFLOP/s", lambda s:
       f"{useful_gflop / s['median']['total']:.1f}"),
      ("roofline fraction", lambda s: f"{s['roofline']:.2f}"),
      ("load avg before/after", lambda s:
       f"{s['load_before']}/{s['load_after']}"),
  ]
  for label, fmt in lines:
    print(f"{label:26}" + "".join(f"{fmt(s):>{width}}"
                                  for s in sides.values()))
  for name, s in sides.items():
    if s.get("rss_after_mb"):
      print(f"{name}: RSS high-water mark (MB) when each phase first "
            "ended: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                      s["rss_after_mb"].items()))
    if s.get("xla_temp_mb"):
      print(f"{name}: XLA temporaries of one call (MB, memory_analysis): "
            + ", ".join(f"{k} {v:.0f}" for k, v in s["xla_temp_mb"].items()))
  ratios = {}
  for mine, ours in sides.items():
    if not mine.startswith("ours"):
      continue
    for name, s in sides.items():
      if name.startswith("ours"):
        continue
      key = name if mine == "ours" else f"{mine} vs {name}"
      ratios[key] = dict(
          speed=s["median"]["total"] / ours["median"]["total"],
          memory=ours["peak_rss_mb"] / s["peak_rss_mb"])
      print(f"{mine} vs {name}: {ratios[key]['speed']:.2f}x faster, peak "
            f"RSS {ratios[key]['memory']:.2f} of theirs")
  row["ratios"] = ratios
  print(f"useful work {useful_gflop:.0f} GFLOP per iteration; machine f32 "
        f"matmul {rate:.1f} GFLOP/s (best of XLA and torch, this run)")
  with open(out_path, "a", encoding="utf-8") as f:
    f.write(json.dumps(row) + "\n")
  return row


# ----------------------------------------------------------------------------
# Shared pieces of the two benchmarks


def trl_timer(label: str, phases: Phases, iters: list, lengths=None):
  """A TrainerCallback that closes one iteration per optimizer step: the
  phases `phases` collected in it, the optimizer step, the rest as `other`
  (appended to `iters`); completion lengths logged by TRL to `lengths`."""
  import transformers
  marks = {}

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      phases.take()
      marks["start"] = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):
      marks["opt"] = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kw):
      phases.add("optimizer", time.perf_counter() - marks["opt"])

    def on_step_end(self, args, state, control, **kw):
      total = time.perf_counter() - marks["start"]
      times = phases.take()
      times["other"] = total - sum(times.values())
      times["total"] = total
      print_iteration(label, len(iters), times)
      iters.append(times)

    def on_log(self, args, state, control, logs=None, **kw):
      if lengths is not None and logs and "completions/mean_length" in logs:
        lengths.append(logs["completions/mean_length"])
  return Timer()


def print_iteration(label: str, i: int, times: dict, extra: str = ""):
  print(f"  {label} iteration {i}{' (warm-up)' if i == 0 else ''}: "
        f"{times['total']:.2f} s " + " ".join(
            f"{k}={v:.2f}" for k, v in times.items() if k != "total")
        + extra, flush=True)


def compile_jit(phases: Phases, name: str, fn, *args):
  """fn (jitted) compiled for args, timed and memory-marked as phase `name`;
  (the compiled callable, XLA's temporaries for one call in MB)."""
  from purld_jax import hostmem  # pylint: disable=g-import-not-at-top
  with phases(name):
    compiled = fn.lower(*args).compile()
    hostmem.release()  # the compiler's freed memory, as sharded.Jitted does
  temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
  return compiled, temp


def side_result(iters: list[dict], **extra) -> dict:
  """Warm-up (iteration 0) apart, the timed iterations and their median."""
  return dict(warmup_s=iters[0]["total"], iterations=iters[1:],
              runs=[i["total"] for i in iters[1:]],
              median=summary(iters[1:]), **extra)


def trl_prompt_lengths(tokenizer, dataset) -> list[int]:
  return [len(tokenizer.apply_chat_template(
      r["prompt"], add_generation_prompt=True, tokenize=True,
      return_dict=False)) for r in dataset]


SIDES_HELP = """Sides: ours (model.remat none, or --remat where given),
ours_remat (remat "full": each layer recomputed in the backward pass,
ours' lower-memory setting);
TRL's trl_onebatch / trl_accum with TRL's own default, gradient
checkpointing on (its lower-memory setting), and trl_onebatch_nockpt /
trl_accum_nockpt with it off (its faster setting)."""


SIDES = ("ours", "ours_remat", "trl_onebatch", "trl_accum",
         "trl_onebatch_nockpt", "trl_accum_nockpt")


def side_settings(side: str, settings: dict) -> dict:
  """The settings one side runs with: ours_remat is ours with remat "full";
  a trl_*_nockpt side turns TRL's gradient checkpointing off (TRL's
  GRPOConfig and DPOConfig default it on)."""
  if side not in SIDES:
    raise SystemExit(f"--sides: unknown side {side!r}; known: "
                     + ", ".join(SIDES))
  out = dict(settings)
  if side == "ours_remat":
    out["remat"] = "full"
  if side.startswith("trl_"):
    out["trl_accumulate"] = side.startswith("trl_accum")
    out["trl_grad_checkpointing"] = not side.endswith("_nockpt")
  return out


def add_common_args(parser, sides) -> None:
  parser.add_argument("--scan-layers", action="store_true",
                      help="ours: model.scan_layers (one lax.scan over the "
                      "layers: one layer compiled, and under remat 'full' "
                      "one layer's recomputed activations alive at a time; "
                      "each call stacks a copy of the layer weights)")
  parser.add_argument("--iterations", type=int, default=3,
                      help="timed iterations after the warm-up")
  parser.add_argument("--sides", default=",".join(sides),
                      help=SIDES_HELP)
  parser.add_argument("--quick", action="store_true",
                      help="a tiny job and 1 timed iteration (smoke run)")
  parser.add_argument("--omp-wait", default="passive",
                      help="OMP_WAIT_POLICY of the children (torch's threads)")
  parser.add_argument("--out", default=str(sampling_bench.RESULTS))


def run_sides(module: str, sides: str, settings: dict) -> dict:
  """Each side of `sides` (comma-separated) in its own child, in order."""
  print(f"{sampling_bench.machine()}; load average {sampling_bench.load()}",
        flush=True)
  out = {}
  for side in sides.split(","):
    side_settings(side, settings)  # an unknown name fails before any run
  for side in sides.split(","):
    print(f"[{side}]", flush=True)
    out[side] = run_child(module, side, settings)
  return out


def ours_setup(lr: float, rows: list[dict], remat: str = "none",
               lora_rank: int = 0, scan_layers: bool = False):
  """purld_jax's side: the f32 model (`LlamaConfig.remat` = remat: "full"
  recomputes each layer in the backward pass instead of keeping its
  activations), a TrainState (AdamW as TRL's: betas
  0.9/0.999, clipping at 1, no decay), a reference copy, and the prompts of
  `rows` as one left-padded `data.PromptBatch`.

  `lora_rank` r > 0: the state trains rank-r adapters (alpha 2 r, all
  targets) over `state.frozen`, the base; the reference is that base with
  zero adapters (a whole tree, the same arrays).

  Returns:
    (state, ref_params, schedule, tok, prompt batch, model config).
  """
  import jax
  import jax.numpy as jnp
  from purld_jax import data as data_lib
  from purld_jax import hostmem
  from purld_jax import prompts as prompts_lib
  from purld_jax.train import state as state_lib

  import dataclasses
  from purld_jax.models import embedded
  from purld_jax.models import hf
  from purld_jax.models import llama
  from purld_jax.models import tokenizer as tokenizer_lib

  hostmem.configure()  # as the main job: freed buffers go back at once
  path = embedded.ensure_converted()
  tok = tokenizer_lib.load(path)
  cfg = dataclasses.replace(hf.read_config(path, dtype=jnp.float32,
                                           param_dtype=jnp.float32),
                            remat=remat, scan_layers=scan_layers)
  if lora_rank:
    from purld_jax.models import lora  # pylint: disable=g-import-not-at-top
    cfg = cfg.replace(lora=lora.LoraSpec(rank=lora_rank,
                                         alpha=2.0 * lora_rank))
  params = hf.load_params(path, cfg)  # with LoRA: the base alone
  graphdef, _ = llama.abstract_model(cfg)
  tx, schedule = state_lib.make_optimizer(
      learning_rate=lr, warmup_steps=0, total_steps=1000, b2=0.999,
      clip_norm=1.0)
  trained = lora.init_adapters(cfg, 0) if lora_rank else params
  state = state_lib.TrainState.create(graphdef, trained, tx,
                                      rng=jax.random.PRNGKey(0),
                                      frozen=params if lora_rank else None)
  ref_params = (state.full_params(jax.tree.map(jnp.zeros_like, trained))
                if lora_rank else jax.tree.map(jnp.copy, params))
  prompts = [prompts_lib.Prompt.from_text(r["prompt"], id=str(i),
                                          answer=r.get("answer"))
             for i, r in enumerate(rows)]
  batch = data_lib.collate(data_lib.encode(prompts, tok, max_len=512),
                           range(len(prompts)), buckets=None)
  return state, ref_params, schedule, tok, batch, cfg


def trl_result(trainer, dataset, iters: list, path: str, rate_rows: int,
               **extra) -> dict:
  """A TRL side's result: timings, prompt lengths, torch's matmul rate."""
  import torch
  return side_result(
      iters, prompt_tokens=trl_prompt_lengths(trainer.processing_class,
                                              dataset),
      torch_threads=torch.get_num_threads(),
      matmul_gflops=torch_matmul_gflops(rate_rows, model_dims(path)), **extra)
