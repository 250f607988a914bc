r"""SmolVLM-500M-Instruct on the shapes task, PU-RLD GRPO, on one H100.

  python -m purld_jax.main --config=configs/vlm_h100_smolvlm500m.py \
      --workdir=$WORKDIR --config.model.path=$SMOLVLM_DIR \
      --config.teacher.base_url=http://HOST:PORT/v1 --config.teacher.model=NAME \
      --dry_run          # the plan; then without --dry_run

Architecture: configs/arch/smolvlm-500m/config.json (the published
config's shapes: SigLIP 86 M, pixel-shuffle x4, SmolLM2-360M decoder; 507 M
in all), so `--dry_run` and `tools.memory` work without the weights. Train
from a downloaded HuggingFaceTB/SmolVLM-500M-Instruct directory
(`model.path`): it carries the tokenizer and the image processor, which
the arch folder does not. The teacher must accept OpenAI `image_url`
content parts (any vision endpoint; its answers go through the ledger).

One device: bf16 compute, f32 params and Adam state (507 M x 12 bytes =
6.1 GB), remat "dots", 16 prompts x 8 candidates a step. A 512 x 512 tile
is 64 image tokens after the connector. SmolVLM's own processor first
resizes a picture to a longest edge of 2048 (4 x 4 tiles + a global view =
1088 image tokens for a 128-pixel shapes picture), hence the 2048-token
buckets; with `size.longest_edge` = 512 in the directory's
preprocessor_config.json a picture is one view of 64 tokens and the
prompts fit the 256 bucket.
Variants: '' | tiny (a random tiny Idefics3 on CPU: `vlm_shapes.py:tiny`).
Not run here: no GPU and no SmolVLM weights were available to the project.
"""

from configs import common
from configs import vlm_shapes


def get_config(arg: str = ""):
  if arg == "tiny":
    return vlm_shapes.get_config("tiny")
  if arg:
    raise ValueError(f"configs/vlm_h100_smolvlm500m.py: unknown variant "
                     f"{arg!r} (known: '', tiny)")
  c = vlm_shapes.gpu_host(common.base())
  c.model.path = "configs/arch/smolvlm-500m"  # replace with the weights' dir
  c.data.buckets = (256, 512, 1024, 2048)
  c.data.max_prompt_len = 2048
  c.opt.learning_rate = 2e-6
  c.mesh.data = c.mesh.fsdp = c.mesh.tensor = 1
  return c
