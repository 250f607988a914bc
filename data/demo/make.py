r"""Writes the demo prompt set: arithmetic word problems with integer answers.

  python data/demo/make.py            # rewrites train.jsonl and eval.jsonl here

Deterministic (seeded); train and eval share no question. One or two
operations on small numbers, so a 135M student gets some right and has room
to improve. Written for this project (see README.md in this folder).
"""

import json
import os
import random

SEED = 20240607
N_TRAIN, N_EVAL = 256, 64
INSTRUCTION = "Answer with the number only."

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo",
         "Ines", "Jon", "Kofi", "Lena", "Mia", "Nils", "Omar", "Priya")


def _problem(rng: random.Random):
  """(question, integer answer) of one of the templates, drawn by `rng`."""
  name = rng.choice(NAMES)
  kind = rng.randrange(8)
  if kind == 0:
    a, b = rng.randint(5, 60), rng.randint(2, 40)
    return f"{name} has {a} marbles and finds {b} more. How many marbles does {name} have now?", a + b
  if kind == 1:
    a = rng.randint(20, 90)
    b = rng.randint(1, a - 1)
    return f"{name} had {a} stickers and gave {b} of them away. How many stickers are left?", a - b
  if kind == 2:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"A box holds {a} pencils. How many pencils are in {b} boxes?", a * b
  if kind == 3:
    q, b = rng.randint(2, 12), rng.randint(2, 9)
    return (f"{q * b} apples are shared equally among {b} children. "
            f"How many apples does each child get?"), q
  if kind == 4:
    a, b = rng.randint(3, 12), rng.randint(3, 12)
    c = rng.randint(1, a * b - 1)
    return (f"A baker has {a} trays of {b} rolls and sells {c} rolls. "
            f"How many rolls are left?"), a * b - c
  if kind == 5:
    a, b = rng.randint(5, 40), rng.randint(5, 40)
    c = a + b + rng.randint(1, 60)
    return (f"{name} read {a} pages on Monday and {b} pages on Tuesday. The book "
            f"has {c} pages. How many pages are left to read?"), c - a - b
  if kind == 6:
    a, b = rng.randint(20, 90), rng.randint(2, 6)
    return f"A train travels {a} km each hour. How far does it travel in {b} hours?", a * b
  a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 30)
  return (f"{name} buys {a} packs of {b} cards and already had {c} cards. "
          f"How many cards does {name} have in all?"), a * b + c


def make(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL):
  """(train records, eval records): distinct questions, drawn in order."""
  rng = random.Random(seed)
  seen, records = set(), []
  while len(records) < n_train + n_eval:
    question, answer = _problem(rng)
    if question in seen:
      continue
    seen.add(question)
    records.append((f"{question} {INSTRUCTION}", str(answer)))
  train = [{"id": f"train-{i:04d}", "prompt": q, "answer": a}
           for i, (q, a) in enumerate(records[:n_train])]
  evals = [{"id": f"eval-{i:04d}", "prompt": q, "answer": a}
           for i, (q, a) in enumerate(records[n_train:])]
  return train, evals


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  train, evals = make()
  for name, records in (("train.jsonl", train), ("eval.jsonl", evals)):
    with open(os.path.join(here, name), "w", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} prompts to {os.path.join(here, name)}")


if __name__ == "__main__":
  main()
