r"""PNG curves of a run's metrics.jsonl.

  python -m purld_jax.plot --workdir=DIR [--out=DIR/plots] [--smooth=0.6]

One PNG per stage (`<out>/<stage>.png`): a grid with one panel per metric,
against the step; the raw values faint, an exponential moving average on
top. Metrics with one value only, or none finite, are left out. When a step
appears more than once (a resumed run), its last record wins.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from absl import app
from absl import flags

from purld_jax import metrics as metrics_lib

# Shown first, in this order, when present; the rest follow alphabetically.
PREFERRED = ("loss", "nll", "ppl", "grad_norm", "lr", "tokens_per_s",
             "step_s", "skipped")
SKIP = ("stage", "step", "time")
# Drawn raw only: smoothing a schedule or a flag would misplace it.
RAW = ("lr", "skipped", "nonfinite_loss", "nonfinite_grads")
# Left out when zero throughout (nothing happened).
QUIET = ("nonfinite_loss", "nonfinite_grads")


def series(records: Sequence[dict]) -> dict[str, dict[str, tuple]]:
  """stage -> metric -> (steps, values), steps increasing, last record of a
  step kept; non-finite values (written as strings) become NaN."""
  last: dict[str, dict[int, dict]] = {}
  for r in records:
    last.setdefault(r.get("stage", "?"), {})[int(r["step"])] = r
  out = {}
  for stage, by_step in last.items():
    steps = sorted(by_step)
    keys = sorted({k for r in by_step.values() for k in r if k not in SKIP})
    out[stage] = {}
    for k in keys:
      xs, ys = [], []
      for s in steps:
        if k in by_step[s]:
          v = by_step[s][k]
          xs.append(s)
          ys.append(float(v))  # "nan" / "inf" strings too
      if k in QUIET and not any(ys):
        continue
      if len(xs) > 1 and any(math.isfinite(y) for y in ys):
        out[stage][k] = (tuple(xs), tuple(ys))
  return out


def ema(values: Sequence[float], smooth: float) -> list[float]:
  """Exponential moving average, debiased; NaNs are skipped (carried)."""
  out, acc, weight = [], 0.0, 0.0
  for v in values:
    if math.isfinite(v):
      acc = smooth * acc + (1 - smooth) * v
      weight = smooth * weight + (1 - smooth)
    out.append(acc / weight if weight else float("nan"))
  return out


def _order(keys) -> list[str]:
  first = [k for k in PREFERRED if k in keys]
  return first + sorted(k for k in keys if k not in PREFERRED)


def plot_stage(stage: str, metrics: dict[str, tuple], path: str, *,
               smooth: float = 0.6, title: str = "") -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = _order(metrics)
  cols = min(3, len(keys))
  rows = -(-len(keys) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows),
                           squeeze=False)
  for ax, key in zip(axes.flat, keys):
    xs, ys = metrics[key]
    smoothed = smooth and key not in RAW
    ax.plot(xs, ys, color="tab:blue", alpha=0.3 if smoothed else 1.0, lw=1)
    if smoothed:
      ax.plot(xs, ema(ys, smooth), color="tab:blue", lw=1.6)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  fig.suptitle(f"{stage}: {title}" if title else stage, fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_workdir(workdir: str, out: str | None = None, *,
                 smooth: float = 0.6) -> list[str]:
  """Writes one PNG per stage of `<workdir>/metrics.jsonl`; returns paths."""
  records = metrics_lib.read(workdir)
  if not records:
    raise FileNotFoundError(f"{workdir}: no {metrics_lib.FILENAME} records")
  out = out or os.path.join(workdir, "plots")
  os.makedirs(out, exist_ok=True)
  paths = []
  for stage, metrics in series(records).items():
    if not metrics:
      continue
    path = os.path.join(out, f"{stage}.png")
    plot_stage(stage, metrics, path, smooth=smooth,
               title=os.path.basename(os.path.normpath(workdir)))
    paths.append(path)
  return paths


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  for path in plot_workdir(f.workdir, f.out, smooth=f.smooth):
    print(path)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "run directory with metrics.jsonl",
                      required=True)
  flags.DEFINE_string("out", None, "output folder (default <workdir>/plots)")
  flags.DEFINE_float("smooth", 0.6, "EMA weight of the smoothed curve, in "
                     "[0, 1); 0 draws the raw values only")
  app.run(_main)
