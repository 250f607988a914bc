r"""Baseline "SFT on anchors" (METHOD.md): stage 1 only, no RL.

  python -m purld_jax.main --config=configs/baselines/sft_only.py \
      --workdir=workdirs/bl_sft_only
  python -m purld_jax.main --config=configs/baselines/sft_only.py:tiny --workdir=/tmp/bl_sft_only

The model, data and teacher are overridden as in README "Training".

The PU-RL stage runs with rl.steps = 0 (recipe dpo, as configs/purld_dpo.py):
its "final" model is the SFT reference, so the held-out table has the same
rows (before / sft / final) as every other baseline. Teacher cost: one anchor
per training prompt. Variants (after the colon): '' and tiny (random tiny
model, char tokenizer, simulated dataset teacher: CPU, seconds).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "dpo"                 # stage 2 is a no-op: see rl.steps
  c.sampling.num_candidates = 8    # K (unused: no PU-RL step)
  c.sft.steps = 200                # stage 1 length, as configs/purld_dpo.py
  c.rl.steps = 0                   # no PU-RL iteration: SFT only
  c = common.variant(c, arg, name="configs/baselines/sft_only.py")
  c.rl.steps = 0                   # also in the tiny variant
  return c
