"""experiments/writing.py: comparisons, judging and the table, by hand.

Fast: fabricated held-out answers, a callable judge that prefers the longer
answer, a fake teacher. Slow: the whole study on the tiny model, the fault
server as teacher and judge.
"""

import json
import os

import numpy as np
import pytest

from experiments import common
from experiments import writing
from purld_jax import evaluate
from purld_jax import prompts as prompts_lib
from purld_jax import winrate
from tests import fixtures_teacher
from tests import train_fixtures
from tests.fixtures_teacher import fault_server  # noqa: F401

IDS = ("w0", "w1", "w2", "w3")
PROMPTS = [prompts_lib.Prompt.from_text(f"write {i}", id=i) for i in IDS]


def _write_answers(runner, cell, model, texts):
  answers = evaluate.Answers(
      name=model, ids=IDS, texts=tuple(texts),
      lengths=np.array([len(t.split()) for t in texts]),
      finished=np.ones(len(IDS), bool), correct=np.full(len(IDS), np.nan))
  evaluate.write(os.path.join(runner.workdir(cell), "eval"), [answers])


def _longer(messages):
  """Prefers the answer with more words; a tie on equal length."""
  user = messages[-1]["content"]
  a = user.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
  b = user.split("[Answer B]\n")[1].split("\n\nWhich answer")[0]
  la, lb = len(a.split()), len(b.split())
  return "Verdict: " + ("A" if la > lb else "B" if lb > la else "tie")


def test_comparisons_name_every_side():
  got = writing.comparisons(["purld_dpo"], [0, 1])
  assert [(c.model, c.reference) for c in got] == [
      ("sft:sft", "sft:before"),
      ("purld_dpo_s0:final", "sft:sft"), ("purld_dpo_s1:final", "sft:sft"),
      ("sft:sft", "teacher"),
      ("purld_dpo_s0:final", "teacher"), ("purld_dpo_s1:final", "teacher")]
  got = writing.comparisons(["purld_dpo"], [0], ["sft", "before"])
  assert [(c.model, c.reference) for c in got] == [
      ("sft:sft", "sft:before"), ("purld_dpo_s0:final", "sft:sft")]
  with pytest.raises(SystemExit):
    writing.parse_args(["--compare=sft,anchor"])


def test_judging_and_the_table_by_hand(tmp_path):
  runner = common.Runner(str(tmp_path))
  # Words per held-out answer, prompts w0..w3.
  _write_answers(runner, "sft", "before", ["a", "a", "a a a a", "a a"])
  _write_answers(runner, "sft", "sft", ["b b", "b", "b b", "b b"])
  _write_answers(runner, "purld_dpo_s0", "final",
                 ["c c c c", "c c c c", "c", "c c c"])
  teacher = fixtures_teacher.ScriptedTeacher(lambda p: "t " * 3)  # 3 words
  texts = writing.teacher_answers(str(tmp_path), teacher, PROMPTS)
  assert teacher.asked == 4 and set(texts) == set(IDS)
  assert writing.teacher_answers(str(tmp_path), teacher, PROMPTS) == texts
  assert teacher.asked == 4  # stored in the ledger: never asked twice
  comps = writing.comparisons(["purld_dpo", "purld_grpo"], [0])
  judge = winrate.CallableJudge(_longer, model="longer")
  rows = writing.judge_all(runner, comps, PROMPTS, judge, texts, samples=200)
  by = {r["label"]: r for r in rows}
  # sft vs before: 2>1 win, 1=1 tie, 2<4 loss, 2=2 tie -> (1 + .5 + 0 + .5)/4.
  r = by["SFT vs initial student"]
  assert (r["wins"], r["ties"], r["losses"]) == (1, 2, 1)
  assert r["win_rate"] == pytest.approx(0.5)
  # final vs sft: 4>2, 4>1, 1<2, 3>2 -> 3 wins, 1 loss.
  r = [v for k, v in by.items() if k.startswith("PU-RLD DPO") and
       k.endswith("vs SFT")][0]
  assert (r["wins"], r["ties"], r["losses"], r["win_rate"]) == (3, 0, 1, 0.75)
  assert r["mean_words_model"] == 3.0 and r["mean_words_reference"] == 1.75
  # vs the teacher's 3 words: sft 2,1,2,2 all lose; final 4,4,1,3: W W L T.
  assert by["SFT vs teacher"]["win_rate"] == 0.0
  r = [v for k, v in by.items() if k.startswith("PU-RLD DPO") and
       k.endswith("vs teacher")][0]
  assert (r["wins"], r["ties"], r["losses"]) == (2, 1, 1)
  assert r["judgements"] == 8 and r["disagreements"] == 0
  # The GRPO cell never ran: its rows say so.
  assert [r["status"] for r in rows if "GRPO" in r["label"]] == ["not run"] * 2
  # Judging again asks nothing (the ledger) and gives the same rows.
  calls = []
  again = writing.judge_all(runner, comps, PROMPTS, winrate.CallableJudge(
      lambda m: calls.append(m) or _longer(m), model="longer"), texts,
      samples=200)
  assert not calls
  assert [r.get("win_rate") for r in again] == [r.get("win_rate") for r in rows]
  text = writing.write(rows, str(tmp_path), "# header")
  assert "| SFT vs initial student | 4 / 4 | 1/2/1 | 50.0 [" in text
  assert (tmp_path / "winrate.png").stat().st_size > 0
  pairs = [json.loads(l) for l in
           (tmp_path / "judgements.jsonl").read_text().splitlines()]
  assert len(pairs) == 4 * 4  # four comparisons ran, four prompts each
  assert pairs[0]["verdicts"] == ["A", "B"] and pairs[0]["outcome"] == 1.0


@pytest.mark.slow
def test_the_study_end_to_end_on_the_tiny_model(tmp_path, fault_server):  # noqa: F811
  """Cells on configs/demo.py:tiny, the fault server answering as teacher and
  as judge (it echoes the request, whose template lists all three verdicts:
  the last, 'tie', is parsed, so every pair is a tie)."""
  data = tmp_path / "data"
  data.mkdir()
  for split, n in (("train", 16), ("eval", 4)):
    (data / f"{split}.jsonl").write_text("".join(
        json.dumps({"id": f"{split}{i}", "prompt": f"note {i}"}) + "\n"
        for i in range(n)))
  out = tmp_path / "study"
  argv = ["--scale=tiny", f"--out={out}",
          f"--teacher_url={fault_server.base_url}", "--teacher_model=fake",
          "--teacher_key_env=",
          f"--override=data.train_path={data / 'train.jsonl'}",
          f"--override=data.eval_path={data / 'eval.jsonl'}",
          "--override=data.buckets=(64,)", "--override=data.max_prompt_len=64",
          "--override=sft.steps=1", "--override=rl.steps=1",
          "--override=sft.max_response_len=32",
          "--override=teacher.max_tokens=32",
          "--override=sampling.max_new_tokens=8",
          "--override=eval.max_new_tokens=8",
          "--override=ckpt.async_save=False"]
  runner = common.Runner(str(out), env=train_fixtures.subprocess_env(),
                         echo=False)
  rows = writing.main(argv, runner=runner)
  assert [r["status"] for r in rows] == ["done"] * 4
  assert all(r["ties"] == r["pairs"] == 4 for r in rows)
  assert (out / "table.md").exists() and (out / "winrate.png").exists()
  asked = len(fault_server.requests)
  writing.main(argv, runner=runner)  # everything stored: no request
  assert len(fault_server.requests) == asked


def test_judge_scoring_flag_asks_for_logprobs():
  a = writing.parse_args(["--judge_scoring=probability"])
  assert a.judge_scoring == "probability"
  cfg = writing._teacher_cfg("http://x/v1", "j", "", 8, writing.WRITING,
                             top_logprobs=writing.JUDGE_TOP_LOGPROBS)
  assert (cfg.top_logprobs, cfg.max_tokens) == (writing.JUDGE_TOP_LOGPROBS, 8)
  assert writing.parse_args([]).judge_scoring == "verdict"
  with pytest.raises(SystemExit):
    writing.parse_args(["--judge_scoring=vote"])


def test_shuffled_control_keeps_the_words_and_loses_the_order(tmp_path):
  runner = common.Runner(str(tmp_path))
  _write_answers(runner, "sft", "sft", ["a b c", "d e", "f", "g h i j"])
  got = writing._answers(runner, "shuffled:sft:sft", None)
  assert got == {i: writing.shuffle_words(t, i) for i, t in zip(
      IDS, ["a b c", "d e", "f", "g h i j"])}
  text = "one two three four five six seven eight"
  a, b = writing.shuffle_words(text, "w0"), writing.shuffle_words(text, "w0")
  assert a == b and sorted(a.split()) == sorted(text.split()) and a != text
  assert writing.shuffle_words(text, "w1") != a  # the key picks the order
  got = writing.comparisons(["purld_dpo"], [0], ["shuffled"])
  assert [(c.model, c.reference) for c in got] == [
      ("sft:sft", "shuffled:sft:sft")]
  assert "shuffled" not in writing.parse_args([]).compare
