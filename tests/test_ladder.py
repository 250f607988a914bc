"""experiments.ladder: cells, the compact answers file, gains and verdicts.

The answers are made by hand (every prompt right or wrong by construction),
so each gain is known exactly and the verdict follows from the rule.
"""

import json
import os

import numpy as np
import pytest

from experiments import analysis
from experiments import common
from experiments import ladder

N = 500


def _write_cell(runner, cell, models):
  """A finished cell folder: eval/<model>.jsonl (answers) + summary.json."""
  d = os.path.join(runner.workdir(cell), "eval")
  os.makedirs(d, exist_ok=True)
  for model, correct in models.items():
    with open(os.path.join(d, f"{model}.jsonl"), "w", encoding="utf-8") as f:
      for i, c in enumerate(correct):
        f.write(json.dumps(dict(id=f"eval-{i:04d}", answer="x", tokens=9,
                                finished=True, correct=bool(c))) + "\n")
  with open(os.path.join(d, "summary.json"), "w", encoding="utf-8") as f:
    json.dump([], f)


def _right(k):
  """The first k of N prompts right."""
  return np.arange(N) < k


def _study(tmp_path, oracle_right):
  """3 seeds: untrained 150/500 right, sft 150 + seed (the same prompts
  plus `seed` more), oracle GRPO `oracle_right(seed)`."""
  runner = common.Runner(str(tmp_path), echo=False)
  for s in range(3):
    _write_cell(runner, f"sft_s{s}", {"before": _right(150),
                                      "sft": _right(150 + s)})
    _write_cell(runner, f"oracle_grpo_s{s}", {"final": oracle_right(s)})
  rungs = ["untrained", "sft", "oracle_grpo"]
  data = analysis.compact(runner, str(tmp_path), rungs, [0, 1, 2])
  return {r["rung"]: r for r in ladder.rows(data, rungs, [0, 1, 2])}


def test_gains_are_paired_by_seed_and_verdicts_follow_the_rules(tmp_path):
  # oracle: sft's prompts + 50 more for every seed -> gain exactly +10 pt.
  rows = _study(tmp_path, lambda s: _right(200 + s))
  assert rows["untrained"]["accuracy"] == pytest.approx(0.3)
  # sft gains (0 + 1 + 2) / 3 / 500 over untrained: not below it -> PASS
  assert rows["sft"]["gain"] == pytest.approx(1 / 500)
  assert rows["sft"]["verdict"].startswith("PASS")
  o = rows["oracle_grpo"]
  assert o["gain"] == pytest.approx(0.1) and o["gain_lo"] > 0.05
  assert o["verdict"] == "PASS: beats SFT, interval clear of zero"
  assert o["ended"] == 1.0 and o["prompts"] == N and o["seeds"] == 3


def test_an_oracle_that_does_not_beat_sft_fails(tmp_path):
  # oracle equals each seed's sft answers: gain 0, interval [0, 0] -> FAIL
  rows = _study(tmp_path, lambda s: _right(150 + s))
  assert rows["oracle_grpo"]["gain"] == 0.0
  assert rows["oracle_grpo"]["verdict"].startswith("FAIL")


def test_sft_significantly_below_untrained_fails(tmp_path):
  runner = common.Runner(str(tmp_path), echo=False)
  for s in range(3):  # SFT loses 100 of the 150 right prompts
    _write_cell(runner, f"sft_s{s}", {"before": _right(150),
                                      "sft": _right(50)})
  data = analysis.compact(runner, str(tmp_path), ["untrained", "sft"], [0, 1, 2])
  rows = ladder.rows(data, ["untrained", "sft"], [0, 1, 2])
  assert rows[1]["gain"] == pytest.approx(-0.2)
  assert rows[1]["verdict"].startswith("FAIL: not significantly below")


def test_table_is_rebuilt_from_the_compact_file_alone(tmp_path):
  _study(tmp_path, lambda s: _right(200))
  rungs = ["untrained", "sft", "oracle_grpo"]
  # the cell folders are gone (a fresh clone): answers.json still holds all
  fresh = common.Runner(str(tmp_path / "elsewhere"), echo=False)
  os.makedirs(fresh.study_dir)
  os.replace(tmp_path / analysis.ANSWERS, tmp_path / "elsewhere" / analysis.ANSWERS)
  data = analysis.compact(fresh, fresh.study_dir, rungs, [0, 1, 2])
  rows = ladder.rows(data, rungs, [0, 1, 2])
  assert [r["status"] for r in rows] == ["done"] * 3
  assert rows[2]["gain"] == pytest.approx(np.mean([50, 49, 48]) / N)
  rec = data["oracle_grpo_s0/final"]
  assert rec["correct"] == "1" * 200 + "0" * 300 and rec["ended"] == "1" * N


def test_few_seeds_or_prompts_are_not_a_publishable_verdict(tmp_path):
  runner = common.Runner(str(tmp_path), echo=False)
  _write_cell(runner, "sft_s0", {"before": _right(10), "sft": _right(10)})
  _write_cell(runner, "oracle_grpo_s0", {"final": _right(400)})
  rungs = ["untrained", "sft", "oracle_grpo"]
  rows = ladder.rows(analysis.compact(runner, str(tmp_path), rungs, [0]),
                     rungs, [0])
  assert "not a verdict to publish" in rows[2]["verdict"]


def test_dry_run_lists_sft_then_rungs_from_their_seed(capsys):
  assert ladder.main(["--dry_run", "--seeds=0,1",
                      "--rungs=untrained,sft,oracle_grpo,purld_dpo",
                      "--out=/tmp/ladder_dry"]) == 0
  cells = ladder.cells(["untrained", "sft", "oracle_grpo", "purld_dpo"],
                       [0, 1], scale="small", split="eval")
  assert [c.name for c in cells] == [
      "sft_s0", "sft_s1", "oracle_grpo_s0", "oracle_grpo_s1",
      "purld_dpo_s0", "purld_dpo_s1"]
  assert cells[3].reference == "sft_s1"
  assert cells[2].overrides["ranking.scheme"] == "oracle"
  assert cells[4].overrides["ranking.scheme"] == "anchor_recon"
  assert cells[0].overrides["data.eval_path"] == "data/arith/eval.jsonl"
  assert "eval.models" not in cells[0].overrides  # evaluates the untrained
  assert cells[1].overrides["eval.models"] == "sft"
  assert cells[2].overrides["eval.models"] == "final"
  assert "sft_s1" in capsys.readouterr().out


def test_bad_rung_is_a_short_error(capsys):
  with pytest.raises(SystemExit):
    ladder.main(["--rungs=sft,nope"])
  assert "unknown ['nope']" in capsys.readouterr().err


def test_a_sweep_point_overrides_and_names_only_the_stage2_cells():
  cells = ladder.cells(["sft", "oracle_grpo"], [0], scale="small",
                       split="dev", train={"opt.learning_rate": 2e-6},
                       tag="_lr2e-6")
  assert [c.name for c in cells] == ["sft_s0", "oracle_grpo_lr2e-6_s0"]
  assert "opt.learning_rate" not in cells[0].overrides
  assert cells[1].overrides["opt.learning_rate"] == 2e-6
  assert cells[1].overrides["data.eval_path"] == "data/arith/dev.jsonl"
  assert cells[1].reference == "sft_s0"


def test_curves_read_the_kept_stage2_metrics(tmp_path):
  rows = [{"stage": "sft", "step": 1, "kl": 9.0},
          {"stage": "grpo", "step": 1, "oracle_sample_accuracy": 0.25,
           "kl": 0.0, "entropy": 0.5},
          {"stage": "grpo", "step": 2, "oracle_sample_accuracy": 0.75,
           "kl": 0.01}]
  for name in ("oracle_grpo_s0", "sft_s0"):
    (tmp_path / "kept" / name).mkdir(parents=True)
    (tmp_path / "kept" / name / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
  got = analysis.curves(str(tmp_path))
  assert got == {"oracle_grpo_s0": {
      "step": [1, 2], "oracle_sample_accuracy": [0.25, 0.75],
      "kl": [0.0, 0.01], "entropy": [0.5, None]}}
  analysis.plot_curves(got, str(tmp_path / "curves.png"))
  assert (tmp_path / "curves.png").stat().st_size > 0


def test_sampled_pass_at_1_is_its_own_table_and_decides_first(tmp_path):
  """eval/<model>.sampled.jsonl (shares right of a prompt's samples) make a
  second table, the Protocol's, listed first; its gains are paired means
  of those shares, computed here by hand."""
  runner = common.Runner(str(tmp_path), echo=False)
  greedy = {"before": _right(150), "sft": _right(200)}
  for s in range(3):
    _write_cell(runner, f"sft_s{s}", greedy)
    _write_cell(runner, f"oracle_grpo_s{s}", {"final": _right(200)})
    d = os.path.join(runner.workdir(f"sft_s{s}"), "eval")
    for model, share in (("before", 0.25), ("sft", 0.5)):
      _write_sampled(d, model, np.full(N, share))
    _write_sampled(os.path.join(runner.workdir(f"oracle_grpo_s{s}"), "eval"),
                   "final", np.where(np.arange(N) < 250, 0.875, 0.5))
  rungs = ["untrained", "sft", "oracle_grpo"]
  data = analysis.compact(runner, str(tmp_path), rungs, [0, 1, 2])
  by = ladder.tables(data, rungs, [0, 1, 2])
  assert list(by) == ["sampled", "greedy"]
  s = {r["rung"]: r for r in by["sampled"]}
  assert s["sft"]["gain"] == pytest.approx(0.25)
  # half the prompts gain 0.375, the other half 0: +0.1875, clear of zero
  assert s["oracle_grpo"]["gain"] == pytest.approx(0.1875)
  assert s["oracle_grpo"]["verdict"].startswith("PASS")
  assert s["oracle_grpo"]["ended"] == 1.0
  g = {r["rung"]: r for r in by["greedy"]}
  assert g["oracle_grpo"]["gain"] == 0.0
  assert g["oracle_grpo"]["verdict"].startswith("FAIL")
  got = ladder.write(runner, rungs, [0, 1, 2], str(tmp_path), "# t\n\n")
  assert got == by
  text = (tmp_path / "ladder.md").read_text()
  assert text == ladder.report(by, "# t\n\n")
  csv = (tmp_path / "ladder.csv").read_text().splitlines()
  assert len(csv) == 1 + 6 and csv[1].startswith("sampled,untrained")
  assert (tmp_path / "ladder.png").exists()
  assert text.index("## Sampled pass@1") < text.index("## Greedy accuracy")
  # without sampled answers: the greedy table alone
  assert list(ladder.tables({k: v for k, v in data.items()
                             if not k.endswith(analysis.SAMPLED)},
                            rungs, [0, 1, 2])) == ["greedy"]


def _write_sampled(d, model, share, ended=1.0):
  with open(os.path.join(d, f"{model}.sampled.jsonl"), "w",
            encoding="utf-8") as f:
    for i, c in enumerate(share):
      f.write(json.dumps(dict(id=f"eval-{i:04d}", answer="x", tokens=9.5,
                              finished=ended, correct=float(c))) + "\n")


def test_the_untrained_student_is_read_from_any_seed(tmp_path):
  """The initial student is one model decoded with seed-free draws: a seed
  whose SFT cell skipped it (eval.models=sft) reads another seed's copy."""
  runner = common.Runner(str(tmp_path), echo=False)
  _write_cell(runner, "sft_s0", {"before": _right(150), "sft": _right(200)})
  _write_cell(runner, "sft_s1", {"sft": _right(250)})
  rungs = ["untrained", "sft"]
  data = analysis.compact(runner, str(tmp_path), rungs, [0, 1])
  rows = {r["rung"]: r for r in ladder.rows(data, rungs, [0, 1])}
  assert rows["untrained"]["seeds"] == 2
  assert rows["untrained"]["accuracy"] == pytest.approx(0.3)
  # sft gains 50 and 100 prompts over the same untrained answers
  assert rows["sft"]["gain"] == pytest.approx(75 / N)


def test_no_verdict_rests_on_answers_that_did_not_end(tmp_path):
  """A rung compared with a row whose answers ended below 95 % gets no
  verdict, whatever its interval says."""
  runner = common.Runner(str(tmp_path), echo=False)
  _write_cell(runner, "sft_s0", {"before": _right(150), "sft": _right(300)})
  d = os.path.join(runner.workdir("sft_s0"), "eval")
  _write_sampled(d, "sft", np.full(N, 0.6))
  _write_sampled(d, "before", np.full(N, 0.1), ended=0.9)  # 90 % ended
  rungs = ["untrained", "sft"]
  by = ladder.tables(analysis.compact(runner, str(tmp_path), rungs, [0]),
                     rungs, [0])
  s = {r["rung"]: r for r in by["sampled"]}
  assert s["sft"]["gain"] == pytest.approx(0.5)
  assert s["sft"]["verdict"] == (
      "NO VERDICT: answers ended (untrained 90.0 %) below 95 %")
  assert by["greedy"][1]["verdict"].startswith("PASS")


def test_one_more_rung_keeps_the_rows_already_in_the_table(tmp_path):
  """Running anchor_dpo alone (seed 0) after a 3-seed oracle study rebuilds
  ladder.md with the oracle rows still in it; another tag's cells stay
  out."""
  _study(tmp_path, lambda s: _right(200))
  runner = common.Runner(str(tmp_path), echo=False)
  _write_cell(runner, "anchor_dpo_s0", {"final": _right(175)})
  _write_cell(runner, "anchor_dpo_lr1e-5_s0", {"final": _right(400)})
  analysis.compact(runner, str(tmp_path), ["anchor_dpo"], [0], "_lr1e-5")
  got = ladder.write(runner, ["untrained", "sft", "anchor_dpo"], [0],
                     str(tmp_path), "# t\n\n")
  rows = {r["rung"]: r for r in got["greedy"]}
  assert list(rows) == ["untrained", "sft", "oracle_grpo", "anchor_dpo"]
  assert rows["oracle_grpo"]["seeds"] == 3
  # anchor DPO seed 0: 175 right against sft_s0's 150 -> +5 pt, not +50
  assert rows["anchor_dpo"]["gain"] == pytest.approx(25 / N)
  text = (tmp_path / "ladder.md").read_text()
  assert "rungs untrained,sft,oracle_grpo,anchor_dpo; seeds 0,1,2" in text


def test_another_tasks_config_gets_its_own_splits_and_folder(capsys):
  """--config=configs/vlm_shapes.py (image prompts): the held-out files sit
  beside its training file, the study folder is named for it, and a dry
  run creates nothing."""
  assert ladder.split_path(ladder.ARITH, "dev") == "data/arith/dev.jsonl"
  assert ladder.split_path("configs/vlm_shapes.py", "eval") == os.path.join(
      "data", "shapes", "eval.jsonl")
  assert ladder.main(["--dry_run", "--seeds=0", "--config=configs/vlm_shapes.py",
                      "--rungs=untrained,sft,purld_grpo"]) == 0
  out = capsys.readouterr().out
  assert "--config=configs/vlm_shapes.py " in out
  assert "--config.data.eval_path=data/shapes/eval.jsonl" in out
  assert "experiments/ladder/vlm_shapes_small_eval/cells/purld_grpo_s0" in out
  assert not os.path.exists(os.path.join(common.ROOT, "experiments", "ladder",
                                         "vlm_shapes_small_eval"))


@pytest.mark.slow
def test_the_multimodal_row_runs_on_the_tiny_vlm(tmp_path):
  """The ladder on configs/vlm_shapes.py:tiny (a tiny random Idefics3,
  image prompts, one step a stage): SFT and PU-RLD GRPO cells finish and
  the table has their rows."""
  from tests import train_fixtures  # pylint: disable=g-import-not-at-top
  runner = common.Runner(str(tmp_path), env=train_fixtures.subprocess_env(),
                         echo=False)
  assert ladder.main(["--scale=tiny", "--seeds=0", f"--out={tmp_path}",
                      "--config=configs/vlm_shapes.py",
                      "--rungs=untrained,sft,purld_grpo",
                      "--override=sft.steps=1", "--override=rl.steps=1",
                      "--override=ckpt.async_save=False"],
                     runner=runner) == 0
  data = json.loads((tmp_path / analysis.ANSWERS).read_text())
  assert {"sft_s0/before", "sft_s0/sft", "purld_grpo_s0/final"} <= set(data)
  assert "PU-RLD GRPO" in (tmp_path / "ladder.md").read_text()
