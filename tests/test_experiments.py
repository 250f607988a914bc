"""experiments/: the cell runner, the main table, the ablation's pool and
compare, on the tiny model.

The end-to-end fixture runs real `python -m purld_jax.main` children on
configs/arith.py:tiny (1 SFT and 1 PU-RL step, 4 held-out prompts): the
main table's two cells, then the ablation's pool in the same study folder.
"""

import csv
import io
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from experiments import analysis
from experiments import ablation
from experiments import common
from experiments import ladder
from experiments import main_table
from tests import train_fixtures

# Every cell of the end-to-end tests: one step a stage, synchronous saves.
TINY = ["--scale=tiny", "--seeds=0", "--override=sft.steps=1",
        "--override=rl.steps=1", "--override=ckpt.async_save=False"]


class Counting:
  """A Runner launcher that counts launches (and really launches)."""

  def __init__(self, real=True):
    self.cmds, self.real = [], real

  def __call__(self, cmd, **kwargs):
    self.cmds.append(cmd)
    return common._launch(cmd, **kwargs) if self.real else 0  # pylint: disable=protected-access


def _runner(out, launch):
  return common.Runner(str(out), env=train_fixtures.subprocess_env(),
                       launch=launch, echo=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """experiments.main_table on tiny, untrained + SFT + PU-RLD DPO, seed 0:
  (out dir, launcher, the table's rows)."""
  out = tmp_path_factory.mktemp("study")
  launch = Counting()
  rc = main_table.main(TINY + [f"--out={out}",
                               "--methods=untrained,sft,purld_dpo"],
                       runner=_runner(out, launch))
  assert rc == 0
  with open(out / "main_table.csv", encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  return out, launch, table


def test_main_table_runs_the_ladders_cells(study):
  out, launch, table = study
  names = [c[c.index("-m") + 3].split("/cells/")[1] for c in launch.cmds]
  assert names == ["sft_s0", "purld_dpo_s0"]
  assert [r["method"] for r in table] == ["untrained", "sft", "purld_dpo"]
  assert all(r["status"] == "done" and r["prompts"] == "4" for r in table)
  # gains over SFT: none on the SFT row itself, one on PU-RLD's
  assert table[1]["gain"] == "" and table[2]["gain"] != ""
  assert [r["teacher_calls_per_prompt"] for r in table] == ["0.0", "1.0",
                                                            "1.0"]
  assert float(table[2]["wall_s"]) > 0
  md = (out / "main_table.md").read_text()
  assert "PU-RLD DPO" in md and "SFT on anchors" in md
  assert (out / "main_table.png").stat().st_size > 0
  # The RL cell started from its seed's SFT cell: stage 1 not run again.
  cell = out / "cells" / "purld_dpo_s0"
  assert os.path.realpath(cell / "reference") == str(
      out / "cells" / "sft_s0" / "reference")
  assert "[sft] already done" in (cell / "log.txt").read_text()
  # answers.json (the study's compact file) holds every model's answers
  data = json.loads((out / "answers.json").read_text())
  assert {"sft_s0/before", "sft_s0/sft", "purld_dpo_s0/final"} <= set(data)


def test_finished_cells_are_skipped_and_settings_checked(study):
  out, _, first = study
  launch = Counting()
  assert main_table.main(TINY + [f"--out={out}", "--table_only",
                                 "--methods=untrained,sft,purld_dpo"],
                         runner=_runner(out, launch)) == 0
  assert main_table.main(TINY + [f"--out={out}",
                                 "--methods=untrained,sft,purld_dpo"],
                         runner=_runner(out, launch)) == 0
  assert not launch.cmds
  with open(out / "main_table.csv", encoding="utf-8") as f:
    assert [r["sampled"] or r["greedy"] for r in csv.DictReader(f)] == [
        r["sampled"] or r["greedy"] for r in first]
  # A changed setting of a finished cell stops the study with a short error.
  assert main_table.main(TINY + [f"--out={out}", "--methods=purld_dpo",
                                 "--override=rl.batch_size=4"],
                         runner=_runner(out, Counting(real=False))) == 1


def test_ablation_pool_is_re_ranked_per_k_in_the_same_study(study):
  out, _, _ = study
  launch = Counting()
  got = ablation.main(TINY + [
      f"--out={out}", "--part=pool", "--k_max=4", "--pool_steps=1",
      "--ks=2,4", "--subsample_seeds=0,1",
      "--schemes=anchor_recon,similarity"], runner=_runner(out, launch))
  names = [c[c.index("-m") + 3].split("/cells/")[1] for c in launch.cmds]
  assert names == ["pool_k4_s0"]  # sft_s0 is the main table's
  grid = got["pool"]
  assert [(r["scheme"], r["k"]) for r in grid] == [
      (s, k) for s in ("anchor_recon", "similarity", "oracle") for k in (2, 4)]
  assert all(r["seeds"] == 2 and r["prompts"] > 0 for r in grid)
  assert all(r["pair_accuracy"] == 1.0 for r in grid
             if r["scheme"] == "oracle" and np.isfinite(r["pair_accuracy"]))
  with open(out / "ablation_pool_rows.csv", encoding="utf-8") as f:
    assert len(list(csv.DictReader(f))) == 12  # x 2 sub-sampling seeds
  md = (out / "ablation_pool.md").read_text()
  assert "(a) Self-ranking vs the verifier" in md
  assert "The PU modes' pairs on the same pool" in md
  with open(out / "ablation_gate.csv", encoding="utf-8") as f:
    gate = list(csv.DictReader(f))
  assert [(r["scheme"], r["k"]) for r in gate] == [
      (s, k) for s in ("anchor_recon", "similarity") for k in ("2", "4")]
  # the anchor-as-chosen pairs: one a group, the anchor (right) over a
  # candidate, so never wrong over right: net >= 0
  assert all(float(r["anchor_net"]) >= 0 for r in gate)
  assert (out / "kendall_tau.png").stat().st_size > 0
  # the K plot needs a scheme's pair accuracy: mixed prompts in the pool
  mixed = any(np.isfinite(r["pair_accuracy"]) for r in grid
              if r["scheme"] != "oracle")
  assert (out / "ablation_k.png").exists() == mixed


def test_runner_blocks_without_reference_and_formats_values(tmp_path):
  launch = Counting(real=False)
  runner = _runner(tmp_path, launch)
  cell = common.Cell("x", "configs/demo.py:tiny", {"data.buckets": (64,),
                                                   "export.dir": ""},
                     reference="missing")
  assert runner.run(cell) == "blocked" and not launch.cmds
  assert "--config.data.buckets=(64,)" in runner.command(cell)
  assert "--config.export.dir=" in runner.command(cell)
  buf = io.StringIO()
  runner.dry_run([cell], out=buf)
  assert "# x [todo] (stage 1 from cell missing)" in buf.getvalue()


def _fake_cell(out, name, model, correct):
  """A finished cell folder: eval/<model>.jsonl with `correct` per prompt."""
  d = out / "cells" / name / "eval"
  d.mkdir(parents=True)
  with open(d / f"{model}.jsonl", "w", encoding="utf-8") as f:
    for i, c in enumerate(correct):
      f.write(json.dumps(dict(id=f"p{i}", answer="", tokens=1, finished=True,
                              correct=c)) + "\n")
  (d / "summary.json").write_text("[]")


def test_compare_pairs_two_sides_on_the_same_prompts(tmp_path, capsys):
  from experiments import compare  # pylint: disable=g-import-not-at-top
  _fake_cell(tmp_path, "a", "final", [1, 0, 0, 0])
  _fake_cell(tmp_path, "b0", "final", [1, 1, 0, 0])
  _fake_cell(tmp_path, "b1", "final", [1, 0, 1, 0])
  cells = tmp_path / "cells"
  r = compare.main([f"--a={cells / 'a'}", f"--b={cells / 'b0'},{cells / 'b1'}"])
  # B per prompt (1, .5, .5, 0): .5; A .25; B - A = (0 + .5 + .5 + 0) / 4.
  assert (r["a"], r["b"], r["diff"]) == (.25, .5, .25)
  assert r["diff_lo"] <= .25 <= r["diff_hi"]
  assert (r["only_a"], r["only_b"], r["prompts"]) == (0, 2, 4)
  out = capsys.readouterr().out
  assert "B - A over 4 prompts: +25.0 pt" in out
  # b0 and b1 each gain +25 alone (on different prompts), so drawing a
  # seed twice keeps the mean; the interval holds it
  assert (r["seeds_a"], r["seeds_b"]) == (1, 2)
  assert r["diff_lo_seeds"] <= .25 <= r["diff_hi_seeds"]
  assert "over seeds (1 A, 2 B) and prompts: [" in out
  # one folder a side: the same interval as the paired CI, not printed
  one = compare.main([f"--a={cells / 'a'}", f"--b={cells / 'b0'}"])
  assert (one["diff_lo_seeds"], one["diff_hi_seeds"]) == pytest.approx(
      (one["diff_lo"], one["diff_hi"]), abs=1e-12)
  assert "over seeds" not in capsys.readouterr().out
  with pytest.raises(FileNotFoundError, match="sft.jsonl"):
    compare.compare([str(cells / "a")], [str(cells / "b0")], model_a="sft")
  (cells / "a" / "eval" / "final.jsonl").write_text(
      json.dumps(dict(id="other", answer="", tokens=1, finished=True,
                      correct=1)) + "\n")
  with pytest.raises(ValueError, match="held-out prompts differ"):
    compare.compare([str(cells / "a")], [str(cells / "b0")])


def test_compare_studies_pairs_cells_by_name_and_pools_their_seeds(tmp_path):
  from experiments import compare  # pylint: disable=g-import-not-at-top
  a, b = tmp_path / "grid", tmp_path / "gate"
  _fake_cell(a, "sft", "sft", [1, 0, 0, 0])
  _fake_cell(b, "sft", "sft", [1, 0, 0, 0])
  _fake_cell(a, "k4_judge_dpo_s0", "final", [0, 0, 0, 0])
  _fake_cell(a, "k2_pmi_ldl_s0", "final", [1, 1, 0, 0])   # only in A
  _fake_cell(b, "k4_judge_dpo_s0", "final", [1, 1, 0, 0])
  _fake_cell(b, "k4_judge_dpo_s3", "final", [1, 1, 1, 0])
  _fake_cell(b, "k4_judge_dpo_s9", "sft", [1, 1, 1, 1])   # unfinished: no final
  # Kept copies count (A's seed 1 is only kept); a seed in both cells/ and
  # kept/ is read from cells/ (A's seed 0: kept says all wrong but one).
  _fake_cell(tmp_path / "k", "k4_judge_dpo_s1", "final", [1, 0, 0, 0])
  _fake_cell(tmp_path / "k", "k4_judge_dpo_s0", "final", [1, 1, 1, 0])
  (tmp_path / "k" / "cells").rename(a / "kept")
  cells = compare.study_cells(str(a))
  assert list(cells) == ["k2_pmi_ldl", "k4_judge_dpo"]
  assert list(cells["k4_judge_dpo"]) == [0, 1]
  assert cells["k4_judge_dpo"][1].endswith("kept/k4_judge_dpo_s1")
  assert cells["k4_judge_dpo"][0].endswith("cells/k4_judge_dpo_s0")
  assert list(compare.study_cells(str(b))["k4_judge_dpo"]) == [0, 3]
  # What separates the studies: the cells' overrides (cell.json), here the
  # gate set in B only and the K changed; kept/ copies carry theirs too.
  def overrides(folder, **kw):
    (folder / "cell.json").write_text(json.dumps(dict(overrides=dict(
        {"recipe": "dpo", "sampling.num_candidates": "4"}, **kw))))
  overrides(a / "cells" / "k4_judge_dpo_s0")
  overrides(a / "kept" / "k4_judge_dpo_s1")
  for seed in (0, 3):
    overrides(b / "cells" / f"k4_judge_dpo_s{seed}",
              **{"ranking.gate": "number", "sampling.num_candidates": "8"})
  assert compare.override_diff(
      list(compare.study_cells(str(a))["k4_judge_dpo"].values()),
      list(compare.study_cells(str(b))["k4_judge_dpo"].values())) == (
          "ranking.gate: - -> number; sampling.num_candidates: 4 -> 8")
  out = tmp_path / "out"
  rows = compare.main([f"--study_a={a}", f"--study_b={b}", f"--out={out}"])
  (r,) = rows
  assert r["overrides"] == (
      "ranking.gate: - -> number; sampling.num_candidates: 4 -> 8")
  # the same overrides: none; a seed without cell.json or seeds that
  # disagree: n/a
  cells_a = list(compare.study_cells(str(a))["k4_judge_dpo"].values())
  assert compare.override_diff(cells_a, cells_a) == "none"
  assert compare.override_diff(cells_a, cells_a + [str(tmp_path)]) == "n/a"
  overrides(a / "kept" / "k4_judge_dpo_s1", recipe="grpo")
  assert compare.override_diff(cells_a, cells_a) == "n/a"
  # A per prompt (.5, 0, 0, 0): .125; B (1, 1, .5, 0): .625; B - A = .5.
  assert r["cell"] == "k4_judge_dpo" and (r["seeds_a"], r["seeds_b"]) == (2, 2)
  assert (r["a"], r["b"], r["diff"]) == (.125, .625, .5)
  assert (r["only_a"], r["only_b"]) == (0, 3)
  assert r["acc_b_seeds"] == {0: .5, 3: .75}
  md = (out / "compare.md").read_text()
  assert "| k4_judge_dpo | s0 0.0, s1 25.0 | s0 50.0, s3 75.0 | +50.0 [" in md
  assert "| 0 / 3 | ranking.gate: - -> number; sampling.num" in md
  assert "Only in A (1): k2_pmi_ldl." in md
  assert "the same held-out answers in both studies" in md
  assert (out / "compare.png").stat().st_size > 0
  assert "k4_judge_dpo,2,2," in (out / "compare.csv").read_text()
  # Another SFT model in B: said in the table.
  (b / "cells" / "sft" / "eval" / "sft.jsonl").unlink()
  (b / "cells" / "sft").rename(tmp_path / "old_sft")
  _fake_cell(b, "sft", "sft", [0, 0, 0, 1])
  assert "answers differ** (2 prompts" in compare.sft_check(str(a), str(b))
  with pytest.raises(SystemExit):
    compare.main([f"--study_a={a}", f"--study_b={b}"])   # no --out


class FakeCell:
  """A launcher that 'runs' a cell by writing a finished cell's files: small
  JSON/JSONL results, a large metrics file, weights and a nested JSON."""

  def __init__(self):
    self.cmds = []

  def __call__(self, cmd, **kwargs):
    self.cmds.append(cmd)
    workdir = next(a.split("=", 1)[1] for a in cmd if
                   a.startswith("--workdir="))
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "final"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "final.jsonl"), "w") as f:
      f.write(json.dumps(dict(id="p0", answer="", tokens=1, finished=True,
                              correct=1)) + "\n")
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(dict(seed=0), f)
    with open(os.path.join(workdir, "big.jsonl"), "w") as f:
      f.write("x" * (common.KEEP_MAX_BYTES + 1))
    with open(os.path.join(workdir, "final", "model.json"), "w") as f:
      f.write("{}")
    with open(os.path.join(workdir, "final", "w.safetensors"), "wb") as f:
      f.write(b"\0" * 16)
    with open(os.path.join(workdir, common.SUMMARY), "w") as f:
      f.write("[]")
    return 0


def test_kept_results_outlive_the_cell_folder(tmp_path):
  launch = FakeCell()
  runner = _runner(tmp_path, launch)
  cell = common.Cell("k4_pmi_ldl_s0", "configs/demo.py:tiny", {"recipe": "ldl"})
  assert runner.run(cell) == "done" and len(launch.cmds) == 1
  kept = tmp_path / "kept" / "k4_pmi_ldl_s0"
  got = sorted(str(p.relative_to(kept)) for p in kept.rglob("*")
               if p.is_file())
  # Small JSON/JSONL files at the top and in eval/ only: not the file over
  # KEEP_MAX_BYTES, not final/ (weights).
  assert got == ["cell.json", "config.json", "eval/final.jsonl",
                 "eval/summary.json"]
  shutil.rmtree(tmp_path / "cells")  # a fresh clone: the folder is gone
  assert runner.is_done(cell)
  assert runner.results(cell.name) == str(kept)
  assert runner.run(cell) == "skipped" and len(launch.cmds) == 1
  assert not (tmp_path / "cells" / cell.name).exists()  # nothing recreated
  a = analysis.cell_answers(runner, cell.name, "final")
  assert a.ids == ("p0",) and list(a.correct) == [1]
  # Settings are still checked against the kept copy.
  changed = common.Cell(cell.name, cell.config, {"recipe": "dpo"})
  with pytest.raises(common.CellError, match="other settings"):
    runner.run(changed)
  # A cell whose reference has only kept results cannot start: it needs the
  # reference's weights, and says where the kept copy is.
  child = common.Cell("x", "configs/demo.py:tiny", reference=cell.name)
  assert runner.run(child) == "blocked" and len(launch.cmds) == 1
  assert runner.lost() == []
  shutil.rmtree(tmp_path / "kept")  # a cell finished before kept/ existed
  assert runner.lost() == [cell.name]  # cells.jsonl still says it is done


def test_what_a_cell_reports_is_not_a_setting(tmp_path):
  """eval.models picks which models a cell evaluates, not what it trains: a
  re-run with another value is the same finished cell; any other change is
  an error."""
  launch = FakeCell()
  runner = _runner(tmp_path, launch)
  cell = common.Cell("sft_s1", "configs/arith.py", {"recipe": "sft"}, seed=1)
  assert runner.run(cell) == "done"
  again = common.Cell(cell.name, cell.config,
                      {"recipe": "sft", "eval.models": "sft"}, seed=1)
  assert runner.run(again) == "skipped" and len(launch.cmds) == 1
  with pytest.raises(common.CellError, match="other settings"):
    runner.run(common.Cell(cell.name, cell.config, {"recipe": "sft"}, seed=2))


def test_adopt_reference_shares_the_sft_answers_through_a_linked_reference(
    tmp_path):
  # The reference cell lives in another study and is linked in (ablation
  # --reference_from); its sft answers name its own reference/ path.
  ref = tmp_path / "main" / "cells" / "sft"
  (ref / "reference").mkdir(parents=True)
  (ref / "eval").mkdir()
  (ref / "eval" / "sft.jsonl").write_text("{}\n")
  (ref / "eval" / "sft.settings.json").write_text(json.dumps(dict(
      source=str(ref / "reference"), num_prompts=0)))
  link = tmp_path / "study" / "cells" / "sft"
  link.parent.mkdir(parents=True)
  link.symlink_to(ref)
  cell = tmp_path / "study" / "cells" / "k4_pmi_ldl_s0"
  common.adopt_reference(str(cell), str(link))
  meta = json.loads((cell / "eval" / "sft.settings.json").read_text())
  # Rewritten to this cell's reference/, so heldout.py re-uses the answers.
  assert meta == dict(source=str(cell / "reference"), num_prompts=0)
  assert (cell / "eval" / "sft.jsonl").read_text() == "{}\n"
  assert os.path.realpath(cell / "reference") == str(ref / "reference")


class _Trapping(common.Runner):
  """A runner whose cells are a child that waits for SIGTERM, notes it in
  its workdir and exits 143 (what purld_jax.main does after saving)."""

  def command(self, cell):
    workdir = self.workdir(cell.name)
    code = ("import os, signal, sys, time\n"
            f"d = {workdir!r}\n"
            "def term(*_):\n"
            "  open(os.path.join(d, 'got_term'), 'w').close(); sys.exit(143)\n"
            "signal.signal(signal.SIGTERM, term)\n"
            "open(os.path.join(d, 'started'), 'w').close()\n"
            "time.sleep(60)\n")
    return [self.python, "-c", code]


def test_sigterm_reaches_the_running_cell_and_stops_the_study(tmp_path):
  runner = _Trapping(str(tmp_path), echo=False)
  cells = [common.Cell(n, "configs/demo.py:tiny", {}) for n in ("a", "b")]
  started = os.path.join(runner.workdir("a"), "started")

  def signal_when_started():
    deadline = time.time() + 60
    while not os.path.exists(started) and time.time() < deadline:
      time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGTERM)  # to the study, not the cell

  before = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=signal_when_started, daemon=True).start()
  with pytest.raises(SystemExit) as e:
    runner.run_all(cells)
  assert e.value.code == 143
  assert os.path.exists(os.path.join(runner.workdir("a"), "got_term"))
  assert not os.path.exists(runner.workdir("b"))  # the study stopped
  with open(os.path.join(tmp_path, common.LOG), encoding="utf-8") as f:
    recs = [json.loads(line) for line in f]
  assert [(r["name"], r["status"], r["rc"]) for r in recs] == [
      ("a", "stopped", 143)]
  assert signal.getsignal(signal.SIGTERM) is before


def test_teacher_calls_per_drawn_prompt_by_hand():
  # the anchor (recorded once) for every trained row; RLAIF adds K
  # judgements each time a prompt is drawn; the untrained student none.
  assert main_table.teacher_calls("untrained", 4) == 0.0
  assert main_table.teacher_calls("purld_dpo", 4) == 1.0
  assert main_table.teacher_calls("teacher_judge_dpo", 4) == 5.0
  assert main_table.teacher_calls("teacher_judge_dpo", 8) == 9.0
  assert ladder.setting("configs/arith.py", "sampling.num_candidates") == 4
  assert ladder.setting(ladder.config_file("tiny"),  # common.tiny: K 2
                        "sampling.num_candidates") == 2
  assert ladder.setting("configs/arith.py", "sampling.num_candidates",
                        {"sampling.num_candidates": 8}) == 8
  # the rung's cell command asks the served teacher for judgements
  cell = [c for c in ladder.cells(["teacher_judge_dpo"], [0], scale="small",
                                  split="dev") if c.name.startswith("teach")]
  assert cell[0].overrides["ranking.scheme"] == "teacher_judge"
  assert cell[0].overrides["ranking.judge_url"] == "http://127.0.0.1:8080/v1"
  assert cell[0].reference == "sft_s0"
