r"""Baseline "self-rewarding" (METHOD.md): the student judges its own
candidates WITHOUT the anchor (templates.SELF_REWARD_TEMPLATE), DPO on best vs
worst.

  python -m purld_jax.main --config=configs/baselines/self_reward.py \
      --workdir=workdirs/bl_self_reward
  python -m purld_jax.main --config=configs/baselines/self_reward.py:tiny \
      --workdir=/tmp/bl_self_reward

The model, data and teacher are overridden as in README "Training".

Same as configs/purld_dpo.py but for ranking.scheme. The anchors still feed
stage 1 (SFT) and the logged anchor score. Teacher cost: one anchor per
training prompt. Variants: '' and tiny (CPU, seconds).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "dpo"
  c.ranking.scheme = "self_reward"      # judge "Is it good?" without the anchor
  c.preference.kind = "pairwise"        # DPO pairs from the scores
  c.preference.pairs = "best_vs_worst"  # as configs/purld_dpo.py
  c.sampling.num_candidates = 8         # K
  c.sft.steps = 200                     # stage 1 length
  c.rl.steps = 500                      # PU-RL iterations
  return common.variant(c, arg, name="configs/baselines/self_reward.py")
