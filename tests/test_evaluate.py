"""Held-out evaluation: verifier, bootstrap intervals, table, greedy and
sampled answers."""

import json
import os

import numpy as np
import pytest

from purld_jax import data as data_lib
from purld_jax import evaluate
from purld_jax import prompts as prompts_lib
from purld_jax import sampling as sampling_lib
from purld_jax.train import student as student_lib
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)


def test_verify_uses_the_last_number():
  assert evaluate.verify("So 12*7 - 30 = 54.", "54") == 1.0
  assert evaluate.verify("The answer is 1,054", "54") == 0.0
  assert evaluate.verify("1,054", "1054") == 1.0
  assert evaluate.verify("-3", "-3") == 1.0
  assert evaluate.verify("no number", "3") == 0.0
  assert evaluate.verify("54", None) == 0.0
  v = evaluate.batch_verifier(["54", None])
  assert (v(0, "= 54"), v(1, "54")) == (1.0, 0.0)


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
  rng = np.random.default_rng(0)
  small = (rng.random(20) < 0.5).astype(float)
  big = (rng.random(2000) < 0.5).astype(float)
  lo_s, hi_s = evaluate.bootstrap_ci(small)
  lo_b, hi_b = evaluate.bootstrap_ci(big)
  assert lo_s <= small.mean() <= hi_s
  assert lo_b <= big.mean() <= hi_b
  # Binomial standard error sqrt(p(1-p)/n): width ~ 2 * 1.96 * se.
  se = np.sqrt(0.25 / 2000)
  assert abs((hi_b - lo_b) - 2 * 1.96 * se) < 0.3 * 2 * 1.96 * se
  assert hi_s - lo_s > 5 * (hi_b - lo_b)
  assert evaluate.bootstrap_ci(np.ones(7)) == (1.0, 1.0)


def test_paired_ci_sees_a_consistent_gain_an_unpaired_view_would_hide():
  # b is right exactly where a is, plus 3 more of 30: a +10 pt gain with no
  # prompt lost. Paired, every resample gains >= 0.
  a = np.array([1.0] * 15 + [0.0] * 15)
  b = a.copy()
  b[15:18] = 1.0
  lo, hi = evaluate.paired_ci(a, b)
  assert lo >= 0.0 and hi <= 0.3
  assert evaluate.bootstrap_ci(a)[1] > evaluate.bootstrap_ci(b)[0]


def test_seed_prompt_ci_with_one_seed_is_the_paired_ci():
  rng = np.random.default_rng(1)
  sft = (rng.random(40) < 0.3).astype(float)
  run = (rng.random(40) < 0.5).astype(float)
  assert evaluate.seed_prompt_ci(run[None], baseline=sft, samples=500,
                                 seed=4) == evaluate.paired_ci(
                                     sft, run, samples=500, seed=4)
  # two identical seeds: every seed draw gives the same means
  assert evaluate.seed_prompt_ci(np.stack([run, run]), samples=500) == (
      evaluate.bootstrap_ci(run, samples=500))


def test_seed_prompt_ci_widens_to_the_seeds_a_prompt_ci_hides():
  # Seed 0 gets every prompt wrong, seed 1 every prompt right. Averaged per
  # prompt (what the grid's CI resamples) every prompt is 0.5: [0.5, 0.5].
  # Resampling seeds, a draw is seed 0 twice (mean 0, p = 1/4), one of each
  # (0.5, p = 1/2) or seed 1 twice (1, p = 1/4), whatever the prompts: the
  # 2.5th and 97.5th percentiles are 0 and 1.
  runs = np.stack([np.zeros(10), np.ones(10)])
  assert evaluate.bootstrap_ci(runs.mean(axis=0)) == (0.5, 0.5)
  assert evaluate.seed_prompt_ci(runs) == (0.0, 1.0)
  # a baseline is subtracted per prompt: the gain's interval moves by it
  assert evaluate.seed_prompt_ci(runs, baseline=np.full(10, 0.25)) == (
      -0.25, 0.75)


def test_seed_prompt_ci_of_two_methods_resamples_both_sides_seeds():
  rng = np.random.default_rng(2)
  a = (rng.random(30) < 0.4).astype(float)
  b = (rng.random(30) < 0.6).astype(float)
  # one seed a side: the paired CI (up to rounding: means are subtracted
  # here, answers there)
  assert evaluate.seed_prompt_ci(b[None], baseline=a[None]) == pytest.approx(
      evaluate.paired_ci(a, b), abs=1e-12)
  # B's two seeds agree, A's are 0 and 1 everywhere: B - A draws are
  # m - 0, m - 0.5 or m - 1 (p = 1/4, 1/2, 1/4) up to prompt noise, which
  # is 0 on A's constant rows; B = 0.5 on every prompt removes it on B's
  hi_lo = evaluate.seed_prompt_ci(np.full((2, 30), 0.5),
                                  baseline=np.stack([np.zeros(30),
                                                     np.ones(30)]))
  assert hi_lo == (-0.5, 0.5)


def test_seed_prompt_ci_refuses_bad_shapes():
  with pytest.raises(ValueError, match="seeds, prompts"):
    evaluate.seed_prompt_ci(np.ones(5))
  with pytest.raises(ValueError, match="baseline"):
    evaluate.seed_prompt_ci(np.ones((2, 5)), baseline=np.ones(4))
  with pytest.raises(ValueError, match="baseline"):
    evaluate.seed_prompt_ci(np.ones((2, 5)), baseline=np.ones((1, 2, 5)))


def _answers(name, correct, lengths=None, finished=None):
  n = len(correct)
  return evaluate.Answers(
      name=name, ids=tuple(f"p{i}" for i in range(n)),
      texts=tuple("x" for _ in range(n)),
      lengths=np.asarray(lengths if lengths is not None else [3] * n),
      finished=np.asarray(finished if finished is not None else [True] * n,
                          bool),
      correct=np.asarray(correct, float))


def _ended(name, ended, n=100, cap=12):
  """n answers, the first `ended` finished (5 tokens), the rest cut at
  `cap` tokens (a cut answer is exactly the budget long)."""
  return _answers(name, [1.0] * n, lengths=[5] * ended + [cap] * (n - ended),
                  finished=[True] * ended + [False] * (n - ended))


def test_truncated_evaluation_warns_loudly_and_is_recorded(capsys, tmp_path):
  assert evaluate.MIN_ENDED == 0.95
  # 94 of 100 answers ended: 94 % < 95 %, a warning; 95 of 100: none.
  rows = evaluate.summarize([_ended("sft", 95), _ended("final", 94)],
                            baseline="sft")
  err = capsys.readouterr().err
  by = {r["model"]: r for r in rows}
  assert "truncation_warning" not in by["sft"]
  warning = by["final"]["truncation_warning"]
  for needle in ("TRUNCATED", "model 'final'", "94/100 = 94.0%",
                 "cut at 12 tokens", "raise eval.max_new_tokens"):
    assert needle in warning, (needle, warning)
  assert f"WARNING: {warning}" in err
  assert "'sft'" not in err
  # The table marks the share and repeats the warning; summary.json keeps it.
  table = evaluate.format_table(rows, baseline="sft")
  assert "  94%!" in table and "  95%\n" in table
  assert table.endswith(f"WARNING: {warning}")
  evaluate.write(str(tmp_path), [], rows)
  import json
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved[1]["truncation_warning"] == warning
  assert "truncation_warning" not in saved[0]
  # The budget and the folder, when the caller gives them, are named.
  rows = evaluate.summarize([_ended("before", 19, n=20)], baseline="sft",
                            max_new_tokens=12, where="/w/eval")
  assert "truncation_warning" not in rows[0]  # 19/20 = 95 %: no warning
  rows = evaluate.summarize([_ended("before", 18, n=20)], baseline="sft",
                            max_new_tokens=12, where="/w/eval")
  warning = rows[0]["truncation_warning"]
  assert ("model 'before' (/w/eval): only 18/20 = 90.0%" in warning
          and "eval.max_new_tokens=12" in warning)
  assert "/w/eval" in capsys.readouterr().err
  # No answers at all: nothing to warn about.
  assert "truncation_warning" not in evaluate.summarize(
      [_answers("x", [])], baseline="x")[0]


def test_summary_table_and_verdict():
  before = _answers("before", [0, 0, 0, 1], lengths=[10, 10, 10, 10])
  sft = _answers("sft", [0, 1, 0, 1])
  final = _answers("final", [1, 1, 1, 1])
  rows = evaluate.summarize([before, sft, final], baseline="sft")
  by = {r["model"]: r for r in rows}
  assert by["before"]["accuracy"] == 0.25 and by["before"]["mean_tokens"] == 10
  assert by["sft"]["accuracy"] == 0.5 and "gain" not in by["sft"]
  assert by["final"]["gain"] == 0.5
  assert by["before"]["gain"] == -0.25
  lo, hi = by["final"]["gain_ci"]
  # Differences [1, 0, 1, 0]: a resample's mean lies in [0, 1]; all zeros
  # has probability 1/16 > 2.5 %, so the interval touches zero.
  assert lo == 0.0 and 0.5 < hi <= 1.0
  table = evaluate.format_table(rows, baseline="sft")
  assert "+50.0 pt" in table and "50.0%" in table and "100.0%" in table
  assert "NOT significant" in evaluate.verdict(rows, baseline="sft",
                                               final="final")
  many = evaluate.summarize([_answers("sft", [0, 1] * 20),
                             _answers("final", [1, 1] * 20)], baseline="sft")
  assert "beats sft by +50.0 points on 40" in evaluate.verdict(
      many, baseline="sft", final="final")
  worse = evaluate.summarize([_answers("sft", [1, 1] * 20),
                              _answers("final", [0, 1] * 20)], baseline="sft")
  assert "WORSE" in evaluate.verdict(worse, baseline="sft", final="final")


def test_prompts_without_answers_are_not_scored():
  r = _answers("final", [np.nan, np.nan])
  rows = evaluate.summarize([r], baseline="sft")
  assert rows[0]["scored"] == 0 and "accuracy" not in rows[0]
  assert "n/a" in evaluate.format_table(rows, baseline="sft")
  assert "no verified accuracy" in evaluate.verdict(rows, baseline="sft",
                                                    final="final")


def test_write_and_read_back(tmp_path):
  r = _answers("final", [1, 0, np.nan])
  evaluate.write(str(tmp_path), [r], evaluate.summarize([r], baseline="x"))
  back = evaluate.read_answers(str(tmp_path / "final.jsonl"), "final")
  assert back.ids == r.ids and back.texts == r.texts
  np.testing.assert_array_equal(back.correct, r.correct)
  assert (tmp_path / "summary.json").exists()


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
  return student_lib.make(path="tiny", dtype_name="float32",
                          param_dtype_name="float32", init_seed=0,
                          cache_dir="", workdir=str(tmp_path_factory.mktemp("w")))


def test_greedy_answers_match_the_sampler_per_prompt(tiny_student, tmp_path):
  """Every prompt, filler batch rows dropped, in file order, equal to a
  one-prompt greedy call; correctness is `verify` of the decoded text."""
  st = tiny_student
  tok = st.tokenizer
  lines = [f'{{"id": "q{i}", "prompt": "{i} + 1 =", "answer": "{i + 1}"}}'
           for i in range(5)]
  path = tmp_path / "eval.jsonl"
  path.write_text("\n".join(lines) + "\n")
  source = data_lib.encode(prompts_lib.read_jsonl(str(path)), tok, max_len=64)
  graphdef, _ = st.abstract()
  params = st.init_params()
  got = evaluate.greedy_answers(graphdef, params, tok, source, name="m",
                                batch_size=2, max_new_tokens=5, buckets=(32,))
  assert got.ids == tuple(f"q{i}" for i in range(5))
  from flax import nnx
  model = nnx.merge(graphdef, params)
  sp = sampling_lib.SamplingParams(max_new_tokens=5, **evaluate.GREEDY)
  import jax
  for i, p in enumerate(source.prompts):
    want = sampling_lib.generate(model, tok, [p.as_dicts()],
                                 key=jax.random.key(1), sampling=sp,
                                 buckets=(32,))[0][0]
    assert got.texts[i] == want
    assert got.correct[i] == evaluate.verify(want, p.answer)
  got3 = evaluate.greedy_answers(graphdef, params, tok, source, name="m",
                                 batch_size=2, max_new_tokens=5,
                                 buckets=(32,), limit=3)
  assert got3.ids == ("q0", "q1", "q2") and got3.texts == got.texts[:3]


def test_sampled_answers_are_means_over_the_samples(tmp_path):
  """A stand-in sampler with known samples: per prompt, correct is the share
  of samples whose last number is the answer, finished the share that
  ended, lengths the mean; the records round-trip through write/read."""
  import types
  tok = types.SimpleNamespace(pad_id=0,
                              decode=lambda ids: " ".join(map(str, ids)))
  lines = [f'{{"id": "q{i}", "prompt": "p{i}", "answer": "{i + 1}"}}'
           for i in range(3)]
  path = tmp_path / "eval.jsonl"
  path.write_text("\n".join(lines) + "\n")
  source = data_lib.Encoded(prompts=tuple(prompts_lib.read_jsonl(str(path))),
                            index=(0, 1, 2), ids=((5,), (5,), (5,)),
                            dropped=(), pad_id=0)
  # Prompt b's 4 samples: the tokens "b+1" (right) in the first b + 1 of
  # them, "9" (wrong) in the rest; sample j has j + 1 tokens, and only
  # the even ones end.
  def sampler(params, tokens, mask, key, index):
    b, k, t = len(index), 4, 4
    toks = np.full((b, k, t), 9, np.int32)
    for r, i in enumerate(index):
      toks[r, :i + 1] = i + 1
    return types.SimpleNamespace(
        tokens=toks, lengths=np.tile(np.arange(1, k + 1), (b, 1)),
        finished=np.tile(np.arange(k) % 2 == 0, (b, 1)))
  got = evaluate.model_answers(
      None, None, tok, source, name="m", batch_size=2, samples=4,
      sampling=sampling_lib.SamplingParams(), buckets=(8,), sampler=sampler)
  np.testing.assert_allclose(got.correct, [1 / 4, 2 / 4, 3 / 4])
  np.testing.assert_allclose(got.finished, [0.5] * 3)
  np.testing.assert_allclose(got.lengths, [2.5] * 3)
  assert got.texts == ("1", "2", "3")  # the first sample: 1 token
  evaluate.write(str(tmp_path), [got], suffix=".sampled")
  back = evaluate.read_answers(str(tmp_path / "m.sampled.jsonl"), "m")
  np.testing.assert_allclose(back.correct, got.correct)
  np.testing.assert_allclose(back.finished, got.finished)
  # half of the samples ended: the truncation warning fires
  assert "= 50.0% of held-out" in evaluate.truncation_warning(
      got, max_new_tokens=4)


def test_heldout_adds_sampled_pass_at_1(tmp_path, capsys, jit_cache):  # noqa: F811
  """eval.samples > 0: a second table of sampled pass@1, its own files and
  settings; two models with the same weights get the same draws per prompt
  (a gain of exactly 0); a changed temperature re-samples, greedy is kept."""
  from purld_jax.train import heldout
  from tests import train_fixtures
  c = train_fixtures.tiny_config(**{"eval.num_prompts": 3,
                                    "eval.batch_size": 4, "eval.samples": 3,
                                    "eval.sample_batch_size": 2})
  models = {"before": "init", "final": "init"}
  rows = heldout.run(c, str(tmp_path), models)
  assert [r["model"] for r in rows] == ["before", "final"]
  out = tmp_path / "eval"
  assert {"before.sampled.jsonl", "final.sampled.settings.json",
          "summary.sampled.json", "summary.json"} <= set(os.listdir(out))
  sampled = json.loads((out / "summary.sampled.json").read_text())
  assert sampled[1]["gain"] == 0.0
  before = evaluate.read_answers(str(out / "before.sampled.jsonl"), "before")
  assert before.finished.dtype == np.float64 and len(before.ids) == 3
  printed = capsys.readouterr()
  assert "3 samples per prompt at temperature 1" in printed.err
  assert printed.out.count("gain vs before") == 2  # both tables
  c.eval.temperature = 0.5
  heldout.run(c, str(tmp_path), models)
  err = capsys.readouterr().err
  assert "[eval] before: already evaluated" in err
  assert "before.sampled: already evaluated" not in err
  assert json.loads((out / "before.sampled.settings.json").read_text())[
      "temperature"] == 0.5
