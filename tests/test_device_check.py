"""benchmarks/device_check.py: its arithmetic (device_math.py) by hand, the
guards, and the --tiny run on CPU (a subprocess, as a device machine runs
it)."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import device_check as dc
from benchmarks import device_math as dm
from purld_jax.models import llama

ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLER = ["tokens/s", "seconds (best)", "compile s", "prefill s",
           "decode tokens/s", "decode step ms", "decode HBM fraction"]
EXPECTED = {
    "parity": [f"{n}: {m}" for n in ("f32 highest", "f32 default",
                                      "bf16 compute")
               for m in ("max |logit diff|", "argmax agreement")],
    "train": ["params", "tokens per step", "step s (median)", "tokens/s",
              "MFU", "compile s", "loss"],
    "sampler 8x8": SAMPLER,
    "sampler 64x8": SAMPLER,
}


# ----------------------------------------------------------------------------
# Arithmetic, by hand


def test_mfu_by_hand():
  # 6 * 1e9 params * 1000 tokens = 6e12 FLOP in 1 s on a 6e12 FLOP/s chip.
  assert dm.mfu(1e9, 1000, 1.0, 6e12) == 1.0
  # Qwen2.5-0.5B (494,032,768 params), 4 x 1024 tokens in 50 ms on an H100:
  # 6 * 494032768 * 4096 = 1.2141e13 FLOP; / 0.05 s = 2.4283e14 FLOP/s;
  # / 989e12 = 0.2455.
  assert dm.mfu(494032768, 4096, 0.05, 989e12) == pytest.approx(0.24553,
                                                                 rel=1e-4)
  assert dm.mfu(1e9, 1000, 1.0, None) is None


def test_qwen_params_counted_once_tied():
  cfg = llama.LlamaConfig.from_hf(json.loads(dc.QWEN.read_text()))
  # 24 layers x (attention 896*896*2 + 896*128*2 + biases 896 + 256,
  # MLP 3*896*4864, 2 norms 896) + tied table 151936*896 + final norm 896.
  layer = (896 * 896 * 2 + 896 * 128 * 2 + 896 + 256 + 3 * 896 * 4864
           + 2 * 896)
  assert cfg.num_params() == 24 * layer + 151936 * 896 + 896 == 494032768


def test_decode_bytes_by_hand():
  cfg = llama.tiny_config()  # V 128, D 32, F 64, L 2, N 4, G 2, H 8, untied
  # Weights: 2 layers x (attention 32*4*8*2 + 32*2*8*2 = 3072, MLP
  # 3*32*64 = 6144, norms 64) + lm_head 128*32 + final norm 32 = 22688
  # (the untied input table is gathered, not read whole): 90752 bytes f32.
  # Cache elements per (row or prompt, slot): k and v, 2 layers, 2 kv
  # heads, 8 dims = 64. Prompts: 2 x 16 slots. Own: 4 rows x 32 slots
  # (T = 8: steps 0..6 all read the first chunk of 32).
  assert dm.decode_bytes(cfg, 2, 2, 16, 8, weight_bytes=4,
                         cache_bytes=4) == 90752 + 4 * 64 * (32 + 4 * 32)
  # T = 40: steps 0..31 read one chunk, steps 32..38 two: 1472 / 39 slots.
  got = dm.decode_bytes(cfg, 2, 2, 16, 40, weight_bytes=4, cache_bytes=2)
  assert got == pytest.approx(90752 + 2 * 64 * (32 + 4 * 1472 / 39))
  # Tied: the table is the head, read whole.
  tied = cfg.replace(tie_word_embeddings=True)
  assert dm.decode_bytes(tied, 1, 1, 16, 2, weight_bytes=2,
                         cache_bytes=2) == 2 * (22688 + 64 * (16 + 32))


def test_bandwidth_fraction_and_compare():
  # 1 GB read in 1 ms is 1 TB/s: half of 2 TB/s.
  assert dm.bandwidth_fraction(1e9, 1e-3, 2e12) == 0.5
  assert dm.bandwidth_fraction(1e9, 1e-3, None) is None
  ref = np.array([[[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]]])  # argmax 1, 0
  out = np.array([[[0.0, 0.9, 1.25], [2.0, 0.5, 0.0]]])  # argmax 2, 0
  assert dm.compare(out, ref) == (pytest.approx(0.75), 0.5)


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", (989e12, 3.35e12)),
    ("NVIDIA H100 PCIe", (756e12, 2.0e12)),
    ("NVIDIA H200", (989e12, 4.8e12)),
    ("NVIDIA A100-SXM4-80GB", (312e12, 2.0e12)),
    ("NVIDIA GH200 480GB", (None, None)),
    ("cpu", (None, None)),
])
def test_peaks(kind, peak):
  assert dm.peak_of(kind) == peak


# ----------------------------------------------------------------------------
# Guards, with stand-in parts (no model)


def _fake(rows=(), fail=None, sleep=0.0, term=False):
  def part(args, env):
    if term:
      os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(sleep)
    if fail:
      raise fail
    return [("train", m, v, "") for m, v in rows]
  return part


def test_a_failing_part_leaves_the_others(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(dc.PARTS, "parity", _fake(fail=ValueError("boom")))
  monkeypatch.setitem(dc.PARTS, "train", _fake([("step s (median)", 0.5)]))
  record = dc.main(["--tiny", "--parts", "parity,train", "--out",
                    str(tmp_path / "r.json")])
  rows = record["rows"]
  assert rows[0]["part"] == "parity"
  assert rows[0]["value"] == "error: ValueError: boom"
  assert rows[1]["value"] == 0.5 and record["complete"]
  assert dc._status(record) == 1
  assert "error: ValueError: boom" in capsys.readouterr().out
  assert json.loads((tmp_path / "r.json").read_text()) == record


def test_budget_counts_from_main_not_from_import(monkeypatch):
  """A process that imported the module long ago still gets its budget."""
  monkeypatch.delenv("OUT", raising=False)
  monkeypatch.setitem(dc.PARTS, "parity", _fake([("x", 1.0)]))
  monkeypatch.setattr(dc, "_T0", time.perf_counter() - 10_000.0)
  record = dc.main(["--tiny", "--parts", "parity", "--budget", "60"])
  assert [r["value"] for r in record["rows"]] == [1.0]


def test_budget_skips_the_remaining_parts(monkeypatch):
  monkeypatch.delenv("OUT", raising=False)
  monkeypatch.setitem(dc.PARTS, "parity", _fake([("x", 1.0)], sleep=0.3))
  monkeypatch.setattr(dc, "part_sampler", _fake([("y", 2.0)]))
  record = dc.main(["--tiny", "--parts", "parity,sampler", "--budget",
                    "0.1", "--sampler-shapes", "2x2,4x2"])
  assert [(r["part"], r["value"]) for r in record["rows"]] == [
      ("train", 1.0), ("sampler 2x2", "skipped (budget)"),
      ("sampler 4x2", "skipped (budget)")]
  assert not record["complete"]


def test_sigterm_writes_what_is_done(monkeypatch, tmp_path):
  monkeypatch.setitem(dc.PARTS, "parity", _fake([("x", 1.0)]))
  monkeypatch.setitem(dc.PARTS, "train", _fake(term=True, sleep=5.0))
  monkeypatch.setattr(dc, "part_sampler", _fake([("y", 2.0)]))
  before, start = signal.getsignal(signal.SIGTERM), time.perf_counter()
  dc.main(["--tiny", "--sampler-shapes", "2x2", "--out",
           str(tmp_path / "r.json")])
  assert time.perf_counter() - start < 4.0  # the sleep was cut short
  record = json.loads((tmp_path / "r.json").read_text())
  assert [r["value"] for r in record["rows"]] == [
      1.0, "interrupted (SIGTERM)", "skipped (SIGTERM)"]
  assert not record["complete"] and dc._status(record) == 1
  assert signal.getsignal(signal.SIGTERM) is before


def test_full_sizes_refused_on_cpu(monkeypatch):
  monkeypatch.delenv("OUT", raising=False)
  monkeypatch.setitem(dc.PARTS, "parity", _fake(fail=AssertionError("ran")))
  record = dc.main(["--parts", "parity"])
  assert record["rows"][0]["value"].startswith("skipped (cpu backend")
  assert dc._status(record) == 3


# ----------------------------------------------------------------------------
# --tiny on CPU, as a subprocess


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("device_check") / "device_check.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("OUT", None)
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.device_check", "--tiny", "--out",
       str(out), "--peak-flops", "1e12", "--peak-bw", "1e11"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc, json.loads(out.read_text())


def test_tiny_has_every_row_numeric(tiny_run):
  proc, record = tiny_run
  assert record["complete"] and record["platform"] == "cpu"
  got = {}
  for r in record["rows"]:
    assert (r["part"], r["metric"]) not in got, r
    got[(r["part"], r["metric"])] = r["value"]
  want = {(p, m) for p, metrics in EXPECTED.items() for m in metrics}
  assert set(got) == want
  for key, value in got.items():
    assert isinstance(value, (int, float)) and not isinstance(value, bool), \
        (key, value)
    assert math.isfinite(value) and value >= 0, (key, value)
  # The table on stdout holds every row, then the same JSON line.
  lines = proc.stdout.strip().splitlines()
  assert json.loads(lines[-1]) == record
  for part, metric in want:
    assert any(line.startswith(part) and metric in line
               for line in lines[:-1]), (part, metric)
  assert "compiling" in proc.stderr


def test_tiny_values_add_up(tiny_run):
  _, record = tiny_run
  v = {(r["part"], r["metric"]): r["value"] for r in record["rows"]}
  cfg = llama.tiny_config()
  # Same CPU on both sides: f32 logits equal, bf16 close.
  assert v[("parity", "f32 highest: max |logit diff|")] <= 1e-6
  assert v[("parity", "f32 highest: argmax agreement")] == 1.0
  assert 0 < v[("parity", "bf16 compute: max |logit diff|")] < 0.1
  assert v[("train", "params")] == cfg.num_params()
  assert v[("train", "loss")] == pytest.approx(np.log(128), abs=0.3)
  assert v[("train", "MFU")] == pytest.approx(
      6 * cfg.num_params() * v[("train", "tokens per step")]
      / v[("train", "step s (median)")] / 1e12)
  for b in (8, 64):
    part = f"sampler {b}x8"
    step = v[(part, "decode step ms")] / 1e3
    assert v[(part, "decode tokens/s")] == pytest.approx(b * 8 / step)
    assert v[(part, "decode HBM fraction")] == pytest.approx(
        dm.decode_bytes(cfg, b, 8, 16, 16, weight_bytes=4, cache_bytes=4)
        / step / 1e11)
    assert v[(part, "tokens/s")] == pytest.approx(
        b * 8 * 16 / v[(part, "seconds (best)")])
