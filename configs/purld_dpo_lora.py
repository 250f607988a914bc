r"""PU-RLD with the dpo recipe on a LoRA student: adapters trained, the base frozen.

  python -m purld_jax.main --config=configs/purld_dpo_lora.py --workdir=workdirs/purld_dpo_lora \
      --config.model.path=/path/to/hf_model \
      --config.data.train_path=prompts.jsonl --config.data.eval_path=heldout.jsonl \
      --config.teacher.base_url=http://127.0.0.1:8080/v1 --config.teacher.model=NAME
  python -m purld_jax.main --config=configs/purld_dpo_lora.py:tiny --workdir=/tmp/purld_dpo_lora_tiny

configs/purld_dpo.py with `model.lora` on (README "LoRA"): stage 1 trains
rank-16 adapters on every projection and writes the merged model as the
reference; stage 2 trains new adapters (B = 0) on that frozen reference,
which is also its KL / DPO reference. LoRA takes larger learning rates than
full fine-tuning.
"""

from configs import common
from configs import purld_dpo


def get_config(arg: str = ""):
  c = purld_dpo.get_config("")
  c.model.lora.rank = 16           # r (0 = full fine-tuning)
  c.model.lora.alpha = 32.0        # delta scaled by alpha / r = 2
  c.model.lora.targets = common.LORA_TARGETS  # attention q,k,v,o + MLP
  c.sft.learning_rate = 2e-4       # adapters: ~10-20x full fine-tuning's
  c.opt.learning_rate = 1e-5
  return common.variant(c, arg, name="configs/purld_dpo_lora.py")
