"""experiments.ablation: its cells (the ladder's, K x scheme x loss) and the
trained rows' gains, worked by hand on made-up answers."""

import json
import os
import re

import numpy as np
import pytest

from experiments import analysis
from experiments import ablation
from experiments import common

N = 100


def _write_cell(runner, cell, models):
  """A finished cell folder: eval/<model>.jsonl (greedy and sampled) and
  summary.json; `models` {model: bool[N] right}."""
  d = os.path.join(runner.workdir(cell), "eval")
  os.makedirs(d, exist_ok=True)
  for model, correct in models.items():
    for suffix in ("", ".sampled"):
      with open(os.path.join(d, f"{model}{suffix}.jsonl"), "w",
                encoding="utf-8") as f:
        for i, c in enumerate(correct):
          f.write(json.dumps(dict(id=f"e{i:03d}", answer="x", tokens=9,
                                  finished=True, correct=float(c))) + "\n")
  with open(os.path.join(d, "summary.json"), "w", encoding="utf-8") as f:
    json.dump([], f)


def test_the_protocol_cell_is_the_main_tables():
  """At configs/arith.py's K and the ladder's scheme a (b) cell carries no
  tag, so the main table's cell serves both studies."""
  from configs import arith  # pylint: disable=g-import-not-at-top
  assert arith.get_config().sampling.num_candidates == ablation.PROTOCOL_K
  assert ablation.tag(ablation.PROTOCOL_K, ablation.PROTOCOL_SCHEME) == ""
  assert ablation.tag(8, "pmi") == "_k8_pmi"


def test_dry_run_lists_the_pool_then_k_x_seed(capsys, tmp_path):
  ablation.main(["--dry_run", "--ks=2,4", "--seeds=0,1", f"--out={tmp_path}",
                 "--train_override=opt.learning_rate=5e-6"])
  out = capsys.readouterr().out
  blocks = dict(re.findall(r"^# (\S+) \[todo\].*\n(.*)$", out, re.M))
  assert list(blocks) == ["sft_s0", "sft_s1", "pool_k16_s0",
                          "purld_dpo_k2_anchor_recon_s0",
                          "purld_dpo_k2_anchor_recon_s1",
                          "purld_dpo_s0", "purld_dpo_s1"]
  k2 = blocks["purld_dpo_k2_anchor_recon_s1"]
  assert "--config.sampling.num_candidates=2" in k2
  assert "--config.seed=1" in k2
  assert "sampling.num_candidates" not in blocks["purld_dpo_s0"]
  assert "--config.opt.learning_rate=5e-06" in k2 or \
      "--config.opt.learning_rate=5e-6" in k2
  pool = blocks["pool_k16_s0"]
  assert "--config.opt.learning_rate=0.0" in pool
  assert "--config.sampling.num_candidates=16" in pool
  assert "learning_rate=5e-6" not in pool and "learning_rate" not in \
      blocks["sft_s0"]


def test_trained_rows_pair_each_k_with_its_seeds_sft(tmp_path):
  runner = common.Runner(str(tmp_path), echo=False)
  right = lambda k: np.arange(N) < k  # the first k prompts right
  for s in (0, 1):
    _write_cell(runner, f"sft_s{s}", {"before": right(10),
                                      "sft": right(40 + s)})
    # K = 2: 10 prompts more than the seed's SFT; K = 4 (the main table's
    # cell): 20 more.
    _write_cell(runner, f"purld_dpo_k2_anchor_recon_s{s}",
                {"final": right(50 + s)})
    _write_cell(runner, f"purld_dpo_s{s}", {"final": right(60 + s)})
  rows = ablation.train_rows(runner, str(tmp_path), [2, 4, 8],
                             ["anchor_recon"], ["purld_dpo"], [0, 1])
  assert [(r["k"], r["status"]) for r in rows] == [
      (2, "done"), (4, "done"), (8, "not run")]
  assert rows[0]["gain"] == pytest.approx(0.10)
  assert rows[1]["gain"] == pytest.approx(0.20)
  assert rows[1]["greedy_gain"] == pytest.approx(0.20)
  assert rows[1]["accuracy"] == pytest.approx(0.605)
  assert rows[0]["seeds"] == 2 and rows[0]["gain_lo"] > 0
  md = ablation.train_markdown(rows)
  assert "| PU-RLD DPO | anchor_recon | 8 | not run |" in md
  data = json.loads((tmp_path / analysis.ANSWERS).read_text())
  assert "purld_dpo_k2_anchor_recon_s1/final" in data
  pool = [dict(scheme="pmi", k=2, pair_accuracy=.6),
          dict(scheme="pmi", k=8, pair_accuracy=.7),
          dict(scheme="oracle", k=2, pair_accuracy=1.0),
          dict(scheme="judge", k=2, pair_accuracy=float("nan"))]
  ablation.k_plot(rows, pool, str(tmp_path / "k.png"))
  assert (tmp_path / "k.png").stat().st_size > 0


def test_bad_lists_are_short_errors(capsys):
  with pytest.raises(SystemExit):
    ablation.main(["--losses=purld_dpo,nope"])
  assert "--losses: unknown ['nope']" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    ablation.main(["--ks=2,32", "--k_max=16"])
  assert "above --k_max" in capsys.readouterr().err


def test_a_pool_without_mixed_prompts_plots_nothing(tmp_path):
  nan = float("nan")
  ablation.k_plot([], [dict(scheme="pmi", k=2, pair_accuracy=nan)],
                  str(tmp_path / "k.png"))
  assert not (tmp_path / "k.png").exists()
