r"""Qwen2.5-0.5B-Instruct, PU-RL with DPO, on one H100 (80 GB).

  python -m purld_jax.tasks.build --task=gsm8k --out=runs/tasks/gsm8k   # once, offline
  python -m purld_jax.main --config=configs/h100_qwen25_0p5b.py --workdir=$WORKDIR \
      --config.model.path=$MODEL_DIR --dry_run     # the plan; then without --dry_run
  python -m purld_jax.tools.memory --config=configs/h100_qwen25_0p5b.py   # estimate (+ compile)

Architecture: configs/arch/qwen2.5-0.5b/config.json (config.json only).
One device: mesh 1 x 1 x 1. bf16 compute, f32 params and Adam state; the
weight matmuls' outputs kept for the backward pass, attention recomputed
(remat "dots"). 16 prompts x 8 candidates per step. Data, ranking, teacher
prompt and evaluation: `common.gsm8k` (GSM8K test held out).
Variants: '' | tiny (a random tiny model: CPU, seconds).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "dpo"
  c.model.path = "configs/arch/qwen2.5-0.5b"  # replace with the weights' HF dir
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "dots"
  c.model.scan_layers = True  # one layer compiled, not L (pod-scale compiles)
  c.data.max_prompt_len = 512
  c.data.buckets = (128, 256, 512)
  c.sampling.num_candidates = 8
  c.sampling.max_new_tokens = 512
  c.sft.batch_size = 16
  c.sft.max_response_len = 512  # >= teacher.max_tokens: anchors end
  c.rl.batch_size = 16
  c.mesh.data = 1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  if arg != "tiny":  # tiny: the demo prompts, on CPU
    common.gsm8k(c)
  return common.variant(c, arg, name="configs/h100_qwen25_0p5b.py")
