"""experiments.probes: the probe groups, the shares and ranks by hand, and
a scored run on the tiny model."""

import numpy as np
import pytest

from experiments import probes
from purld_jax import prompts as prompts_lib
from tests.core_fixtures import tiny_model  # noqa: F401
from tests.core_fixtures import tiny_tok  # noqa: F401


def test_probe_texts_by_hand():
  t = probes.probe_texts(["3", "7", "3"])
  assert list(t) == ["anchor", "off_by_one", "other", "No", "Yes",
                     "I don't know", "empty"]
  assert t["off_by_one"] == ["4", "8", "4"]
  # The next anchor that differs: for the last "3" that skips the first.
  assert t["other"] == ["7", "3", "7"]
  assert t["empty"] == ["", "", ""] and t["No"] == ["No"] * 3
  words = probes.probe_texts(["Paris", "Rome"])
  assert "off_by_one" not in words and words["other"] == ["Rome", "Paris"]
  with pytest.raises(ValueError, match="every anchor is the same"):
    probes.probe_texts(["1", " 1"])
  with pytest.raises(ValueError, match="at least 2"):
    probes.probe_texts(["1"])


def test_rows_by_hand_with_ties():
  names = ["anchor", "other", "No"]
  scores = np.array([[2.0, 1.0, 1.0],
                     [0.0, 1.0, 3.0]])
  rows = {r["probe"]: r for r in probes.rows_for("judge", names, scores)}
  assert rows["anchor"]["top"] == 0.5 and rows["No"]["top"] == 0.5
  assert rows["other"]["top"] == 0.0
  # No above the anchor: 1 < 2, then 3 > 0.
  assert rows["No"]["over_anchor"] == 0.5
  # No above the wrong number: a tie (1/2), then 3 > 1.
  assert rows["No"]["over_other"] == 0.75
  assert np.isnan(rows["anchor"]["over_anchor"])
  assert np.isnan(rows["other"]["over_other"])
  # Ranks: row 0 one above and one tied (1 + 1 + 1/2), row 1 first.
  assert rows["No"]["rank"] == (2.5 + 1.0) / 2
  assert rows["anchor"]["rank"] == (1.0 + 3.0) / 2
  assert rows["No"]["over_other_lo"] <= 0.75 <= rows["No"]["over_other_hi"]
  three_way = np.array([[1.0, 1.0, 1.0]])
  tied = probes.rows_for("x", names, three_way)
  assert [r["top"] for r in tied] == pytest.approx([1 / 3] * 3)
  assert [r["rank"] for r in tied] == [2.0, 2.0, 2.0]
  with pytest.raises(ValueError, match="for 3 probes"):
    probes.rows_for("x", names, np.zeros((2, 4)))


def test_scored_groups_on_the_tiny_model(tiny_model, tiny_tok):  # noqa: F811
  ps = [prompts_lib.Prompt.from_text("what is 1 + 2 ?", id="a", answer="3"),
        prompts_lib.Prompt.from_text("what is 2 + 5 ?", id="b", answer="7")]
  names, scores = probes.score_probes(tiny_model, tiny_tok, ps,
                                      ["similarity", "judge"],
                                      yes_word="Yes", no_word="No")
  assert names[:3] == ["anchor", "off_by_one", "other"]
  assert set(scores) == {"similarity", "judge"}
  for s in scores.values():
    assert s.shape == (2, len(names)) and np.isfinite(s).all()
  # Similarity to the anchor: the anchor itself is the only perfect match.
  sim = {r["probe"]: r for r in probes.rows_for("similarity", names,
                                                scores["similarity"])}
  assert sim["anchor"]["top"] == 1.0 and sim["anchor"]["rank"] == 1.0
  assert sim["empty"]["over_anchor"] == 0.0
  md = probes.table(list(sim.values()), "over_other")
  assert md.splitlines()[0].startswith("| scheme | anchor | off_by_one |")
  # A template of one's own reaches the judge: other rows, other scores.
  _, own = probes.score_probes(
      tiny_model, tiny_tok, ps, ["judge"], yes_word="Yes", no_word="No",
      template="Reference: {reference}\nAnswer: {response}\nSame? Yes or No.")
  assert own["judge"].shape == scores["judge"].shape
  assert not np.allclose(own["judge"], scores["judge"])


def test_shell_quote_survives_bash():
  import subprocess  # pylint: disable=g-import-not-at-top
  for arg in ["plain", "has space", "Q:\n{prompt}\n\nIt's \"x\" \\ y"]:
    quoted = probes.shell_quote(arg)
    assert "\n" not in quoted
    out = subprocess.run(["bash", "-c", f"printf %s {quoted}"],
                         capture_output=True, text=True, check=True).stdout
    assert out == arg


def test_cli_errors_name_the_flag(tmp_path, capsys):
  with pytest.raises(SystemExit):
    probes.main(["--schemes=oracle"])
  assert "--schemes: ['oracle']" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    probes.main([f"--prompts={tmp_path}/none.jsonl"])
  err = capsys.readouterr().err
  assert "--prompts: " in err and "none.jsonl" in err
  with pytest.raises(SystemExit):
    probes.main(["--schemes=judge,pmi", "--template={response}"])
  assert "--template applies to one scheme" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    probes.main(["--schemes=judge", "--template={prompt} {answer}"])
  assert "--template: unknown placeholder {answer}" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    probes.main([f"--model={tmp_path}", "--num_prompts=1"])
  assert f"--model: no config.json in {tmp_path}" in capsys.readouterr().err
