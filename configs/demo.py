r"""The README's main job (`make demo`): the study protocol at demo size on
the embedded SmolLM2-135M, CPU: the recorded anchors of a real teacher
(Qwen2.5-Coder-1.5B-Instruct, third_party/anchors/), stage 1 SFT on them,
stage 2 PU-RLD (GRPO on the student's anchor-conditioned self-ranking, the
anchor as the labelled positive), then the untrained / SFT / final table on
the 200 dev prompts of data/arith (answers that end, judged by their last
number) and the export.

  python -m purld_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m purld_jax.main --config=configs/demo.py:full --workdir=workdirs/demo_full
  python -m purld_jax.main --config=configs/demo.py:tiny --workdir=/tmp/demo_tiny

Variants (after the colon):
  ''      embedded SmolLM2-135M, CPU, LoRA students (rank 16 on every
          projection, the base frozen): each stage holds one f32 copy of
          the weights, no reference copy and no Adam moments of the base,
          so the job fits a 4 GB machine (README: time, memory, disk)
  full    the same job with full fine-tuning in f32, as the studies train
          (configs/arith.py): about 6 GB peak RSS
  tiny    a random tiny model and a character tokenizer on data/demo's
          short prompts with the SIMULATED dataset teacher: CPU, seconds
          (tests)
The demo is one seed on the dev split: it shows the pipeline, not a
result; the ladder (python -m experiments.ladder) is the study.
"""

from configs import arith
from configs import common


def _tiny():
  c = common.base()
  c.recipe = "dpo"
  c.model.scan_layers = True
  c.data.train_path = "data/demo/train.jsonl"
  c.data.eval_path = "data/demo/eval.jsonl"
  c.teacher.backend = "dataset"
  c.teacher.api_key_env = ""
  c.ranking.scheme = "anchor_recon"
  c.export.dir = "export"
  c.export.gguf = True
  return common.tiny(c)


def get_config(arg: str = ""):
  if arg == "tiny":
    return _tiny()
  if arg not in ("", "full"):
    raise ValueError(f"configs/demo.py: unknown variant {arg!r} (known: '', "
                     "full, tiny)")
  full = arg == "full"
  c = arith.get_config()
  c.recipe = "grpo"             # PU-RLD, listwise: GRPO on the self-ranking
  c.ranking.scheme = "anchor_recon"  # how well a candidate predicts the anchor
  c.sft.steps = 16              # stage 1: 128 anchors
  c.rl.steps = 12               # stage 2: 96 prompts x K = 4 candidates
  c.opt.learning_rate = 2e-6
  c.rl.oversample = 1           # every drawn group trained on (demo time)
  c.eval.batch_size = 100       # the 200 dev prompts: 2 greedy calls a model
  c.eval.samples = 0            # greedy only: the ladder adds sampled pass@1
  c.ckpt.every_steps = 8
  c.ckpt.keep_finished = "none"  # the workdir keeps the models and the
                                 # export, not a finished stage's state
  c.export.dir = "export"       # WORKDIR/export: HF directory ...
  c.export.gguf = True          # ... and model-f16.gguf for llama.cpp
  if full:
    return c
  c.model.lora.rank = 16        # adapters on every projection (2x alpha / r)
  c.model.lora.alpha = 32.0
  c.sft.learning_rate = 2e-4    # adapters take ~10-20x full fine-tuning's
  c.opt.learning_rate = 2e-5    #   rates (full: 1e-5 and 2e-6)
  return c
