"""The ablation's part (a): one stored candidate pool, re-ranked.

A pool cell samples K_max candidates a prompt from an SFT model (a PU-RL run
at learning rate 0, its rollout store kept); the reference re-scores the
pool with every scheme (experiments/rerank.py) and each K is sub-sampled
from it, so schemes and group sizes are compared on the same candidates:
agreement with the verifier per scheme x K, and the PU modes' DPO pairs
judged by the verifier (experiments/ablation.py runs it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import analysis
from experiments import common
from experiments import ladder

PREFIX = "ref_"  # stored as scores/ref_<scheme>: scored by the reference
SCHEMES = ("judge", "pmi", "anchor_recon", "pairwise_judge", "similarity",
           "self_reward")
# Part (a) by default: every scheme but pairwise_judge (quadratic in K_max).
DEFAULT_POOL = tuple(s for s in SCHEMES if s != "pairwise_judge")
METRICS = ("sample_accuracy", "mixed_groups", "top_right", "pair_accuracy",
           "kendall_tau")


def pool_cell(scale: str, seed: int, *, k_max: int, steps: int,
              extra: Mapping[str, Any] = (),
              config: str = ladder.ARITH) -> common.Cell:
  """A PU-RL run whose rollout store is the pool: lr 0 (every step samples
  from the seed's SFT model), no held-out evaluation; done at its last
  step's stored rollouts."""
  return common.Cell(
      f"pool_k{k_max}_s{seed}", ladder.config_file(scale, config),
      {"recipe": "dpo", "sampling.num_candidates": k_max, "rl.steps": steps,
       "rl.oversample": 1, "opt.learning_rate": 0.0, "data.eval_path": "",
       "rollout_store.enabled": True, "data.shuffle_seed": seed,
       **dict(extra)},
      seed=seed, reference=f"sft_s{seed}",
      done=os.path.join("rollouts", f"step_{steps:08d}", "meta.json"))


def cell_config(workdir: str) -> dict | None:
  """The cell's config.json (what main.py ran with), or None without one."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def store_path(workdir: str, cfg: Mapping[str, Any]) -> str:
  """The cell's rollout store: config `rollout_store.dir`, relative to the
  workdir (os.path.join keeps an absolute one as it is)."""
  return os.path.join(workdir, cfg.get("rollout_store", {}).get(
      "dir", "rollouts"))


def scoring_kwargs(cfg: Mapping[str, Any]) -> dict:
  """`self_scoring.score_group` keyword arguments from a cell's config.json:
  its ranking settings, so a re-scoring ranks as the cell did."""
  r = cfg["ranking"]
  return dict(yes_word=r["yes_word"], no_word=r["no_word"],
              aggregation=r["aggregation"], bt_iters=r["bt_iters"],
              bt_prior=r["bt_prior"], metric=r["metric"],
              pair_opponents=r.get("pair_opponents", 0),
              rows_per_call=r["rows_per_call"],
              pad_multiple=r["pad_multiple"],
              vocab_chunk=cfg["model"]["vocab_chunk"] or None)


def score_pool(workdir: str, schemes: Sequence[str], *,
               pairwise_steps: int) -> list[tuple[int, str]]:
  """Re-scores the pool's steps with every scheme (and oracle) by the
  reference, with the cell's ranking settings; resumable."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import rerank  # pylint: disable=g-import-not-at-top
  from purld_jax import models  # pylint: disable=g-import-not-at-top
  from purld_jax import rollout_store  # pylint: disable=g-import-not-at-top
  cfg = cell_config(workdir)
  store = rollout_store.RolloutStore.open(store_path(workdir, cfg))
  steps = store.steps()
  todo = {s: [x for x in list(schemes) + ["oracle"]
              if PREFIX + x not in store.schemes(s)] for s in steps}
  if not any(todo.values()):
    return []
  model, tok = models.load_pretrained(os.path.join(workdir, "reference"),
                                      dtype=jnp.float32)
  kwargs = scoring_kwargs(cfg)
  done = []
  for scheme in list(schemes) + ["oracle"]:
    use = steps[:pairwise_steps] if scheme == "pairwise_judge" else steps
    t0 = time.perf_counter()
    done += rerank.rerank(store, model, tok, [scheme], prefix=PREFIX,
                          steps=use, **kwargs)
    print(f"[ablation] {scheme}: scored in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
  return done


def agreement(workdir: str, schemes: Sequence[str], ks: Sequence[int],
              seeds: Sequence[int]) -> tuple[list[dict], list[dict]]:
  """(per-seed rows, per scheme x K rows: mean and sd over seeds)."""
  from experiments import rerank  # pylint: disable=g-import-not-at-top
  from purld_jax import rollout_store  # pylint: disable=g-import-not-at-top
  store = rollout_store.RolloutStore.open(
      store_path(workdir, cell_config(workdir)))
  names = [PREFIX + s for s in list(schemes) + ["oracle"]]
  per_seed = rerank.agreement_table(store, names, ks, seeds)
  for r in per_seed:
    r["scheme"] = r["scheme"].removeprefix(PREFIX)
  grid = []
  for scheme in list(schemes) + ["oracle"]:
    for k in ks:
      rs = [r for r in per_seed if r["scheme"] == scheme and r["k"] == k]
      if not rs:
        continue
      row = dict(scheme=scheme, k=k, seeds=len(rs), steps=rs[0]["steps"],
                 prompts=rs[0]["prompts"])
      for m in METRICS:
        v = np.array([r[m] for r in rs], np.float64)
        v = v[np.isfinite(v)]
        row[m] = float(v.mean()) if len(v) else float("nan")
        row[f"{m}_sd"] = float(v.std()) if len(v) > 1 else float("nan")
      grid.append(row)
  return per_seed, grid


def _f(x, fmt="{:.3f}") -> str:
  return "n/a" if x is None or not np.isfinite(x) else fmt.format(x)


def agreement_markdown(grid: Sequence[dict]) -> str:
  body = [[r["scheme"], r["k"], r["prompts"], r["steps"],
           _f(r["mixed_groups"]), _f(r["pair_accuracy"]), _f(r["top_right"]),
           f"{_f(r['kendall_tau'])} ± {_f(r['kendall_tau_sd'])}"]
          for r in grid]
  return analysis.markdown_table(body, [
      "scheme", "K", "prompts", "pool steps", "mixed share", "pair accuracy",
      "top-1 right", "Kendall tau (± sd over seeds)"])


def heatmap(grid: Sequence[dict], path: str, metric: str = "kendall_tau"):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  schemes = list(dict.fromkeys(r["scheme"] for r in grid))
  ks = sorted({r["k"] for r in grid})
  z = np.full((len(schemes), len(ks)), np.nan)
  for r in grid:
    z[schemes.index(r["scheme"]), ks.index(r["k"])] = r[metric]
  fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(ks), 1 + 0.5 * len(schemes)))
  im = ax.imshow(z, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
  for i in range(len(schemes)):
    for j in range(len(ks)):
      ax.text(j, i, _f(z[i, j], "{:.2f}"), ha="center", va="center",
              fontsize=8)
  ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
  ax.set_yticks(range(len(schemes)), schemes)
  ax.set_title(f"{metric} vs oracle (mixed prompts)")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


GATE_MODES = {"gate": 0.0, "shift": "shift", "anchor": "anchor"}


def gate_by_k(workdir: str, schemes: Sequence[str], ks: Sequence[int],
              seeds: Sequence[int], *, prior: float) -> list[dict]:
  """The PU modes' DPO pairs judged by the verifier on the pool, per scheme
  x K (`rerank.gate_table` at pu.delta 0; sub-sampled, mean over seeds):
  net (right-over-wrong minus wrong-over-right pairs per group) and pair
  accuracy for the gate, pu.mode shift and the anchor-as-chosen pairs."""
  from experiments import rerank  # pylint: disable=g-import-not-at-top
  from purld_jax import rollout_store  # pylint: disable=g-import-not-at-top
  store = rollout_store.RolloutStore.open(
      store_path(workdir, cell_config(workdir)))
  got = rerank.gate_table(store, [PREFIX + s for s in schemes], [0.0],
                          prior=prior, ks=ks, seeds=seeds)
  out = []
  for scheme in schemes:
    for k in ks:
      row = dict(scheme=scheme, k=k)
      for mode, delta in GATE_MODES.items():
        rs = [r for r in got if r["scheme"] == PREFIX + scheme
              and r["k"] == k and r["delta"] == delta]
        for m in ("net", "pair_accuracy"):
          v = np.array([r[m] for r in rs], np.float64)
          v = v[np.isfinite(v)]
          row[f"{mode}_{m}"] = float(v.mean()) if len(v) else float("nan")
      out.append(row)
  return out


def gate_markdown(rows: Sequence[dict]) -> str:
  body = [[r["scheme"], r["k"]] + [
      f"{_f(r[f'{m}_net'])} ({_f(r[f'{m}_pair_accuracy'], '{:.2f}')})"
      for m in GATE_MODES] for r in rows]
  return analysis.markdown_table(body, [
      "scheme", "K", "gate (delta 0): net (pair accuracy)", "shift",
      "anchor as chosen"])


def report(runner: common.Runner, cell: common.Cell, out: str, head: str, *,
           schemes: Sequence[str], ks: Sequence[int], seeds: Sequence[int],
           pairwise_steps: int) -> list[dict]:
  """Re-scores the finished pool `cell` (resumable), then writes
  ablation_pool.md/.csv, ablation_pool_rows.csv, ablation_gate.csv and
  kendall_tau.png to `out`; returns the agreement grid (scheme x K)."""
  folder = runner.workdir(cell.name)
  t0 = time.perf_counter()
  score_pool(folder, schemes, pairwise_steps=pairwise_steps)
  per_seed, grid = agreement(folder, schemes, ks, seeds)
  analysis.write_csv(os.path.join(out, "ablation_pool.csv"), grid,
                     ("scheme", "k", "seeds", "steps", "prompts") + METRICS
                     + tuple(f"{m}_sd" for m in METRICS))
  analysis.write_csv(os.path.join(out, "ablation_pool_rows.csv"), per_seed,
                     ("scheme", "k", "seed", "steps", "prompts") + METRICS)
  heatmap(grid, os.path.join(out, "kendall_tau.png"))
  gate = gate_by_k(folder, schemes, ks, seeds,
                   prior=float(cell_config(folder)["pu"]["prior"]))
  analysis.write_csv(os.path.join(out, "ablation_gate.csv"), gate,
                     ("scheme", "k") + tuple(f"{m}_{x}" for m in GATE_MODES
                                             for x in ("net", "pair_accuracy")))
  with open(os.path.join(out, "ablation_pool.md"), "w",
            encoding="utf-8") as f:
    f.write(head + f"## (a) Self-ranking vs the verifier on one pool "
            f"(cell {cell.name})\n\nK candidates sub-sampled per prompt, "
            f"mean over seeds {list(seeds)}; over mixed prompts only "
            f"(chance: pair accuracy 0.5, tau 0). Re-scoring took "
            f"{time.perf_counter() - t0:.0f} s in this call.\n\n"
            + agreement_markdown(grid) + "\n\n"
            "## (a) The PU modes' pairs on the same pool, judged by the "
            "verifier\n\nPer group: net = pairs right over wrong minus "
            "wrong over right (one DPO pair a group); pair accuracy in "
            "brackets; the gate at pu.delta 0 (docs/METHOD.md step 4), "
            "pu.mode shift, and the anchor over the worst candidate.\n\n"
            + gate_markdown(gate) + "\n")
  return grid
