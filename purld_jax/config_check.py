"""Config checks before anything is computed: every bad field named at once.

`validate` reads the config (and the files it names: prompt files, the
model's config.json and safetensors headers) and raises `ConfigError`
listing every problem; `check_answer_words` reads the student's tokenizer
for the judge's answer words. The main job runs both before it writes
anything to the workdir.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

from purld_jax import redact

RECIPES = ("sft", "dpo", "grpo", "ldl")
# Stage 2 of every RL recipe: a module with run(config, workdir,
# reference_dir=...); the recipe's own step lives in train/<recipe>.py.
STAGE2_RUNNER = "purld_jax.train.pu_rl"


class ConfigError(ValueError):
  """A config that cannot run; the message names every bad field."""


def _choice(errors, cfg, key, choices):
  value = cfg
  for part in key.split("."):
    value = value[part]
  if value not in choices:
    errors.append(f"{key}={value!r}: not one of {list(choices)}")


def _positive(errors, cfg, key, *, zero_ok=False):
  value = cfg
  for part in key.split("."):
    value = value[part]
  if value < 0 or (value == 0 and not zero_ok):
    errors.append(f"{key}={value!r}: must be {'>= 0' if zero_ok else '> 0'}")


def _prompt_file(errors, key, path) -> bool:
  """Reads the prompt file (errors name it); True when a prompt of it has
  images."""
  from purld_jax import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    errors.append(f"{key}={path!r}: no such prompt file")
    return False
  try:
    return any(p.images for p in prompts_lib.read_jsonl(path))
  except prompts_lib.PromptFileError as e:
    errors.append(f"{key}: {e}")
    return False


BATCH_FIELDS = ("sft.batch_size", "rl.batch_size", "eval.batch_size")


def _mesh(errors, config) -> None:
  """Mesh sizes are positive or -1 (at most one); every batch is split over
  data x fsdp, so each batch size must be a multiple of their explicit
  (not -1) sizes. An inferred size is only known on the devices: the
  trainers say when it does not divide a batch (`loop.mesh_setup`)."""
  sizes = {a: config.mesh[a] for a in ("data", "fsdp", "tensor")}
  for axis, n in sizes.items():
    if n == 0 or n < -1:
      errors.append(f"mesh.{axis}={n!r}: must be > 0 or -1 (inferred)")
  if list(sizes.values()).count(-1) > 1:
    errors.append(f"mesh: at most one size may be -1, got {sizes}")
  split = max(1, sizes["data"]) * max(1, sizes["fsdp"])
  for key in BATCH_FIELDS:
    block, field = key.split(".")
    value = config[block][field]
    if value > 0 and value % split:
      errors.append(f"{key}={value!r}: must be a multiple of mesh.data x "
                    f"mesh.fsdp = {sizes['data']} x {sizes['fsdp']} = "
                    f"{split} (batches are split over them)")


def _lora(errors, config) -> None:
  """model.lora: rank an integer >= 0; with rank > 0, alpha > 0, dropout 0
  (refused, not ignored: the model's forward takes no rng) and targets a
  non-empty subset of the projections, each once."""
  from purld_jax.models import lora  # pylint: disable=g-import-not-at-top
  c = config.model.get("lora")
  if c is None:
    return
  rank = c.rank
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    errors.append(f"model.lora.rank={rank!r}: must be an integer >= 0 "
                  "(0 = off)")
    return
  if rank == 0:
    return
  if not isinstance(c.alpha, (int, float)) or c.alpha <= 0:
    errors.append(f"model.lora.alpha={c.alpha!r}: must be > 0")
  if c.dropout != 0:
    errors.append(f"model.lora.dropout={c.dropout!r}: must be 0 (LoRA "
                  "dropout is not implemented: the model's forward is pure "
                  "and takes no rng)")
  targets = c.targets
  if isinstance(targets, str) or not targets:
    errors.append(f"model.lora.targets={targets!r}: must be a non-empty "
                  f"tuple of {list(lora.TARGETS)}")
    return
  bad = [t for t in targets if t not in lora.TARGETS]
  if bad:
    errors.append(f"model.lora.targets: {bad} not in {list(lora.TARGETS)}")
  if len(set(targets)) != len(targets):
    errors.append(f"model.lora.targets={tuple(targets)!r}: a target named "
                  "twice")


def _vlm(errors, config) -> None:
  """What a vision-language student (model.path an Idefics3 / SmolVLM
  directory, or Qwen2.5-VL) does not support: LoRA, the GGUF export."""
  lora = config.model.get("lora")
  if lora is not None and isinstance(lora.rank, int) and lora.rank > 0:
    errors.append(f"model.lora.rank={lora.rank}: LoRA is not supported for "
                  "a vision-language student (model.path is an Idefics3 / "
                  "SmolVLM / Qwen2.5-VL directory); set model.lora.rank=0")
  if config.export.gguf:
    errors.append("export.gguf=True: no GGUF export for a vision-language "
                  "student (llama.cpp's converter takes text models); set "
                  "export.gguf=False")


def _images(errors, config, with_images, vlm) -> None:
  """Prompt files with images need a vision-language student; a PU-RL
  stage on image prompts needs a ranking scheme that shows the scorer the
  images (ranking.IMAGE_SCHEMES)."""
  from purld_jax import ranking  # pylint: disable=g-import-not-at-top
  if with_images and vlm is False:  # (None: model.path is already wrong)
    errors.append(f"{', '.join(with_images)}: prompts with images, but "
                  f"model.path={config.model.path!r} is a text model (use an "
                  "Idefics3 / SmolVLM or Qwen2.5-VL directory)")
  scheme = config.ranking.scheme
  if ("data.train_path" in with_images and config.recipe != "sft"
      and scheme in ranking.SCHEMES and scheme not in ranking.IMAGE_SCHEMES):
    errors.append(f"ranking.scheme={scheme!r}: not implemented for image "
                  "prompts (its rows would drop the images); use one of "
                  f"{list(ranking.IMAGE_SCHEMES)}")


def _half_state(errors, config) -> None:
  """opt.mu_dtype and rl.reference_dtype: bf16 mu needs a b1 that bf16
  keeps (optax computes b1 mu in mu's dtype): `state.mu_bf16_gain` within
  3 % of 1 (b1 = 0.9, 0.95, 0.98; not 0.97, 0.99); a bf16 reference needs
  a reference of its own (not LoRA's frozen base, the policy's too)."""
  from purld_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  _choice(errors, config, "opt.mu_dtype", state_lib.MU_DTYPES)
  _choice(errors, config, "rl.reference_dtype", ("float32", "bfloat16"))
  b1 = config.opt.b1
  if (config.opt.mu_dtype == "bfloat16" and isinstance(b1, (int, float))
      and abs(state_lib.mu_bf16_gain(b1) - 1.0) > 0.03):
    errors.append(f"opt.mu_dtype='bfloat16' with opt.b1={b1!r}: b1 rounds "
                  "to bf16 in b1 * mu, so mu would settle at "
                  f"{state_lib.mu_bf16_gain(b1):.3g} x its f32 value (> 3 % "
                  "off); use a b1 that bf16 keeps (0.9, 0.95, 0.98) or "
                  "opt.mu_dtype='float32'")
  lora = config.model.get("lora")
  if (config.rl.reference_dtype == "bfloat16" and lora is not None
      and isinstance(lora.rank, int) and lora.rank > 0):
    errors.append("rl.reference_dtype='bfloat16' with model.lora.rank="
                  f"{lora.rank}: the LoRA reference is the frozen base "
                  "itself (one copy, model.param_dtype); set "
                  "rl.reference_dtype='float32'")


def validate(config) -> None:
  """Raises ConfigError listing every problem of `config` (no compute)."""
  from purld_jax import losses  # pylint: disable=g-import-not-at-top
  from purld_jax import preferences  # pylint: disable=g-import-not-at-top
  from purld_jax import ranking  # pylint: disable=g-import-not-at-top
  from purld_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  from purld_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  errors = []
  for field in ("teacher.api_key_env", "ranking.judge_api_key_env"):
    block, name = field.split(".")
    if (bad := redact.check_key_env(config[block].get(name, ""), field)):
      errors.append(bad)  # before config.json is written with it
  _choice(errors, config, "recipe", RECIPES)
  if config.recipe in RECIPES and config.recipe != "sft":
    for module in (STAGE2_RUNNER, f"purld_jax.train.{config.recipe}"):
      if importlib.util.find_spec(module) is None:
        errors.append(
            f"recipe={config.recipe!r}: its trainer {module} is not written "
            "yet (issue 7); --config.recipe=sft runs stage 1 alone")
  path = config.model.path
  vlm = False  # model.path is an Idefics3 / SmolVLM / Qwen2.5-VL directory
  if path not in ("tiny", "embedded") and not os.path.isfile(
      os.path.join(path, "config.json")):
    errors.append(f"model.path={path!r}: not 'tiny', 'embedded' or a "
                  "Hugging Face directory with config.json")
    vlm = None  # unknown
  elif path not in ("tiny", "embedded"):
    from purld_jax.models import hf  # pylint: disable=g-import-not-at-top
    from purld_jax.models import hf_config  # pylint: disable=g-import-not-at-top
    from purld_jax.train import student as student_lib  # pylint: disable=g-import-not-at-top
    read = student_lib.vlm_reader(path)
    vlm = read is not None
    try:
      hf.check_files(path, read=read)
    except (hf.CheckpointError, hf_config.ConfigError) as e:
      errors.append(f"model.path: {e}")
    if vlm:
      _vlm(errors, config)
  for key in ("model.dtype", "model.param_dtype"):
    _choice(errors, config, key, ("float32", "bfloat16"))
  from purld_jax.models import layer_stack  # pylint: disable=g-import-not-at-top
  _choice(errors, config, "model.remat", layer_stack.REMAT_POLICIES)
  _lora(errors, config)
  _half_state(errors, config)
  _choice(errors, config, "ckpt.keep_finished", ("last", "all", "none"))
  _mesh(errors, config)
  n = config.opt.micro_batches
  for key, size in (("sft.batch_size", config.sft.batch_size),
                    ("rl.batch_size", config.rl.batch_size)):
    if isinstance(n, int) and n > 0 and size % n:
      errors.append(f"opt.micro_batches={n}: does not divide {key}={size}")
  with_images = []  # the prompt files that hold images
  for key, value in (("data.train_path", config.data.train_path),
                     ("data.eval_path", config.data.eval_path)):
    if (value or key == "data.train_path") and _prompt_file(errors, key,
                                                            value):
      with_images.append(key)
  _images(errors, config, with_images, vlm)
  if any(b <= 0 for b in config.data.buckets):
    errors.append(f"data.buckets={config.data.buckets!r}: must be > 0")
  try:
    teacher_lib.TeacherConfig.from_mapping(config.teacher.to_dict())
  except teacher_lib.ConfigError as e:
    errors.append(f"teacher: {e}")
  _choice(errors, config, "ranking.scheme", ranking.SCHEMES)
  if config.ranking.scheme == "teacher_judge":
    from purld_jax import teacher_judge  # pylint: disable=g-import-not-at-top
    errors.extend(teacher_judge.config_problems(config))
  _choice(errors, config, "ranking.scorer", ("policy", "reference"))
  _choice(errors, config, "ranking.aggregation", ranking.PAIRWISE_AGGREGATIONS)
  _choice(errors, config, "ranking.metric", ranking.SIMILARITY_METRICS)
  _choice(errors, config, "ranking.gate", ranking.ANSWER_GATES)
  opp = config.ranking.pair_opponents
  if not isinstance(opp, int) or opp < 0 or opp % 2:
    errors.append(f"ranking.pair_opponents={opp!r}: must be 0 (every pair) "
                  "or an even number >= 2")
  _positive(errors, config, "ranking.gate_margin")
  if config.ranking.template:
    from purld_jax import templates  # pylint: disable=g-import-not-at-top
    errors.extend(f"ranking.template: {p}" for p in templates.template_problems(
        config.ranking.scheme, config.ranking.template))
  from purld_jax import pu as pu_lib  # pylint: disable=g-import-not-at-top
  _choice(errors, config, "pu.mode", pu_lib.MODES)
  _positive(errors, config, "pu.delta", zero_ok=True)
  _positive(errors, config, "loss.grpo.std_floor")
  if not 0.0 <= config.pu.prior <= 1.0:
    errors.append(f"pu.prior={config.pu.prior!r}: must be in [0, 1]")
  if config.pu.mode == "nnpu" and config.get("recipe") in ("grpo", "ldl"):
    errors.append(f"pu.mode='nnpu' with recipe={config.recipe!r}: nnpu is a "
                  "loss on the implicit reward of recipe 'dpo' (use gate "
                  "or shift)")
  _choice(errors, config, "preference.kind", ("pairwise", "listwise"))
  _choice(errors, config, "preference.pairs",
          ("best_vs_worst", "margin", "anchor_as_chosen", "pu"))
  _positive(errors, config, "preference.tau_label")
  _positive(errors, config, "preference.margin", zero_ok=True)
  _choice(errors, config, "loss.dpo.loss_type", losses.DPO_LOSS_TYPES)
  _choice(errors, config, "loss.dpo.reduce", ("pairs", "prompts"))
  _choice(errors, config, "loss.grpo.aggregation", losses.GRPO_AGGREGATIONS)
  _choice(errors, config, "loss.grpo.advantage", preferences.NORMALIZE)
  _choice(errors, config, "opt.nan_policy", state_lib.NAN_POLICIES)
  for key in ("sampling.num_candidates", "sampling.max_new_tokens",
              "loss.dpo.beta", "loss.ldl.beta", "loss.grpo.inner_iterations",
              "opt.grad_accum", "opt.micro_batches", "sft.batch_size", "sft.max_response_len",
              "rl.batch_size", "rl.oversample", "data.max_prompt_len", "ckpt.every_steps",
              "ckpt.keep", "log.every_steps", "eval.batch_size",
              "eval.max_new_tokens"):
    _positive(errors, config, key)
  for key in ("sft.steps", "rl.steps", "sft.learning_rate",
              "opt.learning_rate", "opt.weight_decay", "opt.clip_norm",
              "sampling.temperature", "model.vocab_chunk", "eval.samples",
              "eval.sample_batch_size", "eval.temperature",
              "ckpt.every_minutes"):
    _positive(errors, config, key, zero_ok=True)
  bad = set(config.eval.models.split(",")) - {"before", "sft", "final"}
  if bad or not config.eval.models:
    errors.append(f"eval.models={config.eval.models!r}: a comma list of "
                  "before, sft, final")
  _budgets(errors, config)
  if errors:
    raise ConfigError("config errors:\n  " + "\n  ".join(errors))


def _budgets(errors, config) -> None:
  """Token budgets that would cut each other's text: the held-out answers
  get at least the candidates' budget, and (a teacher that generates) SFT
  and scoring keep every anchor the teacher may write, end of turn
  included. Tokenizers differ, so >= exactly, no slack. Candidates shorter
  than anchors (sampling.max_new_tokens < sft.max_response_len) are fine."""
  ev, smp = config.eval.max_new_tokens, config.sampling.max_new_tokens
  if ev < smp:
    errors.append(f"eval.max_new_tokens={ev!r} < sampling.max_new_tokens="
                  f"{smp!r}: held-out answers would be cut shorter than "
                  "training samples; raise eval.max_new_tokens")
  keep, anchor = config.sft.max_response_len, config.teacher.max_tokens
  if config.teacher.backend == "openai" and keep < anchor:
    errors.append(f"sft.max_response_len={keep!r} < teacher.max_tokens="
                  f"{anchor!r} (teacher.backend='openai'): anchors the "
                  "teacher may write would be cut (without their end of "
                  "turn) for SFT and scoring; raise sft.max_response_len")


def check_answer_words(config) -> None:
  """Raises ConfigError unless the judge's answer words (`ranking.yes_word`,
  `no_word`) are single tokens of the student's vocabulary, for a stage 2
  whose scheme reads them. Reads the tokenizer only (no weights), so a bad
  word is named before SFT and the teacher's anchors, not at the first
  scoring step."""
  from purld_jax import ranking  # pylint: disable=g-import-not-at-top
  from purld_jax import templates  # pylint: disable=g-import-not-at-top
  from purld_jax.train import student  # pylint: disable=g-import-not-at-top
  if (config.recipe == "sft"
      or config.ranking.scheme not in ranking.ANSWER_WORD_SCHEMES):
    return
  with tempfile.TemporaryDirectory() as tmp:  # the tiny model's tokenizer
    tok = student.from_config(config.model, tmp).tokenizer
  errors = []
  for field in ("yes_word", "no_word"):
    word = config.ranking[field]
    try:
      templates.answer_token_ids(tok, word)
    except ValueError as e:
      errors.append(f"ranking.{field}={word!r}: {e} (model.path="
                    f"{config.model.path!r}); the judge's score reads one "
                    "token per answer word")
  if errors:
    raise ConfigError("config errors:\n  " + "\n  ".join(errors))
