r"""Writes the arithmetic prompt set of the study protocol (docs/METHOD.md).

  python data/arith/make.py      # rewrites train/dev/eval.jsonl here

Short word and number problems (one or two operations on small numbers)
whose answer is an integer. Unlike data/demo, the prompt asks for one
sentence with the calculation, not "the number only": the 135M student
keeps the little reasoning it has (its answers are equations such as
"Lena has 13 + 10 = 23 apples now."), answers are judged by their last
number, and they end: on 40 dev prompts the untrained SmolLM2 ended all
of them at a mean of 22 tokens, where "Solve it step by step, briefly."
left 27 % unfinished at 256 tokens (it loops). Splits:
train (512: the only prompts with teacher anchors), dev (200: choosing
hyper-parameters) and eval (500: held out, reported once), no question in
two splits. Each record has `solution`, a worked reference used by the
`dataset` teacher backend (a SIMULATED teacher; the default is a real LLM's
recorded anchors, third_party/anchors/). Deterministic: same seed, same
bytes. Written for this project.
"""

import json
import os
import random

SEED = 20261206
SPLITS = (("train", 512), ("dev", 200), ("eval", 500))
INSTRUCTION = "Answer in one short sentence with the calculation."

NAMES = ("Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo",
         "Ines", "Jon", "Kofi", "Lena", "Mia", "Nils", "Omar", "Priya",
         "Rosa", "Sami", "Tara", "Yuki")
THINGS = ("apples", "pencils", "stickers", "marbles", "cards", "books",
          "shells", "coins")


def _problem(rng: random.Random):
  """(question, integer answer, worked solution), drawn by `rng`."""
  name, thing = rng.choice(NAMES), rng.choice(THINGS)
  kind = rng.randrange(10)
  if kind == 0:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return f"What is {a} + {b}?", a + b, f"{a} + {b} = {a + b}."
  if kind == 1:
    a = rng.randint(10, 90)
    b = rng.randint(1, a - 1)
    return f"What is {a} - {b}?", a - b, f"{a} - {b} = {a - b}."
  if kind == 2:
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    return f"What is {a} times {b}?", a * b, f"{a} x {b} = {a * b}."
  if kind == 3:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return (f"{name} has {a} {thing} and gets {b} more. How many {thing} "
            f"does {name} have now?"), a + b, (
                f"{name} has {a} + {b} = {a + b} {thing}.")
  if kind == 4:
    a = rng.randint(6, 40)
    b = rng.randint(1, a - 1)
    return (f"{name} had {a} {thing} and gave away {b}. How many {thing} are "
            f"left?"), a - b, f"{a} - {b} = {a - b} {thing} are left."
  if kind == 5:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return (f"There are {a} bags with {b} {thing} in each bag. How many "
            f"{thing} are there in all?"), a * b, (
                f"{a} bags x {b} {thing} = {a * b} {thing}.")
  if kind == 6:
    b = rng.randint(2, 9)
    q = rng.randint(2, 9)
    return (f"{name} shares {b * q} {thing} equally among {b} friends. How "
            f"many {thing} does each friend get?"), q, (
                f"{b * q} / {b} = {q} {thing} each.")
  if kind == 7:
    a = rng.randint(3, 40)
    return f"What is double {a}?", 2 * a, f"Double {a} is 2 x {a} = {2 * a}."
  if kind == 8:
    a, b = rng.randint(2, 15), rng.randint(2, 15)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {thing}, buys {b} more and then loses {c}. How "
            f"many {thing} does {name} have now?"), a + b - c, (
                f"{a} + {b} = {a + b}, then {a + b} - {c} = {a + b - c}.")
  a, b = rng.randint(2, 9), rng.randint(2, 9)
  c = rng.randint(1, 10)
  return (f"{name} buys {a} packs of {b} {thing} and finds {c} more. How "
          f"many {thing} does {name} have?"), a * b + c, (
              f"{a} x {b} = {a * b}, then {a * b} + {c} = {a * b + c}.")


def make(seed: int = SEED) -> dict[str, list[dict]]:
  """{split: records}: distinct questions, drawn in order."""
  rng = random.Random(seed)
  seen, records = set(), []
  total = sum(n for _, n in SPLITS)
  while len(records) < total:
    question, answer, solution = _problem(rng)
    if question in seen:
      continue
    seen.add(question)
    records.append((question, answer, solution))
  out, start = {}, 0
  for split, n in SPLITS:
    out[split] = [
        {"id": f"{split}-{i:04d}", "prompt": f"{q} {INSTRUCTION}",
         "answer": str(a), "solution": f"{s} The answer is {a}."}
        for i, (q, a, s) in enumerate(records[start:start + n])]
    start += n
  return out


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  for split, records in make().items():
    with open(os.path.join(here, f"{split}.jsonl"), "w",
              encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
  main()
