"""experiments/answer_words.py on a hand-made rollout store and eval files."""

import json
import os

import numpy as np
import pytest

from experiments import answer_words
from purld_jax import prompts as prompts_lib
from purld_jax import rollout
from purld_jax import rollout_store


def _group(texts, scores, valid) -> rollout.Group:
  """B prompts x K candidates with these texts and scores."""
  b, k, t = len(texts), len(texts[0]), 4
  member_mask = np.ones((b, k + 1, t), bool)
  return rollout.Group(
      prompt_tokens=np.ones((b, 4), np.int32),
      prompt_mask=np.ones((b, 4), bool),
      members=np.full((b, k + 1, t), 7, np.int32), member_mask=member_mask,
      old_logps=np.zeros((b, k, t), np.float32),
      finished=np.ones((b, k), bool), scores=np.asarray(scores, np.float32),
      anchor_score=np.zeros(b, np.float32), valid=np.asarray(valid, bool),
      texts=texts, timings={})


def _cell(root):
  """Two steps of a K = 3 'judge' run and its held-out answers."""
  workdir = os.path.join(root, "cell")
  store = rollout_store.RolloutStore(os.path.join(workdir, "rollouts"))
  ps = [prompts_lib.Prompt.from_text(f"q{i}", id=f"p{i}", answer="1")
        for i in range(2)]
  common = dict(prompts=ps, anchors=["1", "1"], anchor_keys=["0", "1"],
                scheme="judge", recipe="grpo")
  # Step 1. Prompt 0: "No." scores highest, above both others: pairs
  # (No., 4) and (No., None) both won -> 1.0; top has it. "None" is not
  # the word. Prompt 1: no candidate has it -> left out.
  store.write(1, _group([["No.", "4", "None"], ["3", "5", "6"]],
                        [[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]], [1, 1]),
              correct=np.zeros((2, 3), np.float32), **common)
  # Step 2. Prompt 0: "no, no" ties "7" (1/2) and loses to "8" (0) -> 0.25;
  # top is "8". Prompt 1 (a filler row) would give 1.0 but is not valid.
  store.write(2, _group([["no, no", "7", "8"], ["No", "2", "3"]],
                        [[1.0, 1.0, 3.0], [5.0, 0.0, 0.0]], [1, 0]),
              correct=np.zeros((2, 3), np.float32), **common)
  os.makedirs(os.path.join(workdir, "eval"))
  for model, texts in (("final", ["No", "no way", "3"]),
                       ("sft", ["3", "Nope", "4"])):
    with open(os.path.join(workdir, "eval", f"{model}.jsonl"), "w",
              encoding="utf-8") as f:
      for i, t in enumerate(texts):
        f.write(json.dumps(dict(id=f"e{i}", answer=t, tokens=1,
                                finished=True, correct=0)) + "\n")
  return workdir


def test_begins_with_the_whole_word_in_any_case():
  assert answer_words.begins_with("No, no", "No")
  assert answer_words.begins_with("  no.", "No")
  assert not answer_words.begins_with("None", "No")
  assert not answer_words.begins_with("I say No", "No")


def test_cell_rows_by_hand(tmp_path):
  rows = answer_words.cell_rows(_cell(str(tmp_path)), ["No", "Yes"])
  no, yes = rows
  assert (no["scheme"], no["word"], no["steps"]) == ("judge", "No", 2)
  # valid candidates with the word: 1 of 6 at step 1, 1 of 3 at step 2
  assert no["candidates"] == 9
  assert no["share_first"] == pytest.approx(1 / 6)
  assert no["share_last"] == pytest.approx(1 / 3)
  assert no["prompts"] == 2
  assert no["word_pref"] == pytest.approx((1.0 + 0.25) / 2)
  assert no["top_share"] == 0.5 and no["top_chance"] == pytest.approx(1 / 3)
  # held out: "No" and "no way" (final); "Nope" is another word (SFT)
  assert (no["heldout"], no["sft_heldout"], no["heldout_prompts"]) == (2, 0, 3)
  assert yes["prompts"] == 0 and np.isnan(yes["word_pref"])
  assert "| judge | No | 2 | 0.17 -> 0.33 | 0.62 [" in (
      answer_words.table(rows))


def test_main_writes_the_table_and_names_a_bad_folder(tmp_path, capsys):
  cell = _cell(str(tmp_path))
  out = str(tmp_path / "out")
  rows = answer_words.main([cell, "--words=No", f"--out={out}"])
  assert len(rows) == 1
  assert sorted(os.listdir(out)) == ["answer_words.csv", "answer_words.md"]
  with pytest.raises(SystemExit):
    answer_words.main([str(tmp_path / "nowhere")])
  assert "no rollout store" in capsys.readouterr().err
  # --schemes picks scores; a cell without them adds no row, and no row
  # at all is an error naming the schemes
  assert len(answer_words.main([cell, "--schemes=judge,pmi"])) == 2
  with pytest.raises(SystemExit):
    answer_words.main([cell, "--schemes=pmi"])
  assert "no cell holds scores named ['pmi']" in capsys.readouterr().err
