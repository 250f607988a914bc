"""experiments/: the cell runner, main_table and ablation on the tiny model.

The two end-to-end tests run real `python -m purld_jax.main` children on
configs/demo.py:tiny (16 train prompts, 1 SFT and 1 PU-RL step, 4 held-out
prompts): about a minute each.
"""

import csv
import io
import json
import math
import os
import re
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from experiments import ablation
from experiments import common
from experiments import main_table
from tests import fixtures_teacher
from tests import train_fixtures

# Every cell of the end-to-end tests: short runs on the small train file.
TINY = ["--scale=tiny", f"--override=data.train_path="
        f"{train_fixtures.small_train_path()}", "--override=sft.steps=1",
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
def main_study(tmp_path_factory):
  """experiments.main_table on tiny with two methods; (out dir, launcher)."""
  out = tmp_path_factory.mktemp("main_table")
  launch = Counting()
  table = main_table.main(TINY + [f"--out={out}",
                                  "--methods=sft_only,purld_dpo"],
                          runner=_runner(out, launch))
  return out, launch, table


def test_main_table_writes_one_row_per_method(main_study):
  out, launch, table = main_study
  assert len(launch.cmds) == 2  # the shared reference, then one RL cell
  assert [r["method"] for r in table] == ["before", "sft_only", "purld_dpo"]
  assert all(r["status"] == "done" and r["prompts"] == 4 for r in table)
  assert "gain" in table[2] and "gain" not in table[1]
  assert table[2]["teacher_calls_per_prompt"] == 1.0
  with open(out / "table.csv", encoding="utf-8") as f:
    assert [r["method"] for r in csv.DictReader(f)] == [
        "before", "sft_only", "purld_dpo"]
  md = (out / "table.md").read_text()
  assert "PU-RLD DPO" in md and "SFT on anchors" in md
  assert (out / "accuracy.png").stat().st_size > 0
  # The RL cell started from the shared reference: stage 1 and the before /
  # sft evaluations were not run again.
  cell = out / "cells" / "purld_dpo_s0"
  assert os.path.realpath(cell / "reference") == str(
      out / "cells" / "sft" / "reference")
  log = (cell / "log.txt").read_text()
  assert "[sft] already done" in log
  assert "[eval] sft: already evaluated" in log
  recs = [json.loads(l) for l in (out / "cells.jsonl").read_text().splitlines()]
  assert [(r["name"], r["status"]) for r in recs] == [
      ("sft", "done"), ("purld_dpo_s0", "done")]
  assert all(r["wall_s"] > 0 for r in recs)


def _answers(correct):
  from purld_jax import evaluate  # pylint: disable=g-import-not-at-top
  n = len(correct)
  return evaluate.Answers(
      name="final", ids=tuple(f"p{i}" for i in range(n)), texts=("",) * n,
      lengths=np.ones(n, int), finished=np.ones(n, bool),
      correct=np.asarray(correct, np.float64))


def test_seed_columns_resample_the_seeds_too():
  # Seed 0 right on every prompt, seed 1 on none, SFT on none. Over prompts
  # the pooled gain is 0.5 on each prompt, so its interval is a point; over
  # seeds a draw is {0, 0} (gain 1, p = 1/4), {1, 1} (0, 1/4) or one of each
  # (0.5, 1/2), so the 95 % interval runs from 0 to 1.
  sft = _answers([0, 0, 0, 0])
  cols = main_table.seed_columns(
      [_answers([1, 1, 1, 1]), _answers([0, 0, 0, 0])], [0, 1], sft)
  assert cols["seed_gains"] == {0: 1.0, 1: 0.0}
  assert (cols["gain_lo_seeds"], cols["gain_hi_seeds"]) == (0.0, 1.0)
  assert main_table.seed_columns([_answers([1, 1, 1, 1])], [0], sft) == {}
  row = dict(gain=0.5, **cols)
  assert main_table.seed_text(row) == ("s0 +100.0, s1 +0.0",
                                       "+50.0 [+0.0, +100.0]")
  assert main_table.seed_text(dict(gain=0.5)) == ("", "")


def test_finished_cells_are_skipped_on_rerun(main_study):
  out, _, first = main_study
  launch = Counting()
  table = main_table.main(TINY + [f"--out={out}",
                                  "--methods=sft_only,purld_dpo"],
                          runner=_runner(out, launch))
  assert not launch.cmds
  assert [r["accuracy"] for r in table] == [r["accuracy"] for r in first]
  # A changed setting of a finished cell is an error, not a silent mix.
  with pytest.raises(common.CellError, match="other settings"):
    main_table.main(TINY + [f"--out={out}", "--methods=purld_dpo",
                            "--override=rl.batch_size=4"],
                    runner=_runner(out, Counting(real=False)))


def test_ablation_agreement_grid_on_a_tiny_pool(main_study, tmp_path):
  ref_out, _, _ = main_study
  launch = Counting()
  argv = TINY + [
      f"--out={tmp_path}", f"--reference_from={ref_out}/cells/sft",
      "--k_max=4", "--pool_prompts=4", "--pool_steps=1", "--ks=2,4",
      "--subsample_seeds=0,1", "--schemes=anchor_recon,similarity",
      "--train_ks=2", "--train_schemes=similarity", "--losses=dpo"]
  res = ablation.main(argv, runner=_runner(tmp_path, launch))
  names = [c[c.index("-m") + 3].split("/cells/")[1] for c in launch.cmds]
  assert names == ["pool", "k2_similarity_dpo_s0"]  # the reference reused
  grid = res["agreement"]
  assert [(r["scheme"], r["k"]) for r in grid] == [
      (s, k) for s in ("anchor_recon", "similarity", "oracle") for k in (2, 4)]
  assert all(r["prompts"] == 4 and r["seeds"] == 2 for r in grid)
  with open(tmp_path / "agreement.csv", encoding="utf-8") as f:
    assert len(list(csv.DictReader(f))) == 6
  with open(tmp_path / "agreement_rows.csv", encoding="utf-8") as f:
    assert len(list(csv.DictReader(f))) == 12  # x 2 sub-sampling seeds
  assert (tmp_path / "kendall_tau.png").stat().st_size > 0
  assert (tmp_path / "k_trend.png").stat().st_size > 0
  assert [r["method"] for r in res["training"]] == [
      "sft_only", "K2/similarity/dpo"]
  assert res["training"][1]["status"] == "done"
  md = (tmp_path / "table.md").read_text()
  assert "Self-ranking vs oracle" in md and "Training grid" in md
  # A fresh clone: cells/ is gone, kept/ is committed. Only the pool runs
  # again (part a needs its rollout store, which is not kept); part (b) is
  # rebuilt from the kept copies.
  shutil.rmtree(tmp_path / "cells")
  again = Counting()
  res2 = ablation.main(argv, runner=_runner(tmp_path, again))
  assert [c[c.index("-m") + 3].split("/cells/")[1] for c in again.cmds] == [
      "pool"]
  assert [r["kendall_tau"] for r in res2["agreement"]] == pytest.approx(
      [r["kendall_tau"] for r in grid], nan_ok=True)
  assert res2["training"][1]["accuracy"] == res["training"][1]["accuracy"]
  assert res2["training"][1]["gain"] == res["training"][1]["gain"]


def test_dry_runs_list_the_cells(capsys):
  main_table.main(["--scale=paper", "--dry_run", "--seeds=0,1"])
  out = capsys.readouterr().out
  cells = [l.split()[1] for l in out.splitlines() if l.startswith("# ")]
  assert cells == ["sft"] + [f"{m.key}_s{s}" for m in main_table.METHODS[1:]
                             for s in (0, 1)]
  assert "--config=configs/baselines/oracle_grpo.py" in out
  assert "--config.teacher.base_url=http://127.0.0.1:8080/v1" in out
  ablation.main(["--scale=small", "--dry_run", "--full"])
  out = capsys.readouterr().out
  cells = [l.split()[1] for l in out.splitlines() if l.startswith("# ")
           and not l.startswith("# then")]
  assert cells[:2] == ["sft", "pool"] and len(cells) == 2 + 60
  assert "--config.sampling.num_candidates=16" in out
  # The default: the hour-long small study (README, "Cost"); part (a)
  # without the quadratic pairwise_judge.
  ablation.main(["--scale=small", "--dry_run"])
  out = capsys.readouterr().out
  cells = [l.split()[1] for l in out.splitlines() if l.startswith("# ")
           and not l.startswith("# then")]
  assert cells == ["sft", "pool"] + [
      f"k{k}_{s}_ldl_s0" for k in (4, 8)
      for s in ("anchor_recon", "pmi", "similarity")]
  then = [l for l in out.splitlines() if l.startswith("# then")]
  assert len(then) == 1 and "'judge'" in then[0]
  assert "pairwise_judge" not in then[0].split("(pairwise_judge on")[0]


def test_train_override_reaches_the_training_cells_only(capsys, tmp_path):
  ablation.main(["--scale=small", "--dry_run", f"--out={tmp_path}",
                 "--train_ks=4", "--train_schemes=judge", "--losses=ldl",
                 "--train_override=pu.include_anchor=False",
                 "--override=eval.num_prompts=8"])
  out = capsys.readouterr().out
  blocks = dict(re.findall(r"^# (\S+) \[todo\].*\n(.*)$", out, re.M))
  assert list(blocks) == ["sft", "pool", "k4_judge_ldl_s0"]
  assert "--config.pu.include_anchor=False" in blocks["k4_judge_ldl_s0"]
  assert "--config.pu.include_anchor" not in blocks["sft"]
  assert "--config.pu.include_anchor" not in blocks["pool"]
  for line in blocks.values():  # --override still reaches every cell
    assert "--config.eval.num_prompts=8" in line


def test_method_overrides_match_their_config_files():
  """The small-scale overrides are what the method's own config file sets
  (beside the scale: K, steps; and the PU-RLD rows' --scheme)."""
  from configs import common as cfg_common  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top

  def flat(c, prefix=""):
    out = {}
    for k, v in c.items():
      if hasattr(v, "items"):
        out.update(flat(v, f"{prefix}{k}."))
      else:
        out[prefix + k] = v
    return out

  base = flat(cfg_common.base())
  for m in main_table.METHODS:
    mod = importlib.import_module(m.config[:-3].replace("/", "."))
    own = {k: v for k, v in flat(mod.get_config()).items()
           if base.get(k) != v and k not in main_table.SCALE_KEYS}
    if m.key == "sft_only":
      assert own == {"recipe": "dpo"}
      continue
    assert own == {k: v for k, v in m.overrides.items() if base[k] != v}, m


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


def test_ablation_table_keeps_the_part_not_run(tmp_path):
  """table.md joins the parts' sections: writing one part again keeps the
  other's section (each section is its own file, with its command)."""
  ablation.write_section(str(tmp_path), "agreement", "`cmd a`\n\n## (a) A\n")
  ablation.write_section(str(tmp_path), "training", "`cmd b`\n\n## (b) B\n")
  ablation.write_section(str(tmp_path), "training", "`cmd c`\n\n## (b) C\n")
  want = "# Ablation (tiny scale)\n\n`cmd a`\n\n## (a) A\n\n`cmd c`\n\n## (b) C\n"
  assert ablation.join_sections(str(tmp_path), "tiny") == want
  assert (tmp_path / "table.md").read_text() == want
  (tmp_path / "table_agreement.md").unlink()
  assert ablation.join_sections(str(tmp_path), "tiny") == (
      "# Ablation (tiny scale)\n\n`cmd c`\n\n## (b) C\n")


def test_small_scale_with_a_real_teacher_endpoint(capsys, tmp_path):
  """--teacher=endpoint: every small cell asks the endpoint; the default
  stays the simulated dataset teacher."""
  out = str(tmp_path / "study")
  main_table.main(["--scale=small", "--dry_run", "--methods=purld_dpo",
                   "--teacher=endpoint", "--teacher_url=http://h:1/v1",
                   "--teacher_model=qwen", "--teacher_key_env=", f"--out={out}"])
  lines = [l for l in capsys.readouterr().out.splitlines()
           if l.startswith("/")]
  assert len(lines) == 2  # sft, purld_dpo_s0
  for line in lines:
    assert "--config.teacher.backend=openai" in line
    assert "--config.teacher.base_url=http://h:1/v1" in line
    assert "--config.teacher.model=qwen" in line
    assert line.endswith("--config.teacher.api_key_env=") or (
        "--config.teacher.api_key_env= " in line)
  main_table.main(["--scale=small", "--dry_run", "--methods=purld_dpo",
                   f"--out={out}"])
  assert "teacher.backend" not in capsys.readouterr().out


def test_anchor_quality_counts_the_right_anchors(tmp_path):
  from purld_jax import anchors, prompts  # pylint: disable=g-import-not-at-top
  path = tmp_path / "train.jsonl"
  rows = [{"id": f"p{i}", "prompt": f"{i} + 1?", "answer": str(i + 1)}
          for i in range(5)]
  rows.append({"id": "nolabel", "prompt": "hello"})  # no reference answer
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert common.anchor_quality(str(tmp_path), str(path)) is None  # no ledger
  fake = fixtures_teacher.ScriptedTeacher(
      lambda p: "no idea" if p.id in ("p1", "p3") else f"It is {p.answer}.",
      latency_s=0.5)
  store = anchors.AnchorStore(tmp_path, fake)
  store.fetch(prompts.read_jsonl(path))
  store.close()
  q = common.anchor_quality(str(tmp_path), str(path))
  # 6 anchors; 5 with an answer, 3 of them right (p0, p2, p4).
  assert (q["anchors"], q["with_answer"], q["right"]) == (6, 5, 3)
  assert q["accuracy"] == pytest.approx(0.6)
  assert q["accuracy_lo"] <= 0.6 <= q["accuracy_hi"]
  assert q["teacher"] == ["fake:teacher"] and not q["simulated"]
  assert q["truncated"] == 0 and q["mean_latency_s"] == pytest.approx(0.5)
  texts = ["It is 1.", "no idea", "It is 3.", "no idea", "It is 5.",
           "It is None."]  # the fake's text for the prompt with no answer
  assert q["mean_completion_tokens"] == pytest.approx(
      sum(map(len, texts)) / 6)


def _fake_cell(out, name, model, correct):
  """A finished cell folder: eval/<model>.jsonl with `correct` per prompt."""
  d = out / "cells" / name / "eval"
  d.mkdir(parents=True)
  with open(d / f"{model}.jsonl", "w", encoding="utf-8") as f:
    for i, c in enumerate(correct):
      f.write(json.dumps(dict(id=f"p{i}", answer="", tokens=1, finished=True,
                              correct=c)) + "\n")
  (d / "summary.json").write_text("[]")


def test_training_rows_carry_the_runs_logged_score_spread_and_label_sharpness(
    tmp_path):
  _fake_cell(tmp_path, "sft", "sft", [1, 0])
  for name, ldl in (("k4_pmi_ldl_s0", True), ("k4_pmi_dpo_s0", False)):
    _fake_cell(tmp_path, name, "final", [1, 1])
    d = tmp_path / "cells" / name
    (d / "config.json").write_text(json.dumps(dict(
        sampling=dict(num_candidates=4), pu=dict(include_anchor=ldl))))
    # Two steps: H(d) = log 5 (uniform over K + 1 = 5 members), then 0 (one
    # member); the score sd .1 then .3; a NaN oracle step is skipped.
    recs = [dict(step=1, score_std=.1, oracle_pair_accuracy=.5),
            dict(step=2, score_std=.3, oracle_pair_accuracy=float("nan"))]
    if ldl:
      recs[0]["entropy_label"], recs[1]["entropy_label"] = math.log(5), 0.0
    (d / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in recs))
  runner = _runner(tmp_path, Counting(real=False))
  rows = {r["method"]: r for r in ablation.training_rows(
      runner, [4], ["pmi"], ["dpo", "ldl"], [0])}
  ldl, dpo = rows["K4/pmi/ldl"], rows["K4/pmi/dpo"]
  assert ldl["score_std"] == pytest.approx(.2)
  assert ldl["oracle_pair_accuracy"] == pytest.approx(.5)
  # 1 - mean H / log 5 = 1 - (log 5 / 2) / log 5.
  assert ldl["label_sharpness"] == pytest.approx(.5)
  assert math.isnan(dpo["label_sharpness"])
  # No rollout store in these fake cells: no anchor share.
  assert math.isnan(ldl["label_anchor_share"])
  md = ablation.training_markdown(list(rows.values()))
  assert "| 0.200 | 0.50 | n/a |" in md


def test_anchor_share_reads_the_label_distributions_last_member():
  import types  # pylint: disable=g-import-not-at-top
  r = lambda d, valid, k: types.SimpleNamespace(
      preferences={"label_dist": np.array(d)}, valid=np.array(valid), k=k)
  with_anchor = r([[.1, .2, .7], [.5, .5, 0.], [.3, .3, .4]],
                  [True, True, False], 2)   # the invalid row is left out
  no_anchor = r([[.5, .5]], [True], 2)      # K columns: LDL without anchor
  assert ablation.anchor_share([with_anchor, no_anchor]) == pytest.approx(
      (.7 + 0.) / 2)
  assert math.isnan(ablation.anchor_share([no_anchor]))
  dpo = types.SimpleNamespace(preferences={}, valid=np.array([True]), k=2)
  assert math.isnan(ablation.anchor_share([dpo]))


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


def test_training_table_lists_every_finished_cell_of_the_folder(tmp_path):
  # Cells left by earlier calls (other K, scheme, seed) join the requested
  # ones; a requested cell with no finished seed is 'not run'.
  _fake_cell(tmp_path, "sft", "sft", [1, 0, 0, 0])
  _fake_cell(tmp_path, "k4_pmi_dpo_s0", "final", [1, 1, 0, 0])
  _fake_cell(tmp_path, "k2_anchor_recon_grpo_s0", "final", [1, 1, 1, 0])
  _fake_cell(tmp_path, "k2_anchor_recon_grpo_s1", "final", [1, 0, 1, 0])
  (tmp_path / "cells" / "k8_judge_dpo_s0").mkdir()  # started, never finished
  runner = _runner(tmp_path, Counting(real=False))
  assert ablation.finished_training(runner) == [
      (2, "anchor_recon", "grpo", 0), (2, "anchor_recon", "grpo", 1),
      (4, "pmi", "dpo", 0)]
  rows = ablation.training_rows(runner, [4], ["judge"], ["dpo"], [0])
  assert [r["method"] for r in rows] == [
      "sft_only", "K2/anchor_recon/grpo", "K4/judge/dpo", "K4/pmi/dpo"]
  assert [r["status"] for r in rows] == ["done", "done", "not run", "done"]
  # K2: mean of the seeds per prompt (1, .5, 1, 0) = .625; SFT .25.
  assert rows[1]["seeds"] == 2 and rows[1]["accuracy"] == pytest.approx(.625)
  assert rows[1]["gain"] == pytest.approx(.375)
  assert rows[3]["seeds"] == 1 and rows[3]["gain"] == pytest.approx(.25)
  md = ablation.training_markdown(rows)
  assert "| 4 | judge | dpo | not run |" in md
  # The K-trend series: finished rows only, schemes in SCHEMES order.
  series = ablation.k_series(rows)
  assert list(series) == [("pmi", "dpo"), ("anchor_recon", "grpo")]
  (k, gain, lo, hi), = series[("anchor_recon", "grpo")]
  assert k == 2 and gain == pytest.approx(.375) and lo <= gain <= hi
  grid = [dict(scheme="pmi", k=8, pair_accuracy=.7),
          dict(scheme="pmi", k=2, pair_accuracy=.6),
          dict(scheme="judge", k=2, pair_accuracy=float("nan"))]
  assert ablation.k_series(grid, "pair_accuracy") == {
      ("pmi", ""): [(2, .6, .6, .6), (8, .7, .7, .7)]}
  ablation.k_trend(rows, grid, str(tmp_path / "k.png"))
  assert (tmp_path / "k.png").stat().st_size > 0


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
  a = main_table.cell_answers(runner, cell.name, "final")
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


def test_training_rows_are_the_same_from_the_kept_copies(tmp_path):
  _fake_cell(tmp_path, "sft", "sft", [1, 0, 0, 0])
  _fake_cell(tmp_path, "k4_pmi_ldl_s0", "final", [1, 1, 0, 0])
  d = tmp_path / "cells" / "k4_pmi_ldl_s0"
  (d / "config.json").write_text(json.dumps(dict(
      sampling=dict(num_candidates=4), pu=dict(include_anchor=True))))
  (d / "metrics.jsonl").write_text(json.dumps(dict(
      step=1, score_std=.25, entropy_label=0.0)) + "\n")
  runner = _runner(tmp_path, Counting(real=False))
  for name in ("sft", "k4_pmi_ldl_s0"):
    runner.keep(name)  # what Runner.run does once a cell is done
  first = ablation.training_rows(runner, [4], ["pmi"], ["ldl"], [0])
  assert first[1]["score_std"] == pytest.approx(.25)
  assert first[1]["label_sharpness"] == pytest.approx(1.0)  # H(d) = 0
  # logged.json, written from the cell folder, went to the kept copy too.
  assert (tmp_path / "kept" / "k4_pmi_ldl_s0" / "logged.json").exists()
  shutil.rmtree(tmp_path / "cells")
  again = ablation.training_rows(runner, [4], ["pmi"], ["ldl"], [0])
  assert [r["method"] for r in again] == ["sft_only", "K4/pmi/ldl"]
  for a, b in zip(first, again):
    for key in ("accuracy", "gain", "score_std", "label_sharpness",
                "label_anchor_share"):
      if key in a:
        assert a[key] == pytest.approx(b[key], nan_ok=True)
  assert again[1]["gain"] == pytest.approx(.25)  # (2 - 1) / 4 prompts


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
