"""experiments/grid.py: merging studies' training tables, by hand-made CSVs."""

import csv
import json
import os

import pytest

from experiments import ablation
from experiments import grid

FIELDS = ablation.TRAIN_FIELDS


def _study(root, name, rows, sft_accuracy=0.15):
  """A study folder whose training.csv holds the SFT row and `rows`
  ((K, scheme, loss, seeds, gain, lo, hi) or a dict of overrides)."""
  folder = os.path.join(root, name)
  os.makedirs(folder)
  out = [dict(method="sft_only", k="", scheme="", loss="SFT reference",
              status="done", seeds=1, prompts=128, accuracy=sft_accuracy)]
  for k, scheme, loss, seeds, gain, lo, hi in rows:
    out.append(dict(method=f"K{k}/{scheme}/{loss}", k=k, scheme=scheme,
                    loss=loss, status="done", seeds=seeds, prompts=128,
                    accuracy=sft_accuracy + gain, gain=gain, gain_lo=lo,
                    gain_hi=hi, oracle_pair_accuracy=0.9, wall_s=200))
  with open(os.path.join(folder, "training.csv"), "w", newline="",
            encoding="utf-8") as f:
    w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(out)
  return folder


def test_merge_keeps_most_seeds_then_the_last_study(tmp_path):
  a = _study(tmp_path, "a", [(4, "pmi", "ldl", 2, 0.09, 0.03, 0.15),
                             (8, "pmi", "ldl", 1, 0.05, -0.02, 0.12),
                             (2, "judge", "dpo", 1, -0.1, -0.2, -0.04)])
  b = _study(tmp_path, "b", [(4, "pmi", "ldl", 1, 0.01, -0.05, 0.07),
                             (8, "pmi", "ldl", 1, 0.02, -0.04, 0.08),
                             (16, "similarity", "grpo", 2, 0.0, -0.05, 0.05)])
  rows = grid.merge([a, b])
  got = {(r["k"], r["scheme"], r["loss"]): (r["study"], r["gain"])
         for r in rows}
  assert got == {
      (2, "judge", "dpo"): (a, -0.1),
      (4, "pmi", "ldl"): (a, 0.09),  # two seeds beat b's one
      (8, "pmi", "ldl"): (b, 0.02),  # a tie: the study named last
      (16, "similarity", "grpo"): (b, 0.0)}
  # sorted by K, then scheme and loss in the grid's order
  assert [r["k"] for r in rows] == [2, 4, 8, 16]


def test_markdown_marks_significance_seeds_study_and_the_missing(tmp_path):
  a = _study(tmp_path, "a", [(4, "pmi", "ldl", 2, 0.09, 0.03, 0.15)])
  b = _study(tmp_path, "b", [(2, "judge", "dpo", 1, -0.1, -0.2, -0.04),
                             (8, "similarity", "ldl", 1, 0.02, -0.04, 0.08)])
  g = dict(ks=(2, 4, 8), schemes=("judge", "pmi", "similarity"),
           losses=("dpo", "ldl"))
  md = grid.markdown(grid.merge([a, b]), [a, b], grid=g)
  assert "| pmi |  | **+9.0** [+3.0, +15.0] x2 (a) |  |" in md
  assert "| judge | **-10.0** [-20.0, -4.0] x1 (b) |  |  |" in md
  assert "| similarity |  |  | +2.0 [-4.0, +8.0] x1 (b) |" in md
  # a scheme with no row under a loss gets no line there
  dpo = md.split("### DPO")[1].split("### LDL")[0]
  assert "| pmi |" not in dpo and "| similarity |" not in dpo
  # 3 of 3 x 3 x 2 = 18 cells, one with two seeds; 15 listed as not run
  assert "3 of the 18 cells of the full grid run, 1 of them with two" in md
  tail = md.split("Not run: ")[1]
  assert tail.count(",") == 14 and "K4 pmi ldl" not in tail
  assert "K2 pmi dpo" in tail


def test_fill_studies_fill_only_the_empty_cells_as_a_named_variant(tmp_path):
  a = _study(tmp_path, "a", [(4, "pmi", "ldl", 2, 0.09, 0.03, 0.15)])
  v = _study(tmp_path, "v", [(4, "pmi", "ldl", 2, -0.5, -0.6, -0.4),
                             (8, "pmi", "dpo", 1, -0.1, -0.2, -0.04)])
  with open(os.path.join(v, "table.md"), "w", encoding="utf-8") as f:
    f.write("# Ablation (small scale)\n\n"
            "`python -m experiments.ablation --scale=small --part=training "
            "--out=v --train_override=ranking.pair_opponents=4 "
            "--train_override=rl.steps=3`\n\nCells: ...\n")
  assert grid.study_overrides(v) == ["ranking.pair_opponents=4",
                                     "rl.steps=3"]
  assert grid.study_overrides(a) == []  # no table.md
  rows = grid.merge([a], fill=[v])
  got = {(r["k"], r["scheme"], r["loss"]): (r["study"], r["variant"])
         for r in rows}
  # K4 pmi ldl stays the plain study's (the variant's is not used there)
  assert got == {(4, "pmi", "ldl"): (a, False), (8, "pmi", "dpo"): (v, True)}
  g = dict(ks=(4, 8), schemes=("pmi",), losses=("dpo", "ldl"))
  md = grid.markdown(rows, [a], grid=g, fill=[v])
  assert "| pmi |  | **-10.0** [-20.0, -4.0] x1 (b\u2020) |" in md
  assert ("(b\u2020) `" + v + "`: a variant that fills cells no plain study "
          "has; run with `ranking.pair_opponents=4`, `rl.steps=3`") in md
  assert ("2 of the 4 cells of the full grid run, 1 of them with two seeds "
          "or more; 1 only as a variant (\u2020: K8 pmi dpo). Not run: "
          "K4 pmi dpo, K8 pmi ldl.") in md


def test_studies_with_different_sft_references_are_refused(tmp_path):
  a = _study(tmp_path, "a", [(4, "pmi", "ldl", 1, 0.09, 0.03, 0.15)])
  b = _study(tmp_path, "b", [(4, "pmi", "dpo", 1, 0.0, -0.1, 0.1)],
             sft_accuracy=0.2)
  with pytest.raises(grid.GridError, match="b: its SFT reference"):
    grid.merge([a, b])


def test_a_bad_row_names_the_file_and_line(tmp_path):
  a = _study(tmp_path, "a", [(4, "pmi", "ldl", 1, 0.09, 0.03, 0.15),
                             (8, "pmi", "ldl", 1, 0.05, 0.0, 0.1)])
  path = os.path.join(a, "training.csv")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.replace("K8/pmi/ldl,8,", "K8/pmi/ldl,eight,"))
  with pytest.raises(grid.GridError, match=r"training.csv, line 4"):
    grid.merge([a])
  with pytest.raises(grid.GridError, match="no such file"):
    grid.merge([str(tmp_path / "nowhere")])


def _kept_answers(study, cell, model, correct):
  """A finished cell's kept copy with `model`'s held-out answers."""
  folder = os.path.join(study, "kept", cell, "eval")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"{model}.jsonl"), "w",
            encoding="utf-8") as f:
    for i, c in enumerate(correct):
      f.write(json.dumps(dict(id=f"p{i}", answer="7", tokens=2,
                              finished=True, correct=c)) + "\n")
  with open(os.path.join(folder, "summary.json"), "w", encoding="utf-8") as f:
    json.dump({}, f)


def test_seed_rows_read_each_seeds_answers(tmp_path):
  a = _study(tmp_path, "a", [(4, "pmi", "ldl", 2, 0.0, -0.2, 0.2),
                             (8, "judge", "dpo", 2, -0.1, -0.2, -0.04),
                             (2, "pmi", "grpo", 1, 0.0, -0.1, 0.1)])
  _kept_answers(a, "sft", "sft", [0, 0, 1, 1])
  # seed 0 gains prompt 0 (+25 pt), seed 1 loses prompt 3 (-25 pt)
  _kept_answers(a, "k4_pmi_ldl_s0", "final", [1, 0, 1, 1])
  _kept_answers(a, "k4_pmi_ldl_s1", "final", [0, 0, 1, 0])
  _kept_answers(a, "k2_pmi_grpo_s0", "final", [0, 0, 1, 1])
  rows = grid.merge([a])
  seeds, missing = grid.seed_rows(rows)
  # the one-seed row is left out; K8 judge dpo has no answers on disk
  assert [(r["k"], r["scheme"], r["loss"]) for r in missing] == [
      (8, "judge", "dpo")]
  (r,) = seeds
  assert r["seed_list"] == [0, 1]
  assert r["seed_gains"] == [0.25, -0.25]
  assert r["gain"] == 0.0 and r["seed_spread"] == 0.5
  # seed 0 minus seed 1 per prompt: [1, 0, 0, 1], a mean of 0.5 that a
  # resample can take from 0 to 1
  assert 0.0 <= r["spread_lo"] <= 0.5 <= r["spread_hi"] <= 1.0
  # the seed draw alone spans -25 .. +25 (one seed twice)
  assert r["gain_lo_seeds"] <= -0.25 and r["gain_hi_seeds"] >= 0.25
  md = grid.seed_markdown(seeds, missing)
  assert "| 4 | pmi | ldl | s0 +25.0, s1 -25.0 | +0.0 [-20.0, +20.0] |" in md
  assert "1 cells. Seeds apart beyond prompt noise: " in md
  assert "K8 judge dpo x2" in md.split("not on disk")[1]
  grid.seed_plot(seeds, str(tmp_path / "seeds.png"))
  assert os.path.getsize(tmp_path / "seeds.png") > 10_000


def test_seed_rows_refuse_a_stale_table(tmp_path):
  a = _study(tmp_path, "a", [(4, "pmi", "ldl", 3, 0.0, -0.2, 0.2)])
  _kept_answers(a, "sft", "sft", [0, 1])
  for s in (0, 1):
    _kept_answers(a, f"k4_pmi_ldl_s{s}", "final", [1, 1])
  with pytest.raises(grid.GridError, match="has 3 seeds, but the folder "
                     "holds 2 finished"):
    grid.seed_rows(grid.merge([a]))


def test_main_writes_the_three_files(tmp_path, capsys):
  a = _study(tmp_path, "a", [(4, "pmi", "ldl", 2, 0.09, 0.03, 0.15),
                             (2, "anchor_recon", "grpo", 1, -0.01, -0.06,
                              0.04)])
  out = str(tmp_path / "out")
  text = grid.main([a, f"--out={out}"])
  # no per-seed answers on disk: seeds.md says so, and there is no plot
  assert sorted(os.listdir(out)) == ["grid.csv", "grid.md", "grid.png",
                                     "seeds.csv", "seeds.md"]
  with open(os.path.join(out, "seeds.md"), encoding="utf-8") as f:
    assert "K4 pmi ldl x2" in f.read().split("not on disk")[1]
  assert text.startswith("# The ablation grid, merged")
  with open(os.path.join(out, "grid.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert [(r["k"], r["scheme"], r["loss"], r["study"], r["variant"])
          for r in rows] == [("2", "anchor_recon", "grpo", a, "False"),
                             ("4", "pmi", "ldl", a, "False")]
  assert os.path.getsize(os.path.join(out, "grid.png")) > 10_000
  with pytest.raises(SystemExit):
    grid.main([a, str(tmp_path / "nowhere"), f"--out={out}"])
  assert "no such file" in capsys.readouterr().err
