"""The shapes task: answers read back from the pixels, determinism, disjoint
splits, and the committed data/shapes files through prompts.read_jsonl."""

import collections
import importlib.metadata
import io
import json
import os

import numpy as np
import pytest

from purld_jax import evaluate
from purld_jax import prompts
from purld_jax.tasks import build
from purld_jax.tasks import dedup
from purld_jax.tasks import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "data", "shapes")


def _rgb(png: bytes) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _mask(pixels: np.ndarray, rgb) -> np.ndarray:
  return np.all(pixels == np.array(rgb, np.uint8), axis=-1)


def _blobs(mask: np.ndarray) -> int:
  """4-connected components of a boolean mask (flood fill)."""
  seen, n = np.zeros_like(mask), 0
  for y, x in zip(*np.nonzero(mask)):
    if seen[y, x]:
      continue
    n += 1
    stack = [(y, x)]
    seen[y, x] = True
    while stack:
      cy, cx = stack.pop()
      for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
        if (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
            and mask[ny, nx] and not seen[ny, nx]):
          seen[ny, nx] = True
          stack.append((ny, nx))
  return n


# A seven-segment reading written from the standard layout, not from
# shapes.SEGMENTS: lit segments, in the order a b c d e f g, per digit.
_LIT = {"1111110": "0", "0110000": "1", "1101101": "2", "1111001": "3",
        "0110011": "4", "1011011": "5", "1011111": "6", "1110000": "7",
        "1111111": "8", "1111011": "9"}


def _read_digits(pixels: np.ndarray, cells) -> str:
  """The number in `cells` ((x, y, w, h) per digit), from one pixel inside
  where each segment lies: top, upper right, lower right, bottom, lower
  left, upper left, middle."""
  ink = ~_mask(pixels, shapes.BACKGROUND)
  out = ""
  for x, y, w, h in cells:
    points = [(x + w // 2, y + 1), (x + w - 2, y + h // 4),
              (x + w - 2, 3 * h // 4 + y), (x + w // 2, y + h - 2),
              (x + 1, y + 3 * h // 4), (x + 1, y + h // 4), (x + w // 2, y + h // 2)]
    out += _LIT["".join("1" if ink[py, px] else "0" for px, py in points)]
  return out


# ------------------------------------------------------------ hand-made scenes

def test_hand_made_count_scene():
  scene = [shapes.Shape("circle", "red", 10, 10, 16),
           shapes.Shape("square", "red", 60, 10, 16),
           shapes.Shape("triangle", "blue", 10, 60, 20),
           shapes.Shape("square", "red", 60, 60, 12)]
  pixels = _rgb(shapes.png(shapes.render(scene)))
  assert pixels.shape == (128, 128, 3)
  assert _blobs(_mask(pixels, shapes.COLOURS["red"])) == 3
  assert _blobs(_mask(pixels, shapes.COLOURS["blue"])) == 1
  assert _blobs(_mask(pixels, shapes.COLOURS["green"])) == 0
  # Squares are filled boxes, corners inclusive: 16 * 16 + 12 * 12 pixels.
  assert _mask(pixels[:, 55:], shapes.COLOURS["red"]).sum() == 16 * 16 + 12 * 12


def test_hand_made_digits_and_larger():
  d = shapes.Digits("1807", x=8, y=30, w=14, gap=6)
  pixels = _rgb(shapes.png(shapes.render(digits=d)))
  assert _read_digits(pixels, d.cells()) == "1807"
  assert [c[0] for c in d.cells()] == [8, 28, 48, 68]
  im = shapes.render([shapes.Shape("square", "green", 5, 5, 30),
                      shapes.Shape("square", "purple", 80, 80, 10)])
  assert shapes.areas(im)["green"] == 900 and shapes.areas(im)["purple"] == 100
  assert shapes.describe([shapes.Shape("circle", "orange", 0, 0, 20),
                          shapes.Shape("square", "red", 100, 100, 20)]) == (
      "A white square image with 2 shapes: an orange circle (top left), "
      "a red square (bottom right).")


# ------------------------------------------------------------ generated items

@pytest.fixture(scope="module")
def items():
  return shapes.generate(90, seed=11, split="train")


def test_generated_answers_read_back_from_the_pixels(items):
  by_kind = collections.Counter(r["metadata"]["kind"] for r in items)
  assert by_kind == {"count": 30, "digits": 30, "larger": 30}
  for r in items:
    [png] = r["images"]
    pixels, meta = _rgb(png), r["metadata"]
    assert evaluate.verify(r["solution"], r["answer"]) == 1.0
    assert r["prompt"].endswith(shapes.INSTRUCTION)
    if meta["kind"] == "count":
      assert f" {meta['colour']}" in r["prompt"].split("?")[0]
      assert _blobs(_mask(pixels, shapes.COLOURS[meta["colour"]])) == int(r["answer"])
    elif meta["kind"] == "digits":
      d = shapes.Digits(**meta["digits"])
      assert _read_digits(pixels, d.cells()) == r["answer"]
      assert r["answer"][0] != "0" and 2 <= len(r["answer"]) <= 4
    else:
      a, b = meta["shapes"]
      first = f"{a['colour']} {a['kind']}"
      second = f"{b['colour']} {b['kind']}"
      assert any(f"1 {w} the {first}" in r["prompt"] for w in ("if it is", "for"))
      assert second in r["prompt"]
      px = [_mask(pixels, shapes.COLOURS[s["colour"]]).sum() for s in (a, b)]
      assert max(px) >= shapes.MIN_RATIO * min(px)
      assert r["answer"] == ("1" if px[0] > px[1] else "2")


def test_describe_items_have_no_answer():
  for r in shapes.generate(6, seed=0, split="eval", kinds=("describe",)):
    assert "answer" not in r and "solution" not in r
    scene = r["metadata"]["shapes"]
    assert r["metadata"]["description"].count(" (") == len(scene)
    pixels = _rgb(r["images"][0])
    assert (~_mask(pixels, shapes.BACKGROUND)).sum() > 0


def test_deterministic_by_seed_and_split():
  def fingerprint(records):
    return [(r["prompt"], r.get("answer"), r["images"]) for r in records]
  a = shapes.generate(12, seed=3, split="train")
  assert fingerprint(a) == fingerprint(shapes.generate(12, seed=3, split="train"))
  assert fingerprint(a) != fingerprint(shapes.generate(12, seed=4, split="train"))
  assert fingerprint(a) != fingerprint(shapes.generate(12, seed=3, split="eval"))
  # Each kind has its own generator: one kind alone draws the same items.
  counts = shapes.generate(4, seed=3, split="train", kinds=("count",))
  assert fingerprint(a[::3]) == fingerprint(counts)


def test_dedup_keys_cover_images():
  red = shapes.png(shapes.render([shapes.Shape("square", "red", 5, 5, 20)]))
  blue = shapes.png(shapes.render([shapes.Shape("square", "blue", 5, 5, 20)]))
  q = "How many shapes?"
  rows = [{"id": "a", "prompt": q, "images": [red]},
          {"id": "b", "prompt": q + "  ", "images": [bytes(red)]},  # dup of a
          {"id": "c", "prompt": q, "images": [blue]},
          {"id": "d", "prompt": q}]
  kept, removed = dedup.within(rows)
  assert [r["id"] for r in kept] == ["a", "c", "d"] and removed == 1
  assert dedup.record_key(rows[3]) == dedup.key(q)  # text-only: as before
  kept, removed = dedup.against(kept, [{"prompt": q, "images": [blue]}])
  assert [r["id"] for r in kept] == ["a", "d"] and removed == 1


# ------------------------------------------------------------ build and files

def _split_keys(folder):
  out = {}
  for split in ("train", "dev", "eval"):
    read = prompts.read_jsonl(os.path.join(folder, f"{split}.jsonl"))
    out[split] = read
  return out


def _assert_disjoint(splits):
  keyed = {name: {dedup.record_key({"prompt": p.messages[-1][1],
                                    "images": list(p.images)}) for p in ps}
           for name, ps in splits.items()}
  images = {name: {p.images for p in ps} for name, ps in splits.items()}
  for x, y in (("train", "dev"), ("train", "eval"), ("dev", "eval")):
    assert not keyed[x] & keyed[y], (x, y)
    assert not images[x] & images[y], (x, y)  # not even a picture shared


def test_build_writes_disjoint_splits_with_images(tmp_path):
  out = tmp_path / "s"
  (out / "images").mkdir(parents=True)
  (out / "images" / "stale.png").write_bytes(b"old")
  assert build.main(["--task=shapes", f"--out={out}", "--num_train=24",
                     "--num_dev=9", "--num_eval=12", "--seed=2"]) == 0
  splits = _split_keys(out)
  assert {k: len(v) for k, v in splits.items()} == {"train": 24, "dev": 9, "eval": 12}
  _assert_disjoint(splits)
  files = sorted(os.listdir(out / "images"))
  assert "stale.png" not in files and len(files) == 45
  record = json.loads((out / "train.jsonl").read_text().splitlines()[0])
  [path] = record["images"]
  assert path.startswith("images/") and path.endswith(".png")
  assert splits["train"][0].images == ((out / path).read_bytes(),)
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["counts"]["dev"]["written"] == 9
  assert manifest["outputs"]["images"]["files"] == 45


def test_committed_data_reads_back():
  splits = _split_keys(DATA)
  assert {k: len(v) for k, v in splits.items()} == {"train": 512, "dev": 200,
                                                    "eval": 500}
  _assert_disjoint(splits)
  for p in [p for ps in splits.values() for p in ps]:
    assert len(p.images) == 1 and p.images[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert p.answer is not None and evaluate.verify(p.solution, p.answer) == 1.0
  describe = os.path.join(REPO, "data", "shapes_describe")
  for split, n in (("train", 64), ("dev", 32), ("eval", 64)):
    read = prompts.read_jsonl(os.path.join(describe, f"{split}.jsonl"))
    assert len(read) == n and all(p.answer is None and p.images for p in read)


def test_committed_data_is_what_the_build_writes(tmp_path):
  manifest = json.load(open(os.path.join(DATA, "manifest.json")))
  if manifest["sources"]["train"]["pillow"] != importlib.metadata.version("pillow"):
    pytest.skip("another Pillow version encodes other PNG bytes")
  build.main(["--task=shapes", f"--out={tmp_path}"])
  for name in ("train.jsonl", "dev.jsonl", "eval.jsonl", "manifest.json"):
    assert (tmp_path / name).read_bytes() == open(os.path.join(DATA, name), "rb").read()
  assert sorted(os.listdir(tmp_path / "images")) == sorted(
      os.listdir(os.path.join(DATA, "images")))
