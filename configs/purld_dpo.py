r"""PU-RLD with the dpo recipe: pairwise preferences from the self-ranking (best vs worst), DPO loss.

  python -m purld_jax.main --config=configs/purld_dpo.py --workdir=workdirs/purld_dpo \
      --config.model.path=/path/to/hf_model \
      --config.data.train_path=prompts.jsonl --config.data.eval_path=heldout.jsonl \
      --config.teacher.base_url=http://127.0.0.1:8080/v1 --config.teacher.model=NAME
  python -m purld_jax.main --config=configs/purld_dpo.py:tiny --workdir=/tmp/purld_dpo_tiny

Stage 1 SFT on anchors, then PU-RL at METHOD.md's defaults (configs/common.py;
K = 8 here); the teacher and variants ('' / tiny) as in README "Training".
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "dpo"
  c.preference.kind = "pairwise"   # DPO pairs from the scores
  c.preference.pairs = "best_vs_worst"  # METHOD.md default
  c.sampling.num_candidates = 8    # K
  c.sft.steps = 200                # stage 1 length
  c.rl.steps = 500                 # PU-RL iterations
  return common.variant(c, arg, name="configs/purld_dpo.py")
