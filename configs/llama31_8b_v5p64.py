r"""Llama-3.1-8B-Instruct, PU-RL with DPO, on a TPU v5p-64 slice (32 chips).

  # the task, once, offline (runs/tasks/gsm8k: common.gsm8k), and the plan:
  python -m purld_jax.tasks.build --task=gsm8k --out=runs/tasks/gsm8k
  python -m purld_jax.main --config=configs/llama31_8b_v5p64.py --workdir=/tmp/plan --dry_run
  # on every worker of the slice (README, "Scale"), weights in MODEL_DIR:
  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="\
    cd purld_jax && PURLD_DISTRIBUTED=1 .venv/bin/python -m purld_jax.main \
    --config=configs/llama31_8b_v5p64.py --workdir=$WORKDIR \
    --config.model.path=$MODEL_DIR"
  # shardings and memory checked on any CPU machine, no weights, no TPU:
  python -m purld_jax.tools.aot --config=configs/llama31_8b_v5p64.py --devices=32

v5p-64 counts TensorCores: 32 chips, one JAX device each. Architecture:
configs/arch/llama-3.1-8b/config.json (config.json only). Mesh: 16-way fsdp
x 2-way tensor (32 heads, 8 kv heads, mlp 14336 and vocab 128256 split in
two); 32 prompts per step, 2 per fsdp group. bf16 compute, f32 params and
Adam state, each layer rematerialised.
Variants: '' (the slice) | tiny (a random tiny model on the local devices).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "dpo"
  c.model.path = "configs/arch/llama-3.1-8b"  # replace with the weights' HF dir
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  c.model.scan_layers = True  # one layer compiled, not L (pod-scale compiles)
  c.data.max_prompt_len = 1024
  c.data.buckets = (256, 512, 1024)
  c.sampling.num_candidates = 8
  c.sampling.max_new_tokens = 1024
  c.sft.batch_size = 32
  c.sft.max_response_len = 1023
  c.eval.max_new_tokens = 1024  # >= sampling.max_new_tokens: answers end
  c.rl.batch_size = 32
  c.mesh.data = 1
  c.mesh.fsdp = 16
  c.mesh.tensor = 2
  if arg != "tiny":  # tiny: the demo prompts, on CPU
    common.gsm8k(c)
  c = common.variant(c, arg, name="configs/llama31_8b_v5p64.py")
  if arg == "tiny":
    c.mesh = common.mesh()
  return c
