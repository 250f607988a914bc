"""Stage 2 (PU-RL): preference batches by hand, each recipe end to end."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from purld_jax import rollout
from purld_jax.train import dpo
from purld_jax.train import grpo
from purld_jax.train import pu_rl
from tests import train_fixtures
from tests.train_fixtures import jit_cache  # noqa: F401  (fixture)


def test_pack_members_puts_the_anchor_last():
  cand = np.array([[[5, 6, 0], [7, 0, 0]]], np.int32)  # B=1, K=2, T=3
  mask = np.array([[[1, 1, 0], [1, 0, 0]]], bool)
  members, m = rollout.pack_members(cand, mask, [[8, 9, 10, 11]], pad_id=0)
  assert members.shape == (1, 3, 4)  # T grows to the anchor's 4 tokens
  np.testing.assert_array_equal(members[0, 2], [8, 9, 10, 11])
  np.testing.assert_array_equal(members[0, 0], [5, 6, 0, 0])
  np.testing.assert_array_equal(m[0].sum(-1), [2, 1, 4])


def test_dpo_pairs_by_hand():
  # scores (0.1, 0.9, 0.5), s_a = 0.7: best is 1, worst 0.
  s, s_a = np.array([[0.1, 0.9, 0.5]]), np.array([0.7])
  kw = dict(margin=0.0, center=True, prior=None, pu_rule="prior")
  p = dpo.make_pairs(s, s_a, rule="best_vs_worst", **kw)
  assert (int(p.chosen[0, 0]), int(p.rejected[0, 0])) == (1, 0)
  p = dpo.make_pairs(s, s_a, rule="anchor_as_chosen", **kw)
  assert (int(p.chosen[0, 0]), int(p.rejected[0, 0])) == (3, 0)  # K = 3
  # anchor rule: positives are s_k >= s_a -> only candidate 1; PU pairs are
  # (1 over 0) and (1 over 2).
  p = dpo.make_pairs(s, s_a, rule="pu", **dict(kw, pu_rule="anchor"))
  got = {(int(c), int(r)) for c, r, m in zip(p.chosen[0], p.rejected[0],
                                              p.mask[0]) if m}
  assert got == {(1, 0), (1, 2)}
  # a filler row has no pairs
  p = dpo.make_pairs(s, s_a, rule="best_vs_worst", valid=np.array([False]),
                     **kw)
  assert not bool(p.mask.any())


def test_grpo_advantages_by_hand():
  # tau = 1, scores (0, log 3): d = (1/4, 3/4); mean 1/2, std 1/4 ->
  # A = (-1, 1) (up to eps); equal scores give exactly 0.
  adv = grpo.advantages(np.array([[0.0, np.log(3.0)], [2.0, 2.0]]),
                        np.zeros(2), tau=1.0, center=False, normalize="std")
  np.testing.assert_allclose(adv[0], [-1.0, 1.0], atol=1e-4)
  np.testing.assert_array_equal(adv[1], [0.0, 0.0])


def test_exact_answer_verifier():
  v = pu_rl.exact_answer_verifier(["54", None])
  assert v(0, "So 12*7 - 30 = 54.") == 1.0
  assert v(0, "The answer is 1,054") == 0.0
  assert v(1, "54") == 0.0


@pytest.mark.parametrize("recipe", ["dpo", "grpo", "ldl"])
def test_recipe_runs_end_to_end(recipe, tmp_path, jit_cache):  # noqa: F811
  c = train_fixtures.tiny_config(**{
      "recipe": recipe, "rl.steps": 2, "sft.steps": 1,
      "log.tensorboard": False, "ranking.yes_word": "Y",
      "ranking.no_word": "N", "ckpt.async_save": False})
  out = pu_rl.run(c, str(tmp_path))
  assert os.path.isfile(os.path.join(out, "model.safetensors"))
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  rl = [r for r in rows if r["stage"] == recipe]
  assert [r["step"] for r in rl] == [1, 2]
  for r in rl:
    assert np.isfinite(r["loss"]) and r["teacher_calls"] == 0.0
    assert {"sample_s", "score_s", "update_s", "score_std"} <= set(r)
