r"""Train a student with PU-RLD: stage 1 SFT on anchors, stage 2 PU-RL.

  python -m purld_jax.main --config=configs/NAME.py[:VARIANT] --workdir=DIR \
      [--config.KEY=VALUE ...]

  python -m purld_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m purld_jax.main --config=configs/sft.py:tiny --workdir=/tmp/t \
      --config.sft.steps=20 --config.opt.nan_policy=stop

--config names a config file (configs/*.py, see configs/common.py for every
field); any field is overridden with --config.block.field=value. The config
is checked before anything is computed: an unknown key, a value of the wrong
type or outside its choices, a missing prompt file or model directory is an
error naming it. `config.recipe` picks the trainer: sft (stage 1 alone), dpo,
grpo, ldl (stage 1, then the PU-RL loop of train/pu_rl.py with the step of
train/<recipe>.py), then the before/after table on the held-out prompts
(train/heldout.py) and, with `export.dir`, the export for serving
(purld_jax/export.py). A workdir that holds a checkpoint is resumed; a finished
stage is not run again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import tempfile

# Config files import `configs.common`: make the repository root importable
# whatever the current directory.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

RECIPES = ("sft", "dpo", "grpo", "ldl")
# Stage 2 of every RL recipe: a module with run(config, workdir,
# reference_dir=...); the recipe's own step lives in train/<recipe>.py.
STAGE2_RUNNER = "purld_jax.train.pu_rl"


class ConfigError(ValueError):
  """A config that cannot run; the message names every bad field."""


def define_flags(flag_values=flags.FLAGS):
  config_flags.DEFINE_config_file(
      "config", None, "config file, e.g. configs/demo.py or "
      "configs/sft.py:tiny; override fields with --config.block.field=value",
      flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory: anchor ledger, "
                      "checkpoints, metrics, the reference (resumed when it "
                      "holds a checkpoint)", flag_values=flag_values)


# ----------------------------------------------------------------------------
# Errors of the command line, before any compute


class CommandLineError(ValueError):
  """A bad flag, config file or override; the message names it."""


def _describe(e: Exception, argv) -> str:
  text = str(e).strip()
  if "Traceback (most recent call last)" in text:  # a config file that raised
    lines = text.splitlines()
    text = f"{lines[0].rstrip(':')}: {lines[-1].strip()}"
  if isinstance(e, flags.Error):
    return text
  if isinstance(e, (AttributeError, KeyError)):
    # ml_collections: an override of a field the config does not have; the
    # message starts with the missing name (quoted).
    missing = re.match(r"""[\\'"]*(\w+)""", text)
    for arg in argv[1:]:
      m = re.match(r"--config\.([^=]+)", arg)
      if m and missing and missing.group(1) in m.group(1).split("."):
        hint = re.search(r'Did you mean "([^"]+)"', text)
        return (f"{arg}: unknown config key {m.group(1)!r}"
                + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))
    return f"bad --config override: {text}"
  if isinstance(e, OSError) and "Failed loading config file" in text:
    tried = re.findall(r"^\s+(\S.*\.py\S*)$", text, flags=re.M)
    return (f"--config: cannot load config file {tried[0] if tried else ''}: "
            + text.splitlines()[-1].strip())
  return f"--config: {type(e).__name__}: {text}"


def parse(argv, flag_values=flags.FLAGS):
  """Parses argv and loads the config; raises CommandLineError naming the
  bad flag, override or config file."""
  saved_argv, sys.argv = sys.argv, list(argv)  # config_flags reads sys.argv
  try:
    rest = flag_values(argv)
    config = flag_values["config"].value
    if config is not None:
      config.keys()  # a config that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    raise CommandLineError(_describe(e, argv)) from None
  finally:
    sys.argv = saved_argv
  if config is None:
    raise CommandLineError(
        "--config is required, e.g. --config=configs/demo.py")
  if not flag_values["workdir"].value:
    raise CommandLineError("--workdir is required")
  return rest


def parse_flags(argv):
  """absl's flags_parser: `parse`, errors printed without a traceback."""
  try:
    return parse(argv)
  except CommandLineError as e:
    print(f"error: {e}\n(see --help)", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------
# Config validation


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


def _prompt_file(errors, key, path):
  from purld_jax import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    errors.append(f"{key}={path!r}: no such prompt file")
    return
  try:
    prompts_lib.read_jsonl(path)
  except prompts_lib.PromptFileError as e:
    errors.append(f"{key}: {e}")


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


def validate(config) -> None:
  """Raises ConfigError listing every problem of `config` (no compute)."""
  from purld_jax import losses  # pylint: disable=g-import-not-at-top
  from purld_jax import preferences  # pylint: disable=g-import-not-at-top
  from purld_jax import ranking  # pylint: disable=g-import-not-at-top
  from purld_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  from purld_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  errors = []
  _choice(errors, config, "recipe", RECIPES)
  if config.recipe in RECIPES and config.recipe != "sft":
    for module in (STAGE2_RUNNER, f"purld_jax.train.{config.recipe}"):
      if importlib.util.find_spec(module) is None:
        errors.append(
            f"recipe={config.recipe!r}: its trainer {module} is not written "
            "yet (issue 7); --config.recipe=sft runs stage 1 alone")
  path = config.model.path
  if path not in ("tiny", "embedded") and not os.path.isfile(
      os.path.join(path, "config.json")):
    errors.append(f"model.path={path!r}: not 'tiny', 'embedded' or a "
                  "Hugging Face directory with config.json")
  for key in ("model.dtype", "model.param_dtype"):
    _choice(errors, config, key, ("float32", "bfloat16"))
  from purld_jax.models import llama  # pylint: disable=g-import-not-at-top
  _choice(errors, config, "model.remat", llama.REMAT_POLICIES)
  _mesh(errors, config)
  n = config.opt.micro_batches
  for key, size in (("sft.batch_size", config.sft.batch_size),
                    ("rl.batch_size", config.rl.batch_size)):
    if isinstance(n, int) and n > 0 and size % n:
      errors.append(f"opt.micro_batches={n}: does not divide {key}={size}")
  _prompt_file(errors, "data.train_path", config.data.train_path)
  if config.data.eval_path:
    _prompt_file(errors, "data.eval_path", config.data.eval_path)
  if any(b <= 0 for b in config.data.buckets):
    errors.append(f"data.buckets={config.data.buckets!r}: must be > 0")
  try:
    teacher_lib.TeacherConfig.from_mapping(config.teacher.to_dict())
  except teacher_lib.ConfigError as e:
    errors.append(f"teacher: {e}")
  _choice(errors, config, "ranking.scheme", ranking.SCHEMES)
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
              "rl.batch_size", "data.max_prompt_len", "ckpt.every_steps",
              "ckpt.keep", "log.every_steps", "eval.batch_size",
              "eval.max_new_tokens"):
    _positive(errors, config, key)
  for key in ("sft.steps", "rl.steps", "sft.learning_rate",
              "opt.learning_rate", "opt.weight_decay", "opt.clip_norm",
              "sampling.temperature", "model.vocab_chunk",
              "ckpt.every_minutes"):
    _positive(errors, config, key, zero_ok=True)
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


# ----------------------------------------------------------------------------
# Run


def use_jit_cache(value: str) -> str | None:
  """Points JAX's persistent compilation cache at `config.jit_cache_dir`."""
  if not value:
    return None
  if value == "default":
    from purld_jax.models import embedded  # pylint: disable=g-import-not-at-top
    value = os.path.join(embedded.default_cache_dir(), "jit")
  import jax  # pylint: disable=g-import-not-at-top
  os.makedirs(value, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", value)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return value


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


def run(config, workdir: str) -> None:
  """Validates `config`, then runs stage 1, (recipe != sft) stage 2 and the
  held-out evaluation."""
  validate(config)
  check_answer_words(config)
  use_jit_cache(config.jit_cache_dir)
  import jax  # pylint: disable=g-import-not-at-top
  first = jax.process_index() == 0  # writes the run's files
  os.makedirs(workdir, exist_ok=True)
  if first:
    with open(os.path.join(workdir, "config.json"), "w",
              encoding="utf-8") as f:
      json.dump(config.to_dict(), f, indent=2, default=list)
  from purld_jax.train import heldout  # pylint: disable=g-import-not-at-top
  from purld_jax.train import sft  # pylint: disable=g-import-not-at-top
  reference_dir = sft.run(config, workdir)
  print(f"[sft] reference: {reference_dir}", file=sys.stderr)
  models = {"before": "init"}
  if config.sft.steps > 0:
    models["sft"] = reference_dir
  if config.recipe != "sft":
    models["final"] = importlib.import_module(STAGE2_RUNNER).run(
        config, workdir, reference_dir=reference_dir)
  heldout.run(config, workdir, models)
  if not first:
    return
  from purld_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  if metrics_lib.read(workdir):
    from purld_jax import plot  # pylint: disable=g-import-not-at-top
    print(f"[plot] {', '.join(plot.plot_workdir(workdir))}", file=sys.stderr)
  if config.export.dir:
    from purld_jax import export  # pylint: disable=g-import-not-at-top
    from purld_jax import preemption  # pylint: disable=g-import-not-at-top
    preemption.stop_before("export", "the export (training and evaluation "
                           "are done)", workdir, collective=False)
    src, out = export.export(
        workdir, os.path.join(workdir, config.export.dir),
        source="final" if "final" in models else "reference",
        gguf=config.export.gguf, overwrite=True)
    print(f"[export] the {src.describe()}\n  -> {out}: "
          f"{export.file_list(out)}", file=sys.stderr)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  from purld_jax import ledger  # pylint: disable=g-import-not-at-top
  from purld_jax import preemption  # pylint: disable=g-import-not-at-top
  from purld_jax import teacher  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  try:
    with preemption.on_sigterm(config.ckpt.get("save_on_sigterm", True)):
      run(config, flags.FLAGS.workdir)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (ledger.AnchorError, teacher.ConfigError) as e:
    # Anchors the teacher did not give (those stored are kept: a rerun asks
    # only the rest), an unusable ledger, a teacher that cannot be asked.
    print(f"error: {e}", file=sys.stderr)
    return 1
  except preemption.Preempted as e:
    print(e, file=sys.stderr)
    return preemption.EXIT_CODE
  return 0


def main():
  from purld_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()  # before any other JAX call; no-op on one process
  define_flags()
  app.run(_main, flags_parser=parse_flags)


if __name__ == "__main__":
  main()
