r"""Export a run's model for on-premise serving: an HF directory, optionally GGUF.

  python -m purld_jax.export --workdir=DIR --out=OUT [--gguf] \
      [--source=final|reference|latest] [--dtype=float32|bfloat16] [--overwrite]

What is exported (--source):
  final      DIR/final, the policy PU-RL wrote at the end of stage 2
  reference  DIR/reference, stage 1's SFT model (the frozen reference)
  latest     the params of the newest complete orbax checkpoint under
             DIR/ckpt/<stage>/<step>/ (a run still going, or killed), with the
             model and tokenizer rebuilt from the config saved beside them
  (default)  final when it exists, else latest

OUT gets config.json, model.safetensors, the tokenizer files and EXPORT.json
(what was exported); a LoRA run's model (`model.lora.rank` > 0) is written
merged (adapters folded into their weights) and its adapters as a PEFT
directory OUT/adapter/ (adapter_config.json, adapter_model.safetensors;
the base is model.path for stage 1, WORKDIR/reference for stage 2; with
--dtype its tensors are converted too); transformers'
AutoModelForCausalLM / AutoTokenizer load it. --gguf adds OUT/model-f16.gguf for llama.cpp (tools/export_gguf.py:
llama/SmolLM2 or qwen2 models with a byte-level BPE tokenizer). OUT is
written in a temporary directory and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

from absl import app
from absl import flags
from absl import logging

GGUF_NAME = "model-f16.gguf"
PROVENANCE = "EXPORT.json"
FINAL = "final"          # train/pu_rl.py FINAL
REFERENCE = "reference"  # train/sft.py REFERENCE
CKPT = "ckpt"            # train/loop.py: <workdir>/ckpt/<stage>/<step>/
SOURCES = ("final", "reference", "latest")
_DTYPES = ("float32", "bfloat16")


class ExportError(ValueError):
  """Nothing to export where asked; the message names the missing path."""


@dataclasses.dataclass(frozen=True)
class Source:
  """What `find_source` picked.

  Attributes:
    kind: 'final', 'reference' or 'latest'.
    path: the HF directory, or the checkpoint's step directory.
    stage: the checkpoint's stage ('sft', 'dpo', ...), None for HF dirs.
    step: the checkpoint's step, None for HF dirs.
  """

  kind: str
  path: str
  stage: str | None = None
  step: int | None = None

  def describe(self) -> str:
    if self.stage is None:
      return f"{self.kind} model {self.path}"
    return (f"checkpoint of stage {self.stage!r} at step {self.step} "
            f"({self.path})")


def _hf_dir(workdir: str, name: str) -> str | None:
  path = os.path.join(workdir, name)
  return path if os.path.isfile(os.path.join(path, "config.json")) else None


def newest_checkpoint(workdir: str) -> Source | None:
  """The newest complete checkpoint of any stage (by the step directory's
  modification time), or None."""
  from purld_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  root = os.path.join(workdir, CKPT)
  found = []
  for stage in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    steps = checkpoint_lib.complete_steps(os.path.join(root, stage))
    if steps:
      path = os.path.join(root, stage, str(steps[-1]))
      found.append((os.path.getmtime(path), stage, steps[-1], path))
  if not found:
    return None
  _, stage, step, path = max(found)
  return Source("latest", path, stage, step)


def find_source(workdir: str, source: str | None = None) -> Source:
  """The model `source` names in `workdir` (None: final, else latest).

  Raises:
    ExportError naming the path that is missing.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise ExportError(f"--workdir {workdir}: no such directory")
  if source not in (None,) + SOURCES:
    raise ExportError(f"--source={source!r}: not one of {list(SOURCES)}")
  if source in ("final", "reference"):
    name = FINAL if source == "final" else REFERENCE
    path = _hf_dir(workdir, name)
    if path is None:
      raise ExportError(
          f"--source={source}: {os.path.join(workdir, name, 'config.json')} "
          f"not found (no {source} model in this workdir"
          + ("; the run has not finished stage 2"
             if source == "final" else "; stage 1 has not finished") + ")")
    return Source(source, path)
  final = _hf_dir(workdir, FINAL) if source is None else None
  if final is not None:
    return Source("final", final)
  latest = newest_checkpoint(workdir)
  if latest is not None:
    return latest
  hint = (f"; --source=reference exports {os.path.join(workdir, REFERENCE)}"
          if _hf_dir(workdir, REFERENCE) else "")
  looked = ("" if source else
            f"{os.path.join(workdir, FINAL, 'config.json')} not found and ")
  raise ExportError(f"{workdir}: {looked}no complete checkpoint under "
                    f"{os.path.join(workdir, CKPT)}/<stage>/<step>/{hint}")


def load(src: Source, workdir: str):
  """(model, tokenizer) of `src`; params keep their stored dtype."""
  return _load(src, workdir)[:2]


def _lora_base(src: Source, workdir: str, student) -> tuple[str, dict]:
  """(the base's directory or name, its params) under a LoRA checkpoint's
  adapters: the student's init for stage 1, the reference for stage 2."""
  from purld_jax.models import hf  # pylint: disable=g-import-not-at-top
  if src.stage == "sft":
    return student.hf_dir or "tiny", student.init_params()
  ref = _hf_dir(workdir, REFERENCE)
  if ref is None:
    raise ExportError(f"{src.path}: a LoRA checkpoint of stage {src.stage!r} "
                      f"needs its base {os.path.join(workdir, REFERENCE)}/, "
                      "which is missing")
  return ref, student.load_params(ref)


def _load(src: Source, workdir: str):
  """(model, tokenizer, the base of its LoRA adapters or None)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  from purld_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from purld_jax import models  # pylint: disable=g-import-not-at-top
  from purld_jax.train import student as student_lib  # pylint: disable=g-import-not-at-top
  if src.stage is None:
    with open(os.path.join(src.path, "config.json"), encoding="utf-8") as f:
      stored = json.load(f).get("dtype") or "float32"
    param_dtype = jnp.bfloat16 if stored == "bfloat16" else jnp.float32
    return models.load_pretrained(src.path, dtype=jnp.float32,
                                  param_dtype=param_dtype) + (None,)
  config = checkpoint_lib.saved_config(src.path)
  if "model" not in config:
    raise ExportError(f"{src.path}/config: the saved run config has no "
                      "'model' block")
  model_cfg = config_dict.ConfigDict(config["model"])
  path = model_cfg.path
  named = path in (student_lib.TINY, student_lib.EMBEDDED)
  if not named and not os.path.isfile(os.path.join(path, "config.json")):
    raise ExportError(f"{src.path}: the run's model.path {path!r} has no "
                      "config.json any more (the architecture and tokenizer "
                      "come from it)")
  from purld_jax.models import lora  # pylint: disable=g-import-not-at-top
  student = student_lib.from_config(model_cfg, workdir)
  graphdef, shapes = student.abstract()
  if student.cfg.lora is None:
    params = checkpoint_lib.restore_params(
        src.path, checkpoint_lib.abstract_like(shapes))
    return nnx.merge(graphdef, params), student.tokenizer, None
  # A LoRA checkpoint holds the adapters; the frozen base is its source's.
  adapters = checkpoint_lib.restore_params(
      src.path, checkpoint_lib.abstract_like(lora.split(shapes)[0]))
  base_path, base = _lora_base(src, workdir, student)
  return (nnx.merge(graphdef, lora.join(adapters, base)), student.tokenizer,
          base_path)


def _link_files(src: str, dst: str) -> None:
  """`src`'s files in a new directory `dst`: hard links where the file
  system allows (no second copy of the weights on disk), else copies;
  subdirectories (a LoRA run's adapter/) likewise. The run writes its model
  directories anew (tmp + rename), never in place, so a link keeps the
  bytes that were exported."""
  os.makedirs(dst)
  for name in sorted(os.listdir(src)):
    path = os.path.join(src, name)
    if os.path.isdir(path) and not os.path.islink(path):
      _link_files(path, os.path.join(dst, name))
      continue
    if not os.path.isfile(path):
      continue
    try:
      os.link(path, os.path.join(dst, name))
    except OSError:
      shutil.copy2(path, os.path.join(dst, name))


def file_list(out: str) -> str:
  names = sorted(os.listdir(out))
  size = sum(os.path.getsize(os.path.join(out, n)) for n in names)
  return f"{', '.join(names)} ({size / 1e6:.1f} MB)"


def _stamp(src: Source, gguf: bool, dtype: str | None) -> dict:
  """What an export is derived from: the source's weights (content hash of
  an HF directory; stage and step of a checkpoint) and the options."""
  from purld_jax.models import hf  # pylint: disable=g-import-not-at-top
  weights = (hf.weights_digest(src.path) if src.stage is None
             else f"{src.stage}/{src.step}")
  return dict(weights=weights, gguf=bool(gguf), dtype=dtype or None)


def _stored_stamp(out: str) -> dict | None:
  try:
    with open(os.path.join(out, PROVENANCE), encoding="utf-8") as f:
      return json.load(f).get("stamp")
  except (OSError, ValueError):
    return None


def up_to_date(out: str, src: Source, *, gguf: bool = False,
               dtype: str | None = None) -> bool:
  """True when `out` holds a whole export of these very weights with these
  options (its EXPORT.json's stamp matches): writing it again is waste."""
  return _stored_stamp(out) == _stamp(src, gguf, dtype)


def export(workdir: str, out: str, *, source: str | None = None,
           gguf: bool = False, dtype: str | None = None,
           overwrite: bool = False,
           skip_if_current: bool = False) -> tuple[Source, str, bool]:
  """Exports `workdir`'s model (see the module doc) to `out`;
  `skip_if_current` leaves an `up_to_date` export as it is.

  Returns:
    (the Source exported, out as an absolute path, whether it was written).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from purld_jax import models  # pylint: disable=g-import-not-at-top
  workdir, out = os.path.abspath(workdir), os.path.abspath(out)
  if dtype not in (None, "") + _DTYPES:
    raise ExportError(f"--dtype={dtype!r}: not one of {list(_DTYPES)}")
  src = find_source(workdir, source)
  stamp = _stamp(src, gguf, dtype)  # the weights hashed once
  if skip_if_current and _stored_stamp(out) == stamp:
    return src, out, False
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise ExportError(f"--out {out}: exists and is not empty (pass "
                      "--overwrite to replace it)")
  tmp = f"{out}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    if src.stage is None and not dtype:  # an HF directory as it is
      _link_files(src.path, tmp)
    else:
      model, tok, adapter_base = _load(src, workdir)
      models.save_pretrained(model, tok, tmp,
                             dtype=getattr(jnp, dtype) if dtype else None)
      if adapter_base is not None:  # LoRA: the adapters beside the merge
        _write_adapter(model, tmp, adapter_base, dtype)
      elif src.stage is None:  # a LoRA run's HF dir: its adapter/ too
        _convert_adapter(src.path, tmp, dtype)
    with open(os.path.join(tmp, PROVENANCE), "w", encoding="utf-8") as f:
      json.dump(dict(workdir=workdir, source=src.kind, path=src.path,
                     stage=src.stage, step=src.step, stamp=stamp), f,
                indent=2)
    if gguf:
      from purld_jax.tools import export_gguf  # pylint: disable=g-import-not-at-top
      export_gguf.write(tmp, os.path.join(tmp, GGUF_NAME),
                        name=os.path.basename(out))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(out):
    shutil.rmtree(out)
  os.replace(tmp, out)
  return src, out, True


ADAPTER = "adapter"  # train/sft.py ADAPTER


def _write_adapter(model, out: str, base: str, dtype: str | None) -> None:
  """`model`'s LoRA adapters as the PEFT directory out/adapter/."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from purld_jax.models import lora  # pylint: disable=g-import-not-at-top
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  lora.write_peft(lora.split(params)[0], model.cfg, os.path.join(out, ADAPTER),
                  base_model_name_or_path=base,
                  dtype=getattr(jnp, dtype) if dtype else None)


def _convert_adapter(model_dir: str, out: str, dtype: str) -> None:
  """`model_dir/adapter/` (the PEFT directory of a LoRA run's final/ or
  reference/) as out/adapter/ with its tensors in `dtype` and its
  adapter_config.json as it is; nothing when `model_dir` has none."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  from purld_jax.models import lora  # pylint: disable=g-import-not-at-top
  src = os.path.join(model_dir, ADAPTER)
  if not os.path.isfile(os.path.join(src, lora.PEFT_WEIGHTS)):
    return
  dst = os.path.join(out, ADAPTER)
  os.makedirs(dst)
  tensors = st_numpy.load_file(os.path.join(src, lora.PEFT_WEIGHTS))
  st_numpy.save_file(
      {k: np.ascontiguousarray(v.astype(getattr(jnp, dtype)))
       for k, v in tensors.items()},
      os.path.join(dst, lora.PEFT_WEIGHTS), metadata={"format": "pt"})
  shutil.copy2(os.path.join(src, lora.PEFT_CONFIG),
               os.path.join(dst, lora.PEFT_CONFIG))


def define_flags() -> None:
  """The command's flags (defined by its entry point only, so importing this
  module from another absl program adds none)."""
  flags.DEFINE_string(
      "workdir", None, "run directory (python -m purld_jax.main --workdir)")
  flags.DEFINE_string(
      "out", None, "directory to write the HF model (and GGUF) to")
  flags.DEFINE_enum(
      "source", None, list(SOURCES), "what to export: final (WORKDIR/final), "
      "reference (WORKDIR/reference, the SFT model) or latest (the newest "
      "checkpoint under WORKDIR/ckpt/); default: final if present, else "
      "latest")
  flags.DEFINE_boolean(
      "gguf", False, f"also write OUT/{GGUF_NAME} (float16, llama.cpp; llama/"
      "SmolLM2 and qwen2 models with a byte-level BPE tokenizer)")
  flags.DEFINE_enum(
      "dtype", None, list(_DTYPES), "dtype of the safetensors (default: the "
      "dtype the model is stored in)")
  flags.DEFINE_boolean(
      "overwrite", False, "replace OUT when it exists and is not empty")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every read at INFO
    logging.set_verbosity(logging.WARNING)
  from purld_jax.models import hf  # pylint: disable=g-import-not-at-top
  from purld_jax.models import hf_config  # pylint: disable=g-import-not-at-top
  from purld_jax.tools import export_gguf  # pylint: disable=g-import-not-at-top
  try:
    f = flags.FLAGS
    src, out, _ = export(f.workdir, f.out, source=f.source, gguf=f.gguf,
                         dtype=f.dtype, overwrite=f.overwrite)
  except (ExportError, hf.CheckpointError, hf_config.ConfigError,
          export_gguf.ExportError) as e:
    print(f"export: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"exported the {src.describe()}\n  -> {out}: {file_list(out)}")


def console_main():
  """The `purld-export` command: the same as `python -m purld_jax.export`."""
  from purld_jax import quiet  # pylint: disable=g-import-not-at-top
  quiet.libraries()
  define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  from purld_jax import console  # pylint: disable=g-import-not-at-top
  console.help_from(__name__)
  app.run(main)


if __name__ == "__main__":
  console_main()
