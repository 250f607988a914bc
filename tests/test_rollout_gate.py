"""`rollout.collect` with `ranking.gate`: fixed candidates through the real
judge of a tiny random model, gated and not."""

import jax
import numpy as np
from flax import nnx

from purld_jax import data as data_lib
from purld_jax import prompts as prompts_lib
from purld_jax import rollout
from purld_jax import sampling as sampling_lib
from tests.core_fixtures import tiny_model, tiny_tok  # noqa: F401

# Prompt 0's anchor holds a number: "No" and "cat" fail the number gate.
# Prompt 1's anchor holds none: every candidate passes.
CANDIDATES = [["No", "2 + 2 = 4", "cat", "4"],
              ["No", "the cat sat", "dog", "3"]]
ANCHORS = ["4", "the cat sat on the mat"]


def _fixed_sampler(tok):
  """A sampler that returns CANDIDATES, each ended by the stop token."""
  ids = [[tok.encode(t) + [tok.stop_ids[0]] for t in g] for g in CANDIDATES]
  t = max(len(c) for g in ids for c in g)
  tokens = np.full((2, 4, t), tok.pad_id, np.int32)
  for b, g in enumerate(ids):
    for k, c in enumerate(g):
      tokens[b, k, :len(c)] = c
  lengths = np.array([[len(c) for c in g] for g in ids], np.int32)
  mask = np.arange(t)[None, None] < lengths[..., None]

  def sampler(params, prompt_tokens, prompt_mask, key, index):
    del params, prompt_tokens, prompt_mask, key, index
    zeros = np.zeros(tokens.shape, np.float32)
    return sampling_lib.Candidates(
        tokens=tokens, lengths=lengths, finished=np.ones((2, 4), bool),
        logps=zeros, sample_logps=zeros, mask=mask)
  return sampler


def _collect(tok, model, gate, scheme="judge", scorers=None):
  graphdef, params = nnx.split(model)
  prompts = [prompts_lib.Prompt.from_text("what is two + two ?", id="a"),
             prompts_lib.Prompt.from_text("write a cat", id="b")]
  source = data_lib.encode(prompts, tok, max_len=64)
  batch = data_lib.collate(source, [0, 1], buckets=(32, 64))
  return rollout.collect(
      graphdef, params, params, tok, batch, ANCHORS, jax.random.PRNGKey(0),
      k=4, sampling=sampling_lib.SamplingParams(max_new_tokens=8),
      ranking_params=rollout.RankingParams(scheme=scheme, gate=gate,
                                           gate_margin=0.5),
      max_anchor_len=16, sampler=_fixed_sampler(tok), scorers=scorers)


def test_the_number_gate_ranks_non_answers_last(tiny_tok, tiny_model):  # noqa: F811
  plain = _collect(tiny_tok, tiny_model, "none")
  gated = _collect(tiny_tok, tiny_model, "number")
  assert plain.texts[0][1].split() == "2 + 2 = 4".split()
  assert "gated" not in plain.stats
  assert gated.stats["gated"] == 2 / 8  # "No" and "cat" of prompt 0
  np.testing.assert_array_equal(gated.anchor_score, plain.anchor_score)
  # The passing candidates keep the judge's scores; prompt 1 is untouched.
  np.testing.assert_array_equal(gated.scores[0, [1, 3]], plain.scores[0, [1, 3]])
  np.testing.assert_array_equal(gated.scores[1], plain.scores[1])
  # The failed ones sit, tied, margin below the lowest of the passing
  # candidates and the anchor, whatever the judge paid them.
  floor = min(plain.scores[0, 1], plain.scores[0, 3], plain.anchor_score[0])
  np.testing.assert_allclose(gated.scores[0, [0, 2]], [floor - 0.5] * 2,
                             rtol=1e-6)


def test_an_unranked_run_scores_nothing(tiny_tok, tiny_model):  # noqa: F811
  """pu.mode "nnpu" reads no score: collect packs the group without one
  call of the scorer (a scorer that raises would fail this test)."""
  class Refuse:
    def __getattr__(self, name):
      raise AssertionError(f"the scorer was used ({name}) with no ranking")
  group = _collect(tiny_tok, tiny_model, "none", rollout.UNRANKED, Refuse())
  assert group.scores.shape == (2, 4) and not group.scores.any()
  assert not group.anchor_score.any()
  assert group.members.shape[:2] == (2, 5)  # the K candidates + the anchor
