"""The grain prompt pipeline: determinism, sharding, resume, padding; the
demo prompt set."""

import importlib.util
import json
import os

import numpy as np
import pytest

from purld_jax import data
from purld_jax import prompts as prompts_lib
from tests.train_fixtures import REPO
from tests.train_fixtures import char_tok  # noqa: F401


def _prompts(n):
  return [prompts_lib.Prompt.from_text(f"q{i}" + "x" * (i % 5), id=f"p{i}",
                                       answer=str(i)) for i in range(n)]


@pytest.fixture(scope="module")
def source(char_tok):  # noqa: F811
  return data.encode(_prompts(12), char_tok, max_len=1000)


def _ids(batches):
  return [[p.id for p in b.prompts] for b in batches]


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_order(source):
  a = _take(data.train_iterator(source, batch_size=4, seed=1, buckets=None), 6)
  b = _take(data.train_iterator(source, batch_size=4, seed=1, buckets=None), 6)
  c = _take(data.train_iterator(source, batch_size=4, seed=2, buckets=None), 6)
  assert _ids(a) == _ids(b)
  assert _ids(a) != _ids(c)


def test_each_epoch_is_a_permutation_and_epochs_differ(source):
  it = data.train_iterator(source, batch_size=4, seed=0, buckets=None)
  epoch1 = sum(_ids(_take(it, 3)), [])  # 12 prompts / 4 = 3 batches
  epoch2 = sum(_ids(_take(it, 3)), [])
  assert sorted(epoch1) == sorted(epoch2) == sorted(f"p{i}" for i in range(12))
  assert epoch1 != epoch2  # reshuffled


def test_two_processes_see_disjoint_halves(source):
  seen = []
  for pi in range(2):
    it = data.train_iterator(source, batch_size=4, seed=0, buckets=None,
                             process_index=pi, process_count=2)
    batches = _take(it, 3)  # 6 prompts per process / 2 per batch = 3 batches
    assert all(len(b) == 2 for b in batches)
    seen.append(set(sum(_ids(batches), [])))
  assert seen[0].isdisjoint(seen[1])
  # shard 0 holds positions 0, 2, 4, ...; shard 1 the odd ones.
  assert seen[0] == {f"p{i}" for i in range(0, 12, 2)}
  assert seen[1] == {f"p{i}" for i in range(1, 12, 2)}


def test_shards_are_cut_to_equal_length():
  assert list(data.shard_positions(7, 0, 2)) == [0, 2, 4]
  assert list(data.shard_positions(7, 1, 2)) == [1, 3, 5]  # 6 is dropped
  with pytest.raises(ValueError, match="cannot be shared"):
    data.shard_positions(1, 0, 2)


def test_restored_iterator_continues_exactly(source):
  it = data.train_iterator(source, batch_size=4, seed=3, buckets=None)
  _take(it, 4)
  state = json.loads(json.dumps(it.get_state()))  # as it is checkpointed
  rest = _ids(_take(it, 3))
  fresh = data.train_iterator(source, batch_size=4, seed=3, buckets=None)
  fresh.set_state(state)
  assert _ids(_take(fresh, 3)) == rest


def test_left_padding_to_a_bucket(source, char_tok):  # noqa: F811
  b = data.collate(source, [0, 4], buckets=(8, 64, 128))
  n0, n4 = len(source.ids[0]), len(source.ids[4])
  assert n4 == n0 + 4 and n4 < 64  # "q4xxxx" vs "q0"
  assert b.tokens.shape == (2, 64) and b.mask.shape == (2, 64)
  np.testing.assert_array_equal(b.mask.sum(axis=1), [n0, n4])
  np.testing.assert_array_equal(b.tokens[0, 64 - n0:], source.ids[0])
  assert (b.tokens[0, :64 - n0] == char_tok.pad_id).all()
  assert not b.mask[0, :64 - n0].any()
  np.testing.assert_array_equal(b.index, [0, 4])
  assert b.valid.all()


def test_long_prompts_are_dropped_and_named(char_tok):  # noqa: F811
  prompts = _prompts(3) + [prompts_lib.Prompt.from_text("y" * 500, id="long")]
  enc = data.encode(prompts, char_tok, max_len=100)
  assert enc.dropped == ("long",)
  assert [p.id for p in enc.prompts] == ["p0", "p1", "p2"]
  assert enc.index == (0, 1, 2)


def test_eval_batches_fill_the_last_batch(source):
  batches = list(data.eval_batches(source, batch_size=5, buckets=None))
  assert [len(b) for b in batches] == [5, 5, 5]
  assert _ids(batches)[2] == ["p10", "p11", "p10", "p10", "p10"]
  np.testing.assert_array_equal(batches[2].valid, [1, 1, 0, 0, 0])
  limited = list(data.eval_batches(source, batch_size=4, buckets=None,
                                   limit=6))
  assert sum(int(b.valid.sum()) for b in limited) == 6


def test_batch_size_must_split_over_processes(source):
  with pytest.raises(ValueError, match="multiple of the 2 processes"):
    data.train_dataset(source, batch_size=3, seed=0, buckets=None,
                       process_index=0, process_count=2)


# ----------------------------------------------------------------------------
# The demo prompt set


def _make_module():
  spec = importlib.util.spec_from_file_location(
      "demo_make", os.path.join(REPO, "data/demo/make.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_demo_files_are_what_make_py_writes():
  train, evals = _make_module().make()
  for name, records in (("train.jsonl", train), ("eval.jsonl", evals)):
    with open(os.path.join(REPO, "data/demo", name), encoding="utf-8") as f:
      assert [json.loads(line) for line in f] == records
  assert (len(train), len(evals)) == (256, 128)
  questions = [r["prompt"] for r in train + evals]
  assert len(set(questions)) == len(questions)  # train and eval disjoint


def test_demo_answers_are_exact_integers():
  for name in ("train.jsonl", "eval.jsonl"):
    for p in prompts_lib.read_jsonl(os.path.join(REPO, "data/demo", name)):
      assert p.answer.isdigit(), (p.id, p.answer)
  # Two templates by hand: 12 sweets, 7 eaten: 5 left; double 13 is 26.
  module = _make_module()

  class Fixed:
    def __init__(self, kind, ints):
      self.kind, self.ints = kind, iter(ints)
    def choice(self, seq):
      return seq[0]
    def randrange(self, n):
      return self.kind
    def randint(self, a, b):
      return next(self.ints)

  question, answer = module._problem(Fixed(7, [12, 7]))
  assert question == "Ana had 12 sweets and ate 7. How many sweets are left?"
  assert answer == 5
  assert module._problem(Fixed(6, [13])) == ("What is double 13?", 26)
