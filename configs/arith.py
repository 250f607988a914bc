r"""The study protocol's small scale (docs/METHOD.md, Protocol): the embedded
SmolLM2-135M on data/arith (short worked arithmetic, judged by the last
number), CPU.

  python -m purld_jax.main --config=configs/arith.py --workdir=workdirs/arith
  python -m purld_jax.main --config=configs/arith.py:tiny --workdir=/tmp/a

Anchors: the recorded answers of a real teacher (third_party/anchors/),
so a clone trains without running it; --config.teacher.* points at a live
OpenAI-compatible teacher instead. Budgets: evaluation, sampling and SFT
never cut each other's text (main.validate), and evaluation is long enough
that >= 95 % of answers end (heldout warns otherwise).
"""

from configs import common


def get_config(arg: str = ""):
  c = common.base()
  c.recipe = "grpo"
  c.model.path = "embedded"     # SmolLM2-135M-Instruct from the wheel
  c.model.scan_layers = True    # a cold start compiles one layer, not 30
  # Memory (benchmarks/README.md, "The main job's memory"): each layer is
  # run again in the backward pass, and a step runs 2 prompts' rows at a
  # time; the same update (layer_stack.REMAT_POLICIES, state.grad_step).
  # On this CPU the GRPO step also got faster (none/1 slice 26-38 s,
  # full/4 20 s).
  c.model.remat = "full"
  c.opt.micro_batches = 4
  c.data.train_path = "data/arith/train.jsonl"  # 512 prompts with anchors
  c.data.eval_path = "data/arith/dev.jsonl"     # 200; the ladder's held-out
                                                # set is eval.jsonl (500)
  c.data.buckets = (72,)        # prompts: 45-69 tokens with the template
  c.data.max_prompt_len = 72    # none is dropped
  # Qwen2.5-Coder-1.5B-Instruct's recorded answers (one per train prompt;
  # third_party/anchors/README.md has their provenance and accuracy).
  c.teacher.backend = "recorded"
  c.teacher.recorded_path = (
      "third_party/anchors/arith_train.qwen2.5-coder-1.5b.jsonl")
  c.teacher.api_key_env = ""
  c.teacher.max_tokens = 128    # what the anchors were recorded with
  c.sampling.num_candidates = 4
  # Budgets (tokens; every batch is padded to them, so on CPU they are the
  # cost): anchors <= 48 (p95 34) of the student's tokens, candidates <= 64,
  # held-out answers <= 128; the untrained student's answers average ~22.
  c.sampling.max_new_tokens = 64
  c.sampling.temperature = 1.0
  c.ranking.scheme = "anchor_recon"  # PU-RLD; the ladder's oracle rung overrides
  c.sft.steps = 32
  c.sft.batch_size = 8
  c.sft.learning_rate = 1e-5
  c.sft.max_response_len = 64   # >= the longest recorded anchor (48): none cut
  c.rl.steps = 32
  c.rl.batch_size = 8
  # Chosen on the dev split (experiments/ladder/small_dev/): of six oracle
  # GRPO points, 3 x 8 prompts drawn a step with the 8 groups that carry a
  # reward difference trained on (DAPO's filter), at lr 1e-5, gained most
  # sampled pass@1 over SFT (+11.0 pt, seed 0) at 41 s a step.
  c.rl.oversample = 3
  c.opt.learning_rate = 1e-5
  c.eval.batch_size = 100       # 500 held-out prompts: 5 greedy calls
  c.eval.max_new_tokens = 128   # >= sampling and anchor budgets
  # Sampled pass@1 beside greedy accuracy (docs/METHOD.md, Protocol): 4
  # answers per prompt at the training temperature, 25 prompts (100 rows)
  # a call: at 100 prompts x 8 a call one model took 12 min on the 200 dev
  # prompts (each call runs to its longest answer), 7 GB of RSS.
  c.eval.samples = 4
  c.eval.temperature = c.sampling.temperature
  c.eval.sample_batch_size = 25
  c.ckpt.every_steps = 16
  # A synchronous save: an asynchronous one keeps the saved state alive
  # while the next step runs, so that step cannot write its new state over
  # the donated old one and holds both (measured with configs/demo.py: the
  # SFT peak went 4.2 -> 6.4 GB in the step after a save). A save of the
  # 1.5 GB state takes seconds here, every ckpt.every_steps / 5 minutes.
  c.ckpt.async_save = False
  c.ckpt.every_minutes = 5.0
  return common.variant(c, arg, name="configs/arith.py")
