r"""PU-RLD with the ldl recipe: the label distribution fitted by the policy's implicit one (LDL loss).

  python -m purld_jax.main --config=configs/purld_ldl.py --workdir=workdirs/purld_ldl \
      --config.model.path=/path/to/hf_model \
      --config.data.train_path=prompts.jsonl --config.data.eval_path=heldout.jsonl \
      --config.teacher.base_url=http://127.0.0.1:8080/v1 --config.teacher.model=NAME
  python -m purld_jax.main --config=configs/purld_ldl.py:tiny --workdir=/tmp/purld_ldl_tiny

Stage 1 SFT on anchors, then PU-RL at METHOD.md's defaults (configs/common.py;
K = 8 here); the teacher and variants ('' / tiny) as in README "Training".
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "ldl"
  c.preference.kind = "listwise"   # d = softmax(s / tau_label)
  c.pu.include_anchor = True       # the anchor joins the group as member K+1
  c.sampling.num_candidates = 8    # K
  c.sft.steps = 200                # stage 1 length
  c.rl.steps = 500                 # PU-RL iterations
  return common.variant(c, arg, name="configs/purld_ldl.py")
