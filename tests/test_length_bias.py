"""experiments/length_bias.py on a hand-made rollout store and eval files."""

import json
import os

import numpy as np
import pytest

from experiments import length_bias
from purld_jax import prompts as prompts_lib
from purld_jax import rollout
from purld_jax import rollout_store


def _group(lengths, finished, scores, valid) -> rollout.Group:
  """B prompts x K candidates whose member masks hold `lengths` tokens (the
  stop token included where `finished`); the anchor member has 2 tokens."""
  lengths = np.asarray(lengths)
  finished = np.asarray(finished, bool)
  b, k = lengths.shape
  t = 6
  full = np.concatenate([lengths + finished, np.full((b, 1), 2)], axis=1)
  member_mask = np.arange(t) < full[..., None]
  return rollout.Group(
      prompt_tokens=np.ones((b, 4), np.int32),
      prompt_mask=np.ones((b, 4), bool),
      members=member_mask.astype(np.int32) * 7, member_mask=member_mask,
      old_logps=np.zeros((b, k, t), np.float32), finished=finished,
      scores=np.asarray(scores, np.float32),
      anchor_score=np.zeros(b, np.float32), valid=np.asarray(valid, bool),
      texts=[[f"c{i}{j}" for j in range(k)] for i in range(b)], timings={})


def _store(path):
  """Two steps of a K = 3 'pmi' run, the second with a filler prompt."""
  store = rollout_store.RolloutStore(path)
  ps = [prompts_lib.Prompt.from_text(f"q{i}", id=f"p{i}", answer="1")
        for i in range(2)]
  common = dict(prompts=ps, anchors=["a", "a"], anchor_keys=["0", "1"],
                scheme="pmi", recipe="grpo")
  # Step 1. Prompt 0: lengths 0 (empty), 1, 2, scores 0 > -1 > -2: the
  # shorter always wins (1.0), the empty one is top; right: candidate 1 only
  # -> right vs wrong pairs of unequal length: (1 vs 0) right longer, (1 vs
  # 2) right shorter -> 0.5. Prompt 1: lengths 1, 1, 3 (the last unfinished),
  # scores -1, -3, -2: pairs (0,2) wins, (1,2) loses -> 0.5; all wrong -> no
  # oracle pair.
  store.write(1, _group([[0, 1, 2], [1, 1, 3]], [[1, 1, 1], [1, 1, 0]],
                        [[0.0, -1.0, -2.0], [-1.0, -3.0, -2.0]], [1, 1]),
              correct=np.array([[0, 1, 0], [0, 0, 0]], np.float32), **common)
  # Step 2. Prompt 0: lengths 2, 2, 2: no pair (dropped). Prompt 1: filler.
  store.write(2, _group([[2, 2, 2], [0, 1, 2]], [[1, 1, 1], [1, 1, 1]],
                        [[1.0, 2.0, 3.0], [0.0, -1.0, -2.0]], [1, 0]),
              correct=np.array([[1, 0, 0], [0, 0, 0]], np.float32), **common)


def test_candidate_lengths_leave_out_the_stop_token(tmp_path):
  _store(tmp_path / "run" / "rollouts")
  r = rollout_store.RolloutStore.open(tmp_path / "run" / "rollouts").read(1)
  np.testing.assert_array_equal(rollout_store.candidate_lengths(r),
                                [[0, 1, 2], [1, 1, 3]])


def test_cell_rows_by_hand(tmp_path):
  _store(tmp_path / "run" / "rollouts")
  (row,) = length_bias.cell_rows(str(tmp_path / "run"))
  assert row["scheme"] == "pmi" and row["steps"] == 2
  assert row["prompts"] == 2  # step 2: one prompt of equal lengths, a filler
  assert row["candidates"] == 9  # valid prompts only
  assert row["shorter_pref"] == pytest.approx((1.0 + 0.5) / 2)
  assert row["oracle_pref"] == 0.5 and row["oracle_prompts"] == 1
  assert row["empty"] == 1 and row["empty_groups"] == 1
  assert row["empty_top"] == 1
  assert row["tokens_first"] == pytest.approx(8 / 6)
  assert row["tokens_last"] == 2.0
  lo, hi = row["shorter_pref_lo"], row["shorter_pref_hi"]
  assert 0.5 <= lo <= row["shorter_pref"] <= hi <= 1.0


def test_cell_rows_refuse_a_missing_scheme_and_store(tmp_path):
  _store(tmp_path / "run" / "rollouts")
  with pytest.raises(ValueError, match=r"rollouts: no scores for \['judge'\]"):
    length_bias.cell_rows(str(tmp_path / "run"), ["judge"])
  with pytest.raises(FileNotFoundError, match="nothing.rollouts"):
    length_bias.cell_rows(str(tmp_path / "nothing"))


def _answers(path, tokens, finished, correct, texts=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  texts = texts or ["x" * n for n in tokens]
  with open(path, "w", encoding="utf-8") as f:
    for i, (n, fin, c, t) in enumerate(zip(tokens, finished, correct, texts)):
      f.write(json.dumps(dict(id=f"e{i}", answer=t, tokens=n,
                              finished=fin, correct=c)) + "\n")


def test_heldout_row_counts_answers_of_at_most_one_token(tmp_path):
  cell = tmp_path / "k2_pmi_grpo_s0"
  # tokens include the stop where finished: 1 -> empty, 2 -> one token,
  # 2 unfinished -> two tokens, 4 -> three.
  _answers(cell / "eval" / "final.jsonl", [1, 2, 2, 4], [1, 1, 0, 1],
           [0.0, 1.0, 0.0, None], ["", "7", "7 ", "7a7"])
  _answers(cell / "eval" / "sft.jsonl", [4, 4, 2, 3], [1, 1, 1, 1],
           [1.0, 1.0, 0.0, None], ["12", "34", "5", "67"])
  (cell / "cell.json").write_text(json.dumps(dict(overrides={
      "recipe": "grpo", "ranking.scheme": "pmi",
      "sampling.num_candidates": "2"})))
  row = length_bias.heldout_row(str(cell))
  assert (row["scheme"], row["loss"], row["k"]) == ("pmi", "grpo", "2")
  assert row["prompts"] == 4
  assert row["short"] == 2 and row["tokens"] == (0 + 1 + 2 + 3) / 4
  assert row["accuracy"] == pytest.approx(1 / 3)  # the None prompt left out
  assert row["sft_short"] == 1 and row["sft_tokens"] == (3 + 3 + 1 + 2) / 4
  assert row["sft_accuracy"] == pytest.approx(2 / 3)
  # "7" and "7 " are one answer once stripped: 3 distinct, "7" twice.
  assert (row["top_answer"], row["top_count"], row["distinct"]) == ("7", 2, 3)
  assert (row["sft_top_count"], row["sft_distinct"]) == (1, 4)
  assert row["sft_top_answer"] == "12"  # a four-way tie: the first given
  assert length_bias.heldout_row(str(tmp_path / "empty")) is None


def test_main_writes_both_tables_and_names_a_bad_folder(tmp_path, capsys):
  _store(tmp_path / "run" / "rollouts")
  _answers(tmp_path / "run" / "eval" / "final.jsonl", [2, 3], [1, 1],
           [1.0, 0.0])
  out = tmp_path / "out"
  rows = length_bias.main([str(tmp_path / "run"), f"--out={out}"])
  assert len(rows) == 2
  text = (out / "length_bias.md").read_text()
  assert "| pmi | 2 | 2 |" in text and "| 2 | 1 (SFT -) | 1.50 (SFT -) |" in text
  assert '| 2 (SFT -) | "xx" x 1 (SFT -) | 50.0 (SFT -) |' in text
  assert (out / "length_bias.csv").read_text().startswith("cell,scheme,")
  assert (out / "heldout_lengths.csv").read_text().count("\n") == 2
  assert "![heldout lengths](heldout_lengths.png)" in text
  assert (out / "length_preference.png").stat().st_size > 0
  assert (out / "heldout_lengths.png").stat().st_size > 0
  assert "0.75 [" in capsys.readouterr().out
  with pytest.raises(FileNotFoundError, match="neither rollouts"):
    length_bias.main([str(tmp_path / "nothing")])


def test_summary_groups_cells_by_loss_and_scheme_once_each():
  row = lambda cell, loss, short, distinct, top, count, acc: dict(
      cell=cell, loss=loss, scheme="pmi", short=short, distinct=distinct,
      top_answer=top, top_count=count, accuracy=acc, sft_short=52,
      sft_distinct=39, sft_top_answer="1", sft_top_count=30,
      sft_accuracy=0.148)
  held = [row("a/k2_pmi_grpo_s0", "grpo", 122, 16, "2", 28, 0.0),
          row("a/k2_pmi_grpo_s1", "grpo", 65, 25, "1", 30, 0.133),
          row("b/k2_pmi_grpo_s1", "grpo", 1, 1, "x", 99, 0.9),  # a rerun
          row("a/k4_pmi_ldl_s0", "ldl", 32, 35, "10", 25, 0.25)]
  md = length_bias.summary_table(held)
  assert '| GRPO | pmi | 2 | 65-122 | 16-25 | "1" x 30 | 0.0-13.3 |' in md
  assert '| LDL | pmi | 1 | 32 | 35 | "10" x 25 | 25.0 |' in md
  assert '| SFT |  |  | 52 | 39 | "1" x 30 | 14.8 |' in md


def test_reglob_writes_back_the_glob_a_shell_expanded(tmp_path):
  d = tmp_path / "cells"
  for name in ("k2_a", "k4_b", "pool"):
    (d / name).mkdir(parents=True)
  k = [str(d / "k2_a"), str(d / "k4_b")]
  # Exactly what d/k* matches: written back as the glob.
  assert length_bias.reglob(k + ["--out=o"]) == [str(d / "k*"), "--out=o"]
  # Not all of d/k*: kept as given (the glob would add k4_b).
  assert length_bias.reglob(k[:1] + [str(d / "pool")]) == [
      k[0], str(d / "pool")]
  # One path, or paths that are not folders, stay.
  assert length_bias.reglob([k[0]]) == [k[0]]
  assert length_bias.reglob(["x/k1", "x/k2"]) == ["x/k1", "x/k2"]
