r"""Baseline "DPO with the anchor as chosen" (SPIN-like, METHOD.md): every
candidate is rejected against the teacher's anchor; no self-ranking decides.

  python -m purld_jax.main --config=configs/baselines/anchor_as_chosen.py \
      --workdir=workdirs/bl_anchor_as_chosen
  python -m purld_jax.main --config=configs/baselines/anchor_as_chosen.py:tiny \
      --workdir=/tmp/bl_anchor_as_chosen

The model, data and teacher are overridden as in README "Training".

Same as configs/purld_dpo.py but for preference.pairs (the scores are still
computed and logged, they choose nothing). Teacher cost: one anchor per
training prompt. Variants: '' and tiny (CPU, seconds).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "dpo"
  c.preference.kind = "pairwise"           # DPO pairs
  c.preference.pairs = "anchor_as_chosen"  # anchor (member K) over the candidates
  c.sampling.num_candidates = 8            # K
  c.sft.steps = 200                        # stage 1 length
  c.rl.steps = 500                         # PU-RL iterations
  return common.variant(c, arg, name="configs/baselines/anchor_as_chosen.py")
