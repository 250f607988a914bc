"""Synthetic picture questions with verifiable answers, for vision-language
students (SmolVLM / Idefics3): flat shapes and seven-segment digits drawn
with PIL on a small white canvas, so that every answer is known exactly.

Kinds (``KINDS``), one question a picture, answers integers (judged like the
arithmetic set: the last number of the reply, ``evaluate.verify``):

  count    3 to 11 non-overlapping shapes (circle, square, triangle) in up to
           six colours; "How many red shapes are there?" -> the number (1-6).
  digits   a 2- to 4-digit number (no leading zero) drawn as seven-segment
           digits; "What number is shown?" -> the number.
  larger   two shapes of different colours whose areas (pixels drawn)
           differ by a factor of at least ``MIN_RATIO``; "Which is larger,
           the red circle or the blue square? Answer 1 for the red circle,
           2 for the blue square." -> 1 or 2.
  describe 2 to 6 shapes; "Describe the image ..." (no answer: judged, like
           the writing set; ``metadata.description`` is a plain account of
           the scene for a judge or a reader).

Each record is ``{"id", "prompt", "answer", "solution", "images": [PNG
bytes], "source", "metadata"}``; ``build.py`` writes the PNGs beside the
JSONL and puts their relative paths in ``images``. ``solution`` is a one-line
worked answer ("There are 3 red shapes. The answer is 3."), what the
``dataset`` teacher answers. Truth is taken from the scene as drawn: counts
from the shapes placed (they never overlap, so each is one visible blob),
areas from the pixels of each colour in the rendered image.

Deterministic: the items of a split depend only on (seed, split) (a
``random.Random`` seeded by a hash of the two) and the Pillow version (the
PNG encoder; the committed files name it in their manifest). Images are
``SIZE`` x ``SIZE`` palette PNGs (a few hundred bytes each).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import io
import os
import random
from typing import Any

SIZE = 128
KINDS = ("count", "digits", "larger")
SHAPES = ("circle", "square", "triangle")
# Palette index -> (name, RGB); 0 is the white background, 7 the ink of digits.
COLOURS = {"red": (220, 38, 38), "blue": (37, 99, 235), "green": (22, 163, 74),
           "yellow": (234, 179, 8), "purple": (147, 51, 234),
           "orange": (249, 115, 22)}
BACKGROUND, INK = (255, 255, 255), (17, 17, 17)
MIN_RATIO = 1.8   # larger: area of the larger / area of the smaller, at least
GAP = 4           # pixels between the bounding boxes of two shapes
# Seven segments of a digit, named a (top), b (top right), c (bottom right),
# d (bottom), e (bottom left), f (top left), g (middle).
SEGMENTS = {"0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg",
            "5": "acdfg", "6": "acdefg", "7": "abc", "8": "abcdefg",
            "9": "abcdfg"}

_COUNT = ("How many {colour} shapes are in the image?",
          "Count the {colour} shapes in this picture. How many are there?",
          "How many shapes in the image are {colour}?")
_DIGITS = ("What number is shown in the image?",
           "Read the number written in this picture. What is it?",
           "The image shows a number in digital-clock digits. What number is it?")
_LARGER = ("Which shape is larger: the {a} or the {b}? Answer 1 if it is the "
           "{a}, 2 if it is the {b}.",
           "Look at the {a} and the {b}. Which one is bigger? Reply 1 for the "
           "{a} or 2 for the {b}.")
_DESCRIBE = ("Describe this image in two or three sentences.",
             "Describe the image for someone who cannot see it: which shapes, "
             "which colours, and where they are.",
             "Write a short caption for this picture, then list the shapes "
             "you see.",
             "What is in this image? Describe it briefly and precisely.")
INSTRUCTION = "Answer in one short sentence ending with the number."


@dataclasses.dataclass(frozen=True)
class Shape:
  """A shape inside the box (x, y, x + size - 1, y + size - 1)."""

  kind: str
  colour: str
  x: int
  y: int
  size: int

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Digits:
  """A number drawn in seven-segment digits, each ``w`` x ``2w`` pixels,
  the first at (x, y), one every ``w + gap`` pixels."""

  text: str
  x: int
  y: int
  w: int
  gap: int

  @property
  def thickness(self) -> int:
    return max(2, self.w // 4)

  def cells(self) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) of each digit."""
    return [(self.x + i * (self.w + self.gap), self.y, self.w, 2 * self.w)
            for i in range(len(self.text))]


# ---------------------------------------------------------------- drawing

def _palette() -> list[int]:
  flat = list(BACKGROUND)
  for rgb in COLOURS.values():
    flat += rgb
  return flat + list(INK)


def _index(colour: str) -> int:
  return 1 + list(COLOURS).index(colour)


def _segment_boxes(x, y, w, h, t) -> dict[str, tuple[int, int, int, int]]:
  """Segment -> inclusive (x0, y0, x1, y1), with LCD-like gaps at corners."""
  mid = y + h // 2
  return {"a": (x + t, y, x + w - 1 - t, y + t - 1),
          "d": (x + t, y + h - t, x + w - 1 - t, y + h - 1),
          "g": (x + t, mid - t // 2, x + w - 1 - t, mid - t // 2 + t - 1),
          "f": (x, y + t, x + t - 1, mid - 1),
          "b": (x + w - t, y + t, x + w - 1, mid - 1),
          "e": (x, mid, x + t - 1, y + h - t - 1),
          "c": (x + w - t, mid, x + w - 1, y + h - t - 1)}


def render(shapes=(), digits: Digits | None = None):
  """The scene as a SIZE x SIZE palette ("P") PIL image."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  im = Image.new("P", (SIZE, SIZE), 0)
  im.putpalette(_palette())
  draw = ImageDraw.Draw(im)
  for s in shapes:
    box, fill = (s.x, s.y, s.x + s.size - 1, s.y + s.size - 1), _index(s.colour)
    if s.kind == "circle":
      draw.ellipse(box, fill=fill)
    elif s.kind == "square":
      draw.rectangle(box, fill=fill)
    elif s.kind == "triangle":
      draw.polygon([(box[0], box[3]), (box[2], box[3]),
                    ((box[0] + box[2]) / 2, box[1])], fill=fill)
    else:
      raise ValueError(f"unknown shape {s.kind!r}")
  if digits is not None:
    ink = len(COLOURS) + 1
    for ch, (x, y, w, h) in zip(digits.text, digits.cells()):
      boxes = _segment_boxes(x, y, w, h, digits.thickness)
      for seg in SEGMENTS[ch]:
        draw.rectangle(boxes[seg], fill=ink)
  return im


def png(im) -> bytes:
  """PNG bytes of a rendered scene (deterministic for a Pillow version)."""
  buf = io.BytesIO()
  im.save(buf, format="PNG", optimize=True)
  return buf.getvalue()


def areas(im) -> dict[str, int]:
  """Colour name -> pixels of that colour in a rendered scene."""
  counts = dict(enumerate(im.histogram()))
  return {c: counts.get(_index(c), 0) for c in COLOURS}


# ---------------------------------------------------------------- scenes

def _place(rng: random.Random, specs, *, lo=14, hi=24, tries=200) -> list[Shape]:
  """Shapes for [(kind, colour, size or None), ...], boxes GAP apart;
  starts over (up to `tries` times) when one does not fit."""
  for _ in range(tries):
    placed: list[Shape] = []
    for kind, colour, size in specs:
      size = size or rng.randint(lo, hi)
      for _ in range(50):
        x, y = rng.randint(2, SIZE - 2 - size), rng.randint(2, SIZE - 2 - size)
        if all(x + size + GAP <= p.x or p.x + p.size + GAP <= x or
               y + size + GAP <= p.y or p.y + p.size + GAP <= y
               for p in placed):
          placed.append(Shape(kind, colour, x, y, size))
          break
      else:
        break
    else:
      return placed
  raise RuntimeError(f"cannot place {len(specs)} shapes on {SIZE}x{SIZE}")


def _where(s: Shape) -> str:
  cx, cy = s.x + s.size / 2, s.y + s.size / 2
  col = ("left", "centre", "right")[min(2, int(3 * cx / SIZE))]
  row = ("top", "middle", "bottom")[min(2, int(3 * cy / SIZE))]
  return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def describe(shapes) -> str:
  """A plain account of a scene: 'A white square image with 2 shapes: a red
  circle (top left), a blue square (bottom right).'"""
  parts = [f"{'an' if s.colour[0] in 'aeiou' else 'a'} {s.colour} {s.kind} "
           f"({_where(s)})" for s in shapes]
  return (f"A white square image with {len(shapes)} shapes: "
          + ", ".join(parts) + ".")


def count_item(rng: random.Random) -> dict[str, Any]:
  colour = rng.choice(list(COLOURS))
  n = rng.randint(1, 6)
  others = [c for c in COLOURS if c != colour]
  specs = [(rng.choice(SHAPES), colour, None) for _ in range(n)]
  specs += [(rng.choice(SHAPES), rng.choice(others), None)
            for _ in range(rng.randint(2, 5))]
  rng.shuffle(specs)
  shapes = _place(rng, specs, lo=12, hi=20)
  noun = "shape" if n == 1 else "shapes"
  verb = "is" if n == 1 else "are"
  return dict(prompt=rng.choice(_COUNT).format(colour=colour), answer=str(n),
              solution=f"There {verb} {n} {colour} {noun}. The answer is {n}.",
              image=render(shapes),
              metadata=dict(colour=colour, shapes=[s.as_dict() for s in shapes]))


def digits_item(rng: random.Random) -> dict[str, Any]:
  n_digits = rng.randint(2, 4)
  text = str(rng.randint(10 ** (n_digits - 1), 10 ** n_digits - 1))
  w = rng.randint(12, 20)
  gap = rng.randint(w // 3, w // 2 + 2)
  width = n_digits * w + (n_digits - 1) * gap
  d = Digits(text, rng.randint(4, SIZE - 4 - width),
             rng.randint(4, SIZE - 4 - 2 * w), w, gap)
  return dict(prompt=rng.choice(_DIGITS), answer=text,
              solution=f"The number shown is {text}. The answer is {text}.",
              image=render(digits=d), metadata=dict(digits=dataclasses.asdict(d)))


def _name(s: Shape) -> str:
  return f"{s.colour} {s.kind}"


def larger_item(rng: random.Random) -> dict[str, Any]:
  ca, cb = rng.sample(list(COLOURS), 2)
  while True:
    sa, sb = rng.randint(12, 44), rng.randint(12, 44)
    shapes = _place(rng, [(rng.choice(SHAPES), ca, sa),
                          (rng.choice(SHAPES), cb, sb)])
    im = render(shapes)
    px = areas(im)
    big, small = max(px[ca], px[cb]), min(px[ca], px[cb])
    if big >= MIN_RATIO * small:
      break
  a, b = shapes
  answer = "1" if px[ca] > px[cb] else "2"
  winner = _name(a) if answer == "1" else _name(b)
  return dict(prompt=rng.choice(_LARGER).format(a=_name(a), b=_name(b)),
              answer=answer,
              solution=f"The {winner} is larger. The answer is {answer}.",
              image=im, metadata=dict(shapes=[s.as_dict() for s in shapes],
                                      areas={ca: px[ca], cb: px[cb]}))


def describe_item(rng: random.Random) -> dict[str, Any]:
  specs = [(rng.choice(SHAPES), rng.choice(list(COLOURS)), None)
           for _ in range(rng.randint(2, 6))]
  shapes = _place(rng, specs, lo=14, hi=30)
  return dict(prompt=rng.choice(_DESCRIBE), image=render(shapes),
              metadata=dict(shapes=[s.as_dict() for s in shapes],
                            description=describe(shapes)))


MAKERS = {"count": count_item, "digits": digits_item, "larger": larger_item,
          "describe": describe_item}


# ---------------------------------------------------------------- splits

def split_seed(seed: int, split: str, kind: str) -> int:
  digest = hashlib.sha256(f"shapes:{seed}:{split}:{kind}".encode()).hexdigest()
  return int(digest[:16], 16)


def generate(n: int, *, seed: int, split: str, kinds=KINDS
             ) -> list[dict[str, Any]]:
  """n records, kinds interleaved round-robin; each kind drawn from its own
  generator seeded by (seed, split, kind). Verifiable kinds get INSTRUCTION
  appended to the question."""
  rngs = {k: random.Random(split_seed(seed, split, k)) for k in kinds}
  out = []
  for i in range(n):
    kind = kinds[i % len(kinds)]
    item = MAKERS[kind](rngs[kind])
    data, prompt = png(item.pop("image")), item.pop("prompt")
    metadata = dict(item.pop("metadata"), kind=kind)
    if "answer" in item:
      prompt = f"{prompt} {INSTRUCTION}"
    out.append(dict(id=f"shapes-{split}-{kind}-{i:05d}", prompt=prompt,
                    images=[data], source=f"shapes/{kind}", **item,
                    metadata=metadata))
  return out


def provenance(kinds=KINDS) -> dict[str, Any]:
  """The generator's source hash and the Pillow version (PNG bytes)."""
  with open(os.path.abspath(__file__), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  return {"generator": "purld_jax/tasks/shapes.py", "sha256": digest,
          "pillow": importlib.metadata.version("pillow"), "kinds": list(kinds),
          "size": [SIZE, SIZE], "licence": "Apache-2.0 (generated for purld_jax)"}
