"""Prepared accelerator check (issue 32, item 5): one table in ~8 minutes.

  python -m benchmarks.device_check                    # the default device
  python -m benchmarks.device_check --tiny             # tiny model: CPU, seconds
  timeout 540 python -m benchmarks.device_check --out $OUT/device_check.json

Parts, each guarded (a failing part prints its error in its row, the others
still run); after --budget seconds from the start the rest are "skipped
(budget)". Random weights throughout, f32 params (master weights).
  parity   SmolLM2-135M's shape, tokens [2, 64]: logits on the default device
           against jax.devices('cpu')[0] (f32, precision 'highest'): max
           |diff| and argmax agreement of f32 at 'highest', f32 at the
           default precision (TF32 may be used on NVIDIA) and bf16 compute.
  train    Qwen2.5-0.5B's shape (configs/arch/qwen2.5-0.5b), bf16 compute: a
           jitted value_and_grad of next-token cross-entropy + optax.adamw on
           tokens [B, T]. MFU = 6 * n_params * B * T / step s / peak bf16
           FLOP/s (tied embedding counted once, attention FLOPs not).
  sampler  purld_jax.sampling.sample on the Qwen shape (--sample-dtype
           compute and KV caches) per B x K of --sampler-shapes: B prompts
           of P tokens, exactly T new tokens each: tokens/s, seconds,
           compile; the decode alone, (sample - jitted `prefix_cache.prefill`)
           / (T - 1) per step, in tokens/s and as the fraction of HBM
           bandwidth its reads (`decode_bytes`) take.
Timed from call to ready after a warm-up call, compilation apart. Peaks per
device kind: PEAKS (n/a for CPU and unknown kinds; --peak-flops, --peak-bw
override). Without --tiny a CPU backend is refused (--allow-cpu). Progress
goes to stderr, the table and one JSON line to stdout; the JSON line also
to --out (default $OUT/device_check.json) after every part, so a run killed
by `timeout` leaves the finished parts. Exit 1 when a part failed, 3 when
refused on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from benchmarks.device_math import (bandwidth_fraction, compare,
                                    decode_bytes, mfu, peak_of)

ROOT = pathlib.Path(__file__).resolve().parent.parent
QWEN = ROOT / "configs" / "arch" / "qwen2.5-0.5b" / "config.json"
_T0 = time.perf_counter()


class Interrupted(BaseException):
  """SIGTERM (`timeout`) arrived: stop, print and write what is done."""


def log(msg: str) -> None:
  print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", file=sys.stderr,
        flush=True)


# ----------------------------------------------------------------------------
# Models


def model_config(args, name: str, dtype: str):
  """LlamaConfig: tiny (--tiny), SmolLM2-135M's or Qwen2.5-0.5B's shape;
  f32 params, `dtype` compute, `scan_layers` from --scan-layers."""
  import jax.numpy as jnp
  from purld_jax.models import llama
  dt = jnp.dtype(dtype)
  if args.tiny:
    cfg = llama.tiny_config(dtype=dt)
  elif name == "smollm2":  # benchmarks/sampling.py's random-weights shape
    cfg = llama.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        rope_theta=100000.0, tie_word_embeddings=True, dtype=dt)
  else:
    cfg = llama.LlamaConfig.from_hf(json.loads(QWEN.read_text()),
                                    source=str(QWEN), dtype=dt)
  return cfg.replace(scan_layers=args.scan_layers)


def random_params(cfg, seed: int = 0):
  """Random weights of `Llama(cfg)` (NNX pure-dict layout) on the default
  device, made eagerly (a jitted initialiser compiles for 17 s at 24 layers
  on CPU; eager ops compile once per shape)."""
  from flax import nnx
  from purld_jax.models import llama
  log(f"random params: {cfg.num_params() / 1e6:.1f} M, "
      f"{cfg.num_layers} layers, f32")
  return nnx.to_pure_dict(nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(seed))))


def _peak_memory() -> str:
  """The default device's peak allocation so far, where it reports one."""
  import jax
  try:
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  except Exception:  # noqa: BLE001 - a note, not a result
    peak = None
  return "" if peak is None else f"; device peak {peak / 2**30:.1f} GiB"


def _timed(fn) -> tuple[float, object]:
  import jax
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


# ----------------------------------------------------------------------------
# Parts: each returns rows (part, metric, value, note)


def part_parity(args, env):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from purld_jax.models import llama
  cfg = model_config(args, "smollm2", "float32")
  params = random_params(cfg)
  length = 8 if args.tiny else args.parity_len
  tokens = np.random.default_rng(0).integers(
      0, cfg.vocab_size, (2, length)).astype(np.int32)
  cpu = jax.devices("cpu")[0]

  def logits(c, p, tok, precision):
    graphdef = llama.abstract_model(c)[0]
    ctx = (jax.default_matmul_precision(precision) if precision
           else contextlib.nullcontext())
    with ctx:
      return np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(
          p, tok))

  log(f"parity: compiling and running the cpu reference [2, {length}]")
  ref = logits(cfg, jax.device_put(params, cpu), jax.device_put(tokens, cpu),
               "highest")
  rows, note = [], f"{env['platform']} vs cpu; max |ref logit| "
  for name, c, precision in (
      ("f32 highest", cfg, "highest"), ("f32 default", cfg, None),
      ("bf16 compute", cfg.replace(dtype=jnp.bfloat16), None)):
    log(f"parity: {name} on {env['platform']}")
    diff, agree = compare(logits(c, params, jnp.asarray(tokens), precision),
                          ref)
    rows += [("parity", f"{name}: max |logit diff|", diff,
              note + f"{np.abs(ref).max():.3g}"),
             ("parity", f"{name}: argmax agreement", agree,
              f"{tokens.size} positions")]
  return rows


def train_step(graphdef, tx, params, opt_state, tokens_BT1):
  """One AdamW step of next-token cross-entropy on i32[B, T + 1] (the model
  runs [B, T]): (params, opt_state, loss f32[])."""
  import jax
  import optax
  from flax import nnx

  def loss_fn(p):
    logits_BTV = nnx.merge(graphdef, p)(tokens_BT1[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV, tokens_BT1[:, 1:]).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def part_train(args, env):
  import jax
  import jax.numpy as jnp
  import optax
  from purld_jax.models import llama
  cfg = model_config(args, "qwen", "bfloat16")
  b, t = (2, 16) if args.tiny else (args.batch, args.seq)
  graphdef = llama.abstract_model(cfg)[0]
  params = random_params(cfg)
  tx = optax.adamw(1e-4, weight_decay=0.01)
  opt_state = jax.jit(tx.init)(params)
  tokens = jnp.asarray(np.random.default_rng(1).integers(
      0, cfg.vocab_size, (b, t + 1)).astype(np.int32))
  step = jax.jit(functools.partial(train_step, graphdef, tx),
                 donate_argnums=(0, 1))
  log(f"train: compiling the step [B={b}, T={t}], bf16 compute")
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, tokens).compile()
  compile_s = time.perf_counter() - start
  state = [params, opt_state]  # donated: each call's outputs feed the next
  del params, opt_state

  def run():
    state[:] = compiled(*state[:2], tokens)
    return state

  first_s, _ = _timed(run)
  log(f"train: compiled in {compile_s:.1f} s, first call {first_s:.2f} s; "
      f"timing {args.steps} steps")
  timed = [_timed(run) for _ in range(args.steps)]
  runs, loss = [r for r, _ in timed], timed[-1][1][2]
  secs = float(np.median(runs))
  n, tok = cfg.num_params(), b * t
  util = mfu(n, tok, secs, env["peak_flops"])
  return [
      ("train", "params", n, "f32 master weights, bf16 compute"),
      ("train", "tokens per step", tok, f"[B={b}, T={t}]"),
      ("train", "step s (median)", secs,
       "runs " + ", ".join(f"{r:.4f}" for r in runs)),
      ("train", "tokens/s", tok / secs, ""),
      ("train", "MFU", "n/a" if util is None else util,
       "6 N tokens / s / peak bf16"),
      ("train", "compile s", compile_s,
       f"first call {first_s:.2f} s" + _peak_memory()),
      ("train", "loss", float(loss),
       f"ln V = {np.log(cfg.vocab_size):.2f} at random init"),
  ]


def part_sampler(args, env, b, k):
  import jax
  from flax import nnx
  from purld_jax import prefix_cache
  from purld_jax import sampling
  from purld_jax.models import llama
  cfg = model_config(args, "qwen", args.sample_dtype)
  p, t = (16, 16) if args.tiny else (args.prompt_len, args.new_tokens)
  graphdef = llama.abstract_model(cfg)[0]
  params = random_params(cfg)
  rng = np.random.default_rng(2)
  tokens = jax.numpy.asarray(
      rng.integers(10, cfg.vocab_size, (b, p)).astype(np.int32))
  mask = jax.numpy.ones((b, p), bool)
  key, index = jax.random.key(0), jax.numpy.arange(b, dtype=np.int32)
  sp = sampling.SamplingParams(temperature=1.0, max_new_tokens=t)
  name = f"sampler {b}x{k}"
  log(f"{name}: compiling sample (P={p}, T={t}, {args.sample_dtype})")
  start = time.perf_counter()
  compiled = sampling.sample.lower(
      graphdef, params, tokens, mask, key, prompt_index=index,
      num_candidates=k, sampling=sp).compile()
  compile_s = time.perf_counter() - start
  run = lambda: compiled(params, tokens, mask, key, prompt_index=index)
  prefill = jax.jit(lambda q, tk, m: prefix_cache.prefill(
      nnx.merge(graphdef, q), tk, m, max(t - 1, 1), k))
  first_s, out = _timed(run)
  if tuple(out.tokens.shape) != (b, k, t) or int(out.lengths.min()) != t:
    raise RuntimeError(f"sample gave {out.tokens.shape}, lengths "
                       f"{int(out.lengths.min())}..{int(out.lengths.max())}")
  log(f"{name}: compiled in {compile_s:.1f} s; timing {args.repeats} runs "
      "and the prefill")
  runs = [_timed(run)[0] for _ in range(args.repeats)]
  _timed(lambda: prefill(params, tokens, mask))
  prefill_s = min(_timed(lambda: prefill(params, tokens, mask))[0]
                  for _ in range(args.repeats))
  best = min(runs)
  step_s = (best - prefill_s) / max(t - 1, 1)
  if step_s <= 0:
    raise RuntimeError(f"prefill {prefill_s:.4f} s >= sample {best:.4f} s")
  step_bytes = decode_bytes(
      cfg, b, k, p, t, weight_bytes=4,
      cache_bytes=np.dtype(cfg.dtype).itemsize, chunk=prefix_cache.CHUNK)
  frac = bandwidth_fraction(step_bytes, step_s, env["peak_bw"])
  return [
      (name, "tokens/s", b * k * t / best, f"P={p}, T={t}, prefill included"),
      (name, "seconds (best)", best,
       "runs " + ", ".join(f"{r:.3f}" for r in runs)),
      (name, "compile s", compile_s,
       f"first call {first_s:.2f} s" + _peak_memory()),
      (name, "prefill s", prefill_s, ""),
      (name, "decode tokens/s", b * k / step_s, f"{b * k} rows"),
      (name, "decode step ms", step_s * 1e3, ""),
      (name, "decode HBM fraction", "n/a" if frac is None else frac,
       f"{step_bytes / 1e6:.1f} MB/step read"),
  ]


# ----------------------------------------------------------------------------
# Main


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.device_check", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  add = parser.add_argument
  add("--tiny", action="store_true",
      help="llama.tiny_config everywhere and few tokens: seconds on CPU")
  add("--parts", default="parity,train,sampler",
      help="comma list of parity, train, sampler")
  add("--budget", type=float, default=420.0,
      help="seconds from the start after which remaining parts are skipped")
  add("--out", default=(os.path.join(os.environ["OUT"], "device_check.json")
                        if os.environ.get("OUT") else None),
      help="JSON line written here (default $OUT/device_check.json if set)")
  for flag, default, what in (
      ("--batch", 4, "train: B"), ("--seq", 1024, "train: T"),
      ("--steps", 5, "train: timed steps"),
      ("--parity-len", 64, "parity: tokens per row"),
      ("--prompt-len", 64, "sampler: P"), ("--new-tokens", 128, "sampler: T"),
      ("--repeats", 2, "sampler: timed runs (best counts)")):
    add(flag, type=int, default=default, help=what)
  add("--sampler-shapes", default="8x8,64x8", help="B x K list")
  add("--sample-dtype", default="float32", choices=("float32", "bfloat16"),
      help="sampler compute and KV cache dtype (params stay f32)")
  add("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
      help="layers as one lax.scan (compiles faster)")
  add("--peak-flops", type=float, help="override the table's bf16 FLOP/s")
  add("--peak-bw", type=float, help="override the table's HBM bytes/s")
  add("--allow-cpu", action="store_true",
      help="run the full sizes on a CPU backend too")
  return parser.parse_args(argv)


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True,
                          timeout=10).stdout.strip() or "?"
  except (OSError, subprocess.SubprocessError):
    return "?"


def _fmt(v) -> str:
  return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def print_table(record) -> None:
  rows = record["rows"]
  width = max([len(r["part"]) for r in rows] + [4])
  mwidth = max([len(r["metric"]) for r in rows] + [6])
  print(f"{'part':{width}}  {'metric':{mwidth}}  {'value':>12}  note")
  for r in rows:
    print(f"{r['part']:{width}}  {r['metric']:{mwidth}}  "
          f"{_fmt(r['value']):>12}  {r['note']}")


def main(argv=None) -> dict:
  """Runs the parts; returns the record (also printed and written).

  --budget counts from here: when main ran inside a long process (the test
  suite), a clock started at import had spent the budget before the first
  part.
  """
  global _T0
  _T0 = time.perf_counter()
  args = parse_args(argv)
  log("importing jax")
  import jax
  import flax
  dev = jax.devices()[0]
  table_flops, table_bw = peak_of(dev.device_kind)
  env = dict(platform=dev.platform,
             peak_flops=args.peak_flops or table_flops,
             peak_bw=args.peak_bw or table_bw)
  record = dict(
      bench="device_check",
      date=datetime.datetime.now().isoformat(timespec="seconds"),
      commit=_commit(), device=str(dev), device_kind=dev.device_kind,
      platform=dev.platform, device_count=jax.device_count(),
      jax=jax.__version__, flax=flax.__version__,
      peak_bf16_flops=env["peak_flops"], peak_hbm_bytes_s=env["peak_bw"],
      args=vars(args), rows=[], complete=False)
  log(f"default device {dev.device_kind} ({dev.platform}); peak "
      f"{env['peak_flops']} FLOP/s, {env['peak_bw']} B/s")
  parts = []
  for part in args.parts.split(","):
    if part == "sampler":
      for shape in args.sampler_shapes.split(","):
        b, k = (int(x) for x in shape.lower().split("x"))
        parts.append((f"sampler {b}x{k}",
                      functools.partial(part_sampler, b=b, k=k)))
    else:
      parts.append((part, PARTS[part]))

  def write():
    record["elapsed_s"] = round(time.perf_counter() - _T0, 2)
    if args.out:
      pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
      pathlib.Path(args.out).write_text(json.dumps(record) + "\n")

  def on_term(signum, frame):
    raise Interrupted()

  old = signal.signal(signal.SIGTERM, on_term)
  refuse = dev.platform == "cpu" and not (args.tiny or args.allow_cpu)
  stop = ("skipped (cpu backend: no accelerator visible to JAX; --tiny or "
          "--allow-cpu)") if refuse else None
  i = 0
  try:
    for i, (name, fn) in enumerate(parts):
      if stop is None and time.perf_counter() - _T0 > args.budget:
        stop = "skipped (budget)"
      if stop:
        record["rows"].append(dict(part=name, metric="-", value=stop, note=""))
        continue
      try:
        rows = fn(args, env)
      except Exception as e:  # noqa: BLE001 - reported in the row
        log(f"{name} failed: {e!r}")
        rows = [(name, "error", f"error: {type(e).__name__}: {e}"[:300], "")]
      record["rows"] += [dict(part=p, metric=m, value=v, note=n)
                         for p, m, v, n in rows]
      log(f"{name} done")
      write()
  except Interrupted:
    log("SIGTERM: writing what is done")
    stop = "skipped (SIGTERM)"
    record["rows"] += [dict(part=name, metric="-", note="",
                            value=stop if j else "interrupted (SIGTERM)")
                       for j, (name, _) in enumerate(parts[i:])]
  finally:
    signal.signal(signal.SIGTERM, old)
  record["complete"] = stop is None
  write()
  print(f"device {record['device_kind']} ({record['platform']} x "
        f"{record['device_count']}); jax {record['jax']}, flax "
        f"{record['flax']}; commit {record['commit']}; peak bf16 "
        f"{_fmt(env['peak_flops'] or 'n/a')} FLOP/s, HBM "
        f"{_fmt(env['peak_bw'] or 'n/a')} B/s; {record['elapsed_s']} s")
  print_table(record)
  print(json.dumps(record), flush=True)
  return record


PARTS = dict(parity=part_parity, train=part_train)


def _status(record) -> int:
  values = [str(r["value"]) for r in record["rows"]]
  if any(v.startswith("skipped (cpu") for v in values):
    return 3
  return 1 if any(v.startswith(("error", "interrupted")) for v in values) else 0


if __name__ == "__main__":
  sys.exit(_status(main()))
