r"""PU-RLD with the grpo recipe: a label distribution over the K candidates as GRPO advantages, clipped ratio, k3 KL.

  python -m purld_jax.main --config=configs/purld_grpo.py --workdir=workdirs/purld_grpo \
      --config.model.path=/path/to/hf_model \
      --config.data.train_path=prompts.jsonl --config.data.eval_path=heldout.jsonl \
      --config.teacher.base_url=http://127.0.0.1:8080/v1 --config.teacher.model=NAME
  python -m purld_jax.main --config=configs/purld_grpo.py:tiny --workdir=/tmp/purld_grpo_tiny

Stage 1 SFT on anchors, then PU-RL at METHOD.md's defaults (configs/common.py;
K = 8 here); the teacher and variants ('' / tiny) as in README "Training".
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "grpo"
  c.preference.kind = "listwise"   # d = softmax(s / tau_label)
  c.loss.grpo.inner_iterations = 2  # PPO epochs over one sampled batch
  c.sampling.num_candidates = 8    # K
  c.sft.steps = 200                # stage 1 length
  c.rl.steps = 500                 # PU-RL iterations
  return common.variant(c, arg, name="configs/purld_grpo.py")
