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
stage is not run again. --dry_run validates the config and prints the
plan (purld_jax/plan.py) without running anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

# Config files import `configs.common`: make the repository root importable
# whatever the current directory.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from purld_jax import redact  # noqa: E402

# The checks run before anything is computed (purld_jax/config_check.py).
from purld_jax.config_check import STAGE2_RUNNER  # noqa: E402
from purld_jax.config_check import ConfigError  # noqa: E402
from purld_jax.config_check import check_answer_words  # noqa: E402
from purld_jax.config_check import validate  # noqa: E402


def define_flags(flag_values=flags.FLAGS):
  config_flags.DEFINE_config_file(
      "config", None, "config file, e.g. configs/demo.py or "
      "configs/sft.py:tiny; override fields with --config.block.field=value",
      flag_values=flag_values, lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory: anchor ledger, "
                      "checkpoints, metrics, the reference (resumed when it "
                      "holds a checkpoint)", flag_values=flag_values)
  flags.DEFINE_bool("dry_run", False, "validate the config and print the "
                    "plan (stages, updates, devices, memory estimate); "
                    "nothing is read beyond config files, nothing is run "
                    "or written", flag_values=flag_values)


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
    raise CommandLineError(redact.hide(_describe(e, argv), argv)) from None
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


def run(config, workdir: str) -> None:
  """Validates `config`, then runs stage 1, (recipe != sft) stage 2 and the
  held-out evaluation."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir}: exists and is not a directory")
  validate(config)
  check_answer_words(config)
  use_jit_cache(config.jit_cache_dir)
  import jax  # pylint: disable=g-import-not-at-top
  first = jax.process_index() == 0  # writes the run's files
  os.makedirs(workdir, exist_ok=True)
  if first:
    from purld_jax import preemption  # pylint: disable=g-import-not-at-top
    for path in preemption.remove_stale_tmp(workdir):
      print(f"[run] removed {path}: left by a killed writer", file=sys.stderr)
    with open(os.path.join(workdir, "config.json"), "w",
              encoding="utf-8") as f:
      json.dump(config.to_dict(), f, indent=2, default=list)
  from purld_jax.train import heldout  # pylint: disable=g-import-not-at-top
  from purld_jax.train import sft  # pylint: disable=g-import-not-at-top
  from purld_jax import hostmem  # pylint: disable=g-import-not-at-top
  reference_dir = sft.run(config, workdir)
  hostmem.release()  # stage 1's state and buffers, freed: back to the system
  print(f"[sft] reference: {reference_dir}", file=sys.stderr)
  models = {"before": "init"}
  if config.sft.steps > 0:
    models["sft"] = reference_dir
  if config.recipe != "sft":
    models["final"] = importlib.import_module(STAGE2_RUNNER).run(
        config, workdir, reference_dir=reference_dir)
    hostmem.release()
  wanted = config.eval.get("models", "before,sft,final").split(",")
  heldout.run(config, workdir, {k: v for k, v in models.items()
                                if k in wanted})
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
    src, out, written = export.export(
        workdir, os.path.join(workdir, config.export.dir),
        source="final" if "final" in models else "reference",
        gguf=config.export.gguf, overwrite=True, skip_if_current=True)
    print(f"[export] the {src.describe()}\n  -> {out}: "
          f"{export.file_list(out)}"
          + ("" if written else " (up to date: not written again)"),
          file=sys.stderr)


def _user_errors() -> tuple[type[Exception], ...]:
  """What a bad input raises (each message names the file, line, field or
  URL): shown in one line, without a traceback."""
  # pylint: disable=g-import-not-at-top
  from purld_jax import checkpoint
  from purld_jax import prompts
  from purld_jax import teacher_wire
  from purld_jax.models import hf
  from purld_jax.models import hf_config
  from purld_jax.train import state
  return (ConfigError, prompts.PromptFileError, hf.CheckpointError,
          hf_config.ConfigError, checkpoint.CheckpointError,
          teacher_wire.TeacherError, state.NonFiniteError)


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
    if flags.FLAGS.dry_run:
      validate(config)
      from purld_jax import plan  # pylint: disable=g-import-not-at-top
      print(plan.describe(config, flags.FLAGS.workdir))
      return 0
    with preemption.on_sigterm(config.ckpt.get("save_on_sigterm", True)):
      run(config, flags.FLAGS.workdir)
  except (ledger.AnchorError, teacher.ConfigError) as e:
    # Anchors the teacher did not give (those stored are kept: a rerun asks
    # only the rest), an unusable ledger, a teacher that cannot be asked.
    print(f"error: {redact.hide(str(e), sys.argv)}", file=sys.stderr)
    return 1
  except _user_errors() as e:  # the message names the file, field or URL
    print(f"error: {redact.hide(str(e), sys.argv)}", file=sys.stderr)
    return 2
  except preemption.Preempted as e:
    print(e, file=sys.stderr)
    return preemption.EXIT_CODE
  return 0


def main():
  from purld_jax import distributed  # pylint: disable=g-import-not-at-top
  from purld_jax import quiet  # pylint: disable=g-import-not-at-top
  quiet.libraries()  # no "PyTorch was not found", no libtpu INFO line
  distributed.initialize()  # before any other JAX call; no-op on one process
  from purld_jax import hostmem  # pylint: disable=g-import-not-at-top
  hostmem.configure()  # large buffers freed go back to the system at once
  define_flags()
  from purld_jax import console  # pylint: disable=g-import-not-at-top
  console.help_from(__name__)
  app.run(_main, flags_parser=parse_flags)


if __name__ == "__main__":
  main()
