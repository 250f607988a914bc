r"""Qwen2.5-1.5B-Instruct, PU-RL with DPO, on a TPU v5e-16 slice (16 chips).

  # the task, once, offline (runs/tasks/gsm8k: common.gsm8k), and the plan:
  python -m purld_jax.tasks.build --task=gsm8k --out=runs/tasks/gsm8k
  python -m purld_jax.main --config=configs/qwen25_1p5b_v5e16.py --workdir=/tmp/plan --dry_run
  # on every worker of the slice (README, "Scale"), weights in MODEL_DIR:
  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="\
    cd purld_jax && PURLD_DISTRIBUTED=1 .venv/bin/python -m purld_jax.main \
    --config=configs/qwen25_1p5b_v5e16.py --workdir=$WORKDIR \
    --config.model.path=$MODEL_DIR"
  # shardings and memory checked on any CPU machine, no weights, no TPU:
  python -m purld_jax.tools.aot --config=configs/qwen25_1p5b_v5e16.py --devices=16

Architecture: configs/arch/qwen2.5-1.5b/config.json (config.json only: enough
for shapes; training needs model.path at the real HF directory). Mesh: 2-way
data x 8-way fsdp (12 heads and 2 kv heads leave tensor parallelism little to
split at this size); 32 prompts per step, 2 per chip. bf16 compute, f32
params and Adam state; each layer rematerialised (16 GiB HBM per chip).
Variants: '' (the slice) | tiny (a random tiny model on the local devices).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "dpo"
  c.model.path = "configs/arch/qwen2.5-1.5b"  # replace with the weights' HF dir
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  c.model.scan_layers = True  # one layer compiled, not L (pod-scale compiles)
  c.data.max_prompt_len = 512
  c.data.buckets = (128, 256, 512)
  c.sampling.num_candidates = 8
  c.sampling.max_new_tokens = 512
  c.sft.batch_size = 32
  c.sft.max_response_len = 512  # >= teacher.max_tokens: anchors end
  c.rl.batch_size = 32
  c.mesh.data = 2
  c.mesh.fsdp = 8
  c.mesh.tensor = 1
  if arg != "tiny":  # tiny: the demo prompts, on CPU
    common.gsm8k(c)
  c = common.variant(c, arg, name="configs/qwen25_1p5b_v5e16.py")
  if arg == "tiny":
    c.mesh = common.mesh()
  return c
