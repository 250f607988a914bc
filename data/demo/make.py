r"""Writes the demo prompt set: one-step arithmetic questions with integer answers.

  python data/demo/make.py            # rewrites train.jsonl and eval.jsonl here

Deterministic (seeded); train and eval share no question. One operation on
small numbers: the embedded SmolLM2-135M answers about half of them right
greedily and far fewer when sampling at temperature 1, so there is room for
PU-RL to turn "sometimes right" into "right first" in a few minutes of CPU.
(Two-step word problems sit near 0 % for a 135M model whatever the
training: no signal.) Written for this project (see README.md here).
"""

import json
import os
import random

SEED = 20240607
N_TRAIN, N_EVAL = 256, 128
INSTRUCTION = "Answer with the number only."

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo",
         "Ines", "Jon", "Kofi", "Lena", "Mia", "Nils", "Omar", "Priya")


def _problem(rng: random.Random):
  """(question, integer answer) of one of the templates, drawn by `rng`."""
  name = rng.choice(NAMES)
  kind = rng.randrange(8)
  if kind == 0:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return f"What is {a} + {b}?", a + b
  if kind == 1:
    a = rng.randint(5, 30)
    b = rng.randint(1, a - 1)
    return f"What is {a} - {b}?", a - b
  if kind == 2:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return f"What is {a} times {b}?", a * b
  if kind == 3:
    a = rng.randint(10, 99)
    return f"What number comes after {a}?", a + 1
  if kind == 4:
    a = rng.randint(10, 99)
    return f"What number comes before {a}?", a - 1
  if kind == 5:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return (f"{name} has {a} apples and gets {b} more. How many apples does "
            f"{name} have now?"), a + b
  if kind == 6:
    a = rng.randint(2, 30)
    return f"What is double {a}?", 2 * a
  a = rng.randint(5, 20)
  b = rng.randint(1, a - 1)
  return f"{name} had {a} sweets and ate {b}. How many sweets are left?", a - b


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
