r"""Baseline "oracle-reward GRPO" (METHOD.md), where a verifier exists: the
reward is 1 when the candidate's last number equals the prompt's reference
answer (evaluate.verify), else 0; GRPO advantages over the K candidates.

  python -m purld_jax.main --config=configs/baselines/oracle_grpo.py \
      --workdir=workdirs/bl_oracle_grpo
  python -m purld_jax.main --config=configs/baselines/oracle_grpo.py:tiny \
      --workdir=/tmp/bl_oracle_grpo

The model, data and teacher are overridden as in README "Training".

Every training prompt needs an "answer" (data.train_path). An upper bound,
not available in the real setting; the anchors still feed stage 1.
Same as configs/purld_grpo.py but for ranking.scheme. Variants: '' and tiny.
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "grpo"
  c.ranking.scheme = "oracle"        # verified reward, not a self-ranking
  c.preference.kind = "listwise"     # d = softmax(s / tau_label), as purld_grpo
  c.loss.grpo.inner_iterations = 2   # PPO epochs over one sampled batch
  c.sampling.num_candidates = 8      # K
  c.sft.steps = 200                  # stage 1 length
  c.rl.steps = 500                   # PU-RL iterations
  return common.variant(c, arg, name="configs/baselines/oracle_grpo.py")
