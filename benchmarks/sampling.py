"""Sampling throughput on this CPU: purld_jax.sampling against llama.cpp.

  python -m benchmarks.sampling            # B=8 prompts x K=8 x T=128 tokens
  python -m benchmarks.sampling --quick    # B=2 x K=4 x T=32
  python -m benchmarks.sampling --random   # random weights, SmolLM2's shape

Both sides do the same job on SmolLM2-135M-Instruct: prefill B chat prompts
once, then sample K continuations of each, exactly T tokens (stop ids are
ignored so the counts match), temperature 1, no filters. Ours runs the f32
HF conversion (`models.embedded.ensure_converted`) through one jitted
`sampling.sample`; llama.cpp (llama-cpp-python, low-level API) runs the Q4_1
GGUF from the wheel: one batch of all prompt tokens, the prompt's cache
copied to its K sequences (`llama_memory_seq_cp`), then one `llama_decode`
of B*K tokens per step and its own sampler chain (`dist`). llama.cpp runs in
a child process (so its peak RSS is its own), alternating with ours, so both
see the same load. Prints a table and appends one JSON line to
benchmarks/results.jsonl.

The bound: decode is a [B*K, D] x weights product per layer, so each step
costs FLOPs = 2 * (weights used) * B*K + attention, and reads the weights and
the caches once. The script measures this machine's f32 matmul rate at those
shapes and its copy bandwidth and prints both ceilings.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import multiprocessing
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

import numpy as np

QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "What is 17 times 23?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "How do aeroplanes stay in the air?",
)
RESULTS = pathlib.Path(__file__).with_name("results.jsonl")


# ----------------------------------------------------------------------------
# Machine


def machine() -> dict:
  model = platform.processor()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return dict(nproc=os.cpu_count(), cpu=model, python=platform.python_version())


def load() -> float:
  return round(os.getloadavg()[0], 2)


def peak_rss_mb() -> float:
  """VmHWM of this process image (a spawned child starts its own count)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _best_time(f, *args, repeats=5):
  import jax
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t)
  return best


def measure_rates(rows: int, cfg) -> dict:
  """f32 matmul GFLOP/s at the decode shapes and copy bandwidth GB/s."""
  import jax
  import jax.numpy as jnp
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  shapes = [(d, f), (f, d), (d, cfg.num_heads * cfg.head_dim), (d, v)]
  flops, secs = 0.0, 0.0
  for k, n in shapes:
    x = jnp.ones((rows, k), jnp.float32)
    w = jnp.ones((k, n), jnp.float32)
    dt = _best_time(jax.jit(jnp.matmul), x, w)
    flops += 2.0 * rows * k * n
    secs += dt
  big = jnp.ones((64 << 20,), jnp.float32)  # 256 MiB
  dt = _best_time(jax.jit(lambda a: a * 2.0), big)
  return dict(matmul_gflops=flops / secs / 1e9,
              copy_gbs=2 * big.nbytes / dt / 1e9)


def bounds(cfg, b, k, p_real, t, rates) -> dict:
  """Back-of-envelope ceilings for the decode, in tokens/s."""
  r = b * k
  d, n, g, h, layers = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, cfg.num_layers)
  head = cfg.vocab_size * d
  matmul_params = cfg.num_params() - head * (1 if cfg.tie_word_embeddings
                                             else 2) + head
  ctx = p_real + t / 2  # average keys a query sees
  flops_tok = 2 * matmul_params + 4 * ctx * n * h * layers
  weight_bytes = 4 * cfg.num_params()
  # Each prompt's keys/values are read once for its K rows; a row's own
  # ones up to the current chunk of `prefix_cache.CHUNK` slots.
  from purld_jax import prefix_cache
  c = prefix_cache.CHUNK
  own = np.mean([-(-(s + 1) // c) * c for s in range(max(t - 1, 1))])
  cache_bytes = 4 * 2 * layers * g * h * (b * p_real + r * own)
  step_bytes = weight_bytes + cache_bytes
  return dict(
      gflop_per_token=flops_tok / 1e9,
      mb_per_step=step_bytes / 1e6,
      compute_bound_tok_s=rates["matmul_gflops"] * 1e9 / flops_tok,
      memory_bound_tok_s=rates["copy_gbs"] * 1e9 / step_bytes * r)


# ----------------------------------------------------------------------------
# Ours


def load_model(random_init: bool):
  import jax.numpy as jnp
  from flax import nnx
  from purld_jax.models import embedded
  from purld_jax.models import llama
  from purld_jax.models import tokenizer as tokenizer_lib
  path = embedded.ensure_converted()
  tok = tokenizer_lib.load(path)
  if not random_init:
    from purld_jax import models
    return models.load_model(path, dtype=jnp.float32), tok, "smollm2-135m"
  cfg = llama.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536,
      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
      rope_theta=100000.0, tie_word_embeddings=True)
  return llama.Llama(cfg, rngs=nnx.Rngs(0)), tok, "random-smollm2-shape"


class Ours:
  """The jitted sampler, compiled once; `run()` times one job."""

  def __init__(self, model, tokens, mask, k, t):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from purld_jax import prefix_cache
    from purld_jax import sampling
    graphdef, params = nnx.split(model)
    self.args = (params, jnp.asarray(tokens), jnp.asarray(mask),
                 jax.random.key(0))
    self.index = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    sp = sampling.SamplingParams(temperature=1.0, max_new_tokens=t)
    start = time.perf_counter()
    lowered = sampling.sample.lower(graphdef, *self.args,
                                    prompt_index=self.index,
                                    num_candidates=k, sampling=sp)
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    # The prefill alone (prompts once, shared cache set up), for its rate.
    self.prefill = jax.jit(lambda params, tokens, mask: prefix_cache.prefill(
        nnx.merge(graphdef, params), tokens, mask, max(t - 1, 1), k))

  def run_prefill(self) -> float:
    import jax
    jax.block_until_ready(self.prefill(*self.args[:3]))
    start = time.perf_counter()
    jax.block_until_ready(self.prefill(*self.args[:3]))
    return time.perf_counter() - start

  def run(self) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = self.compiled(*self.args, prompt_index=self.index)
    tokens = np.asarray(out.tokens)
    return time.perf_counter() - start, tokens


# ----------------------------------------------------------------------------
# llama.cpp


def _llama_cpp_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("llama-cpp-python")
  except metadata.PackageNotFoundError:
    return "?"


def _quiet_llama_logs(llama_cpp):
  cb = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(
      lambda level, text, data: None)
  llama_cpp.llama_log_set(cb, ctypes.c_void_p())
  return cb  # keep alive


def llamacpp_job(gguf: str, prompts: list[list[int]], k: int, t: int,
                 threads: int, seed: int) -> dict:
  """The same job through llama.cpp's C API; runs in a child process."""
  import llama_cpp.llama_cpp as L
  keep = _quiet_llama_logs(L)
  L.llama_backend_init()
  model = L.llama_model_load_from_file(gguf.encode(),
                                       L.llama_model_default_params())
  b, r = len(prompts), len(prompts) * k
  n_prompt = sum(len(p) for p in prompts)
  per_seq = -(-(max(len(p) for p in prompts) + t) // 256) * 256
  cp = L.llama_context_default_params()
  cp.n_ctx = r * per_seq
  cp.n_batch = cp.n_ubatch = max(n_prompt, r)
  cp.n_seq_max = r
  cp.n_threads = cp.n_threads_batch = threads
  cp.kv_unified = False  # one stream per sequence: attention sees its own
  ctx = L.llama_init_from_model(model, cp)
  mem = L.llama_get_memory(ctx)
  smpl = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
  L.llama_sampler_chain_add(smpl, L.llama_sampler_init_dist(seed))
  batch = L.llama_batch_init(max(n_prompt, r), 0, 1)
  token = np.ctypeslib.as_array(batch.token, shape=(max(n_prompt, r),))
  pos = np.ctypeslib.as_array(batch.pos, shape=(max(n_prompt, r),))
  logits = np.ctypeslib.as_array(batch.logits, shape=(max(n_prompt, r),))
  n_seq = np.ctypeslib.as_array(batch.n_seq_id, shape=(max(n_prompt, r),))

  start = time.perf_counter()
  # Prefill: every prompt once, as sequence b * K, in one batch.
  i, last_index = 0, []
  for bi, prompt in enumerate(prompts):
    for j, tok in enumerate(prompt):
      token[i], pos[i], n_seq[i] = tok, j, 1
      batch.seq_id[i][0] = bi * k
      logits[i] = j == len(prompt) - 1
      i += 1
    last_index.append(i - 1)
  batch.n_tokens = i
  if L.llama_decode(ctx, batch) != 0:
    raise RuntimeError("llama_decode failed on the prompts")
  last = np.zeros(r, np.int32)
  for bi in range(b):
    for c in range(k):
      last[bi * k + c] = L.llama_sampler_sample(smpl, ctx, last_index[bi])
      if c:
        L.llama_memory_seq_cp(mem, bi * k, bi * k + c, -1, -1)
  prefill_s = time.perf_counter() - start
  # Decode: one token per sequence per step.
  lengths = np.repeat([len(p) for p in prompts], k)
  out = np.zeros((r, t), np.int32)
  out[:, 0] = last
  for i in range(r):
    batch.seq_id[i][0] = i
  n_seq[:r], logits[:r] = 1, 1
  batch.n_tokens = r
  for step in range(1, t):
    token[:r] = last
    pos[:r] = lengths + step - 1
    if L.llama_decode(ctx, batch) != 0:
      raise RuntimeError(f"llama_decode failed at step {step}")
    for i in range(r):
      last[i] = L.llama_sampler_sample(smpl, ctx, i)
    out[:, step] = last
  total = time.perf_counter() - start
  L.llama_batch_free(batch)
  L.llama_sampler_free(smpl)
  L.llama_free(ctx)
  L.llama_model_free(model)
  del keep
  return dict(total_s=total, prefill_s=prefill_s, tokens=out.tolist(),
              peak_rss_mb=peak_rss_mb())


def _child(queue, omp_wait, *args):
  os.environ["OMP_WAIT_POLICY"] = omp_wait  # read when libgomp loads
  try:
    queue.put(llamacpp_job(*args))
  except Exception as e:  # noqa: BLE001 - reported by the parent
    queue.put(dict(error=repr(e)))


def run_llamacpp(omp_wait: str, *args) -> dict:
  """`llamacpp_job` in a fresh process with OMP_WAIT_POLICY=omp_wait.

  llama.cpp's OpenMP threads spin between ops by default (ACTIVE); on a
  machine shared with other jobs that collapses its speed, PASSIVE sleeps.
  """
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  proc = ctx.Process(target=_child, args=(queue, omp_wait) + args)
  proc.start()
  result = queue.get()
  proc.join()
  result["omp_wait"] = omp_wait
  return result


# ----------------------------------------------------------------------------
# Main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--candidates", type=int, default=8)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--quick", action="store_true",
                      help="B=2 x K=4 x T=32, one repeat")
  parser.add_argument("--random", action="store_true",
                      help="random weights of SmolLM2's shape")
  parser.add_argument("--no-llamacpp", action="store_true")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="llama.cpp threads (XLA uses every core)")
  parser.add_argument("--omp-wait", default="active,passive",
                      help="llama.cpp OMP_WAIT_POLICY values to run; the "
                      "best counts")
  parser.add_argument("--out", default=str(RESULTS))
  args = parser.parse_args(argv)
  if args.quick:
    args.prompts, args.candidates, args.new_tokens = 2, 4, 32
    args.repeats = 1
  b, k, t = args.prompts, args.candidates, args.new_tokens

  import jax
  from purld_jax import sampling
  from purld_jax.models import embedded

  info = machine()
  load_start = load()
  model, tok, model_name = load_model(args.random)
  chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
           for i in range(b)]
  prompts = [tok.encode_chat(c) for c in chats]
  tokens, mask = sampling.pad_prompts(prompts, tok.pad_id)
  p_real = float(np.mean([len(p) for p in prompts]))
  print(f"{info['cpu']} x {info['nproc']}; jax {jax.__version__}; "
        f"{model_name}; B={b} K={k} T={t}; prompt tokens "
        f"{[len(p) for p in prompts]} padded to {tokens.shape[1]}; "
        f"load average {load_start}", flush=True)

  rates = measure_rates(b * k, model.cfg)
  bound = bounds(model.cfg, b, k, p_real, t, rates)
  ours = Ours(model, tokens, mask, k, t)
  ours_rss = peak_rss_mb()
  print(f"compiled in {ours.compile_s:.1f} s", flush=True)

  ours_prefill = ours.run_prefill()
  runs, theirs, loads = [], [], []
  gguf = str(embedded.gguf_path())
  for rep in range(args.repeats):
    loads.append(load())
    secs, out = ours.run()
    runs.append(secs)
    print(f"  ours      run {rep}: {secs:6.2f} s  {b * k * t / secs:7.1f} tok/s"
          f"  (load {load()})", flush=True)
    assert out.shape == (b, k, t)
    for omp in ([] if args.no_llamacpp else args.omp_wait.split(",")):
      res = run_llamacpp(omp, gguf, prompts, k, t, args.threads, rep)
      if "error" in res:
        raise RuntimeError(f"llama.cpp failed: {res['error']}")
      res.pop("tokens")
      theirs.append(res)
      print(f"  llama.cpp run {rep}: {res['total_s']:6.2f} s  "
            f"{b * k * t / res['total_s']:7.1f} tok/s  (OMP {omp}, load "
            f"{load()})", flush=True)
    loads.append(load())

  n_tok = b * k * t
  best = min(runs)
  row = dict(
      date=datetime.datetime.now().isoformat(timespec="seconds"),
      commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip(),
      model=model_name, B=b, K=k, T=t, prompt_tokens=p_real,
      padded_prompt=int(tokens.shape[1]), **info, jax=jax.__version__,
      ours_tok_s=n_tok / best, ours_s=best, ours_runs_s=runs,
      ours_compile_s=ours.compile_s, ours_peak_rss_mb=ours_rss,
      ours_prefill_s=ours_prefill,
      load_avg=loads, **{k_: round(v, 3) for k_, v in rates.items()},
      **{k_: round(v, 3) for k_, v in bound.items()})
  if theirs:
    best_t = min(theirs, key=lambda x: x["total_s"])
    row.update(llamacpp_tok_s=n_tok / best_t["total_s"],
               llamacpp_s=best_t["total_s"],
               llamacpp_prefill_s=best_t["prefill_s"],
               llamacpp_runs=[dict(s=round(x["total_s"], 2),
                                   omp_wait=x["omp_wait"]) for x in theirs],
               llamacpp_omp_wait=best_t["omp_wait"],
               llamacpp_peak_rss_mb=best_t["peak_rss_mb"],
               llamacpp_threads=args.threads,
               llama_cpp_python=_llama_cpp_version(),
               ratio=best_t["total_s"] / best)

  print()
  print(f"{'':24}{'ours (JAX f32)':>16}{'llama.cpp Q4_1':>16}")
  fmt = lambda key, f="{:.1f}": f.format(row[key]) if key in row else "-"
  print(f"{'tokens/s (best)':24}{fmt('ours_tok_s'):>16}"
        f"{fmt('llamacpp_tok_s'):>16}")
  print(f"{'seconds (best)':24}{fmt('ours_s', '{:.2f}'):>16}"
        f"{fmt('llamacpp_s', '{:.2f}'):>16}")
  print(f"{'prefill s (once/prompt)':24}{fmt('ours_prefill_s', '{:.2f}'):>16}"
        f"{fmt('llamacpp_prefill_s', '{:.2f}'):>16}")
  print(f"{'compile s':24}{fmt('ours_compile_s'):>16}{'-':>16}")
  print(f"{'peak RSS MB':24}{fmt('ours_peak_rss_mb', '{:.0f}'):>16}"
        f"{fmt('llamacpp_peak_rss_mb', '{:.0f}'):>16}")
  print(f"ratio ours/llama.cpp: {fmt('ratio', '{:.2f}')}; load average "
        f"{loads} (the benchmark's own threads count ~2)")
  print(f"bound: {bound['gflop_per_token']:.3f} GFLOP/token at "
        f"{rates['matmul_gflops']:.1f} GFLOP/s -> "
        f"{bound['compute_bound_tok_s']:.0f} tok/s; "
        f"{bound['mb_per_step']:.0f} MB/step at {rates['copy_gbs']:.1f} GB/s "
        f"-> {bound['memory_bound_tok_s']:.0f} tok/s; ours reach "
        f"{row['ours_tok_s'] / bound['compute_bound_tok_s']:.0%} of the "
        "compute bound")
  with open(args.out, "a") as f:
    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  sys.exit(main())
