"""benchmarks/vlm_sampling.py at the tiny shape, K in (1, 2): its counts by
hand. Ours encodes the B x I image slots and prefills the B prompts once,
whatever K; transformers' generate prefills B * K rows (it encodes the
images once, before it repeats the inputs: `mm_encoder_outputs`), and with
that pre-encoding off the vision rows grow to B * K x tiles. Ours going
K-fold in either count fails this test."""

import json

import pytest

pytest.importorskip("torch")

from benchmarks import vlm_sampling  # noqa: E402

B = 2


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("vlmbench")
  out = tmp / "results.jsonl"
  row = vlm_sampling.main(["--shape=tiny", "--ks=1,2", "--repeats=1",
                           f"--workdir={tmp}", f"--out={out}"])
  return row, out


def test_the_batch_is_two_prompts_of_five_tiles_in_eight_slots(result):
  row, _ = result
  # 20 x 24 image -> 56 px -> 2 x 2 tiles of 28 px + the global view
  assert (row["B"], row["tiles_per_image"], row["slots"]) == (B, 5, 8)
  assert [r["K"] for r in row["per_k"]] == [1, 2]
  assert row["peers"] == ["generate", "generate-kfold"]


def test_ours_encodes_and_prefills_once_per_prompt(result):
  row, _ = result
  for r in row["per_k"]:
    o = r["ours"]
    # one vision call on [B, I] slots, one prefill of [B, P] rows
    assert o["vision_calls"] == [(B, 8, 3, 28, 28)], r["K"]
    assert o["vision_rows"] == B * 8
    assert o["prefill_calls"] == [(B, row["prompt_tokens"])]
    assert o["prefill_rows"] == B
    assert o["s"] > 0 and o["compile_s"] > 0


def test_the_peer_prefills_k_fold(result):
  row, _ = result
  for r in row["per_k"]:
    k = r["K"]
    g, kf = r["generate"], r["generate-kfold"]
    assert g["vision_rows"] == B * 5  # encoded once, features repeated
    assert g["prefill_rows"] == B * k
    assert kf["vision_rows"] == B * k * 5
    assert kf["prefill_rows"] == B * k
    assert g["prefill_calls"][0][1] == row["prompt_tokens"]
    assert g["text_forwards"] == 8  # prefill + 7 decode steps (T = 8)


def test_one_json_line_is_appended(result):
  row, out = result
  lines = out.read_text().splitlines()
  assert len(lines) == 1
  got = json.loads(lines[0])
  assert got["bench"] == "vlm_sampling" and got["shape"] == "tiny"
  assert got["per_k"][1]["generate-kfold"]["vision_rows"] == 20
