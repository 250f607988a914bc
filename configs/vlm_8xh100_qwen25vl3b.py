r"""Qwen2.5-VL-3B-Instruct on the shapes task, PU-RLD GRPO, on 8 H100s.

  python -m purld_jax.main --config=configs/vlm_8xh100_qwen25vl3b.py \
      --workdir=$WORKDIR --config.model.path=$QWEN25VL_DIR \
      --config.teacher.base_url=http://HOST:PORT/v1 --config.teacher.model=NAME \
      --dry_run          # the plan; then without --dry_run

Architecture: configs/arch/qwen2.5-vl-3b/config.json (the published
config's shapes: a 32-block window-attention vision encoder of 669 M, 36
decoder layers with multimodal RoPE; 3.75 B in all), so `--dry_run` and
`tools.memory` work without the weights. Train from a downloaded
Qwen/Qwen2.5-VL-3B-Instruct directory (`model.path`, with its tokenizer and
image processor). Every image is resized to one square side, which the
directory's preprocessor_config.json must fix: the published one bounds
min_pixels / max_pixels instead, and the run stops naming that file until
`size` = {"shortest_edge": 50176, "longest_edge": 50176} (224 x 224: 16 x
16 patches, 64 image tokens after the 2 x 2 merge) is set there. The teacher must accept OpenAI
`image_url` content parts.

Eight devices, mesh 1 x 8 x 1 (FSDP): f32 params, Adam moments and the
reference are 3.75 B x 16 bytes = 60 GB in all, 7.5 GB a device; bf16
compute, remat "dots", 16 prompts x 8 candidates a step.
Variants: '' | tiny (the random tiny Qwen2.5-VL on CPU).
Not run here: no GPU and no Qwen2.5-VL weights were available to the
project.
"""

import os

from configs import common
from configs import vlm_shapes


def _tiny():
  from purld_jax.models import embedded  # pylint: disable=g-import-not-at-top
  from purld_jax.models import tiny_qwen_vl  # pylint: disable=g-import-not-at-top
  c = vlm_shapes.get_config("tiny")
  c.model.path = tiny_qwen_vl.ensure(os.path.join(
      embedded.default_cache_dir(), "tiny_qwen_vl"))
  return c


def get_config(arg: str = ""):
  if arg == "tiny":
    return _tiny()
  if arg:
    raise ValueError(f"configs/vlm_8xh100_qwen25vl3b.py: unknown variant "
                     f"{arg!r} (known: '', tiny)")
  c = vlm_shapes.gpu_host(common.base())
  c.model.path = "configs/arch/qwen2.5-vl-3b"  # replace with the weights' dir
  c.data.buckets = (256, 512)
  c.data.max_prompt_len = 512
  c.opt.learning_rate = 1e-6
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 1
  return c
