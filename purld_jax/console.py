"""`--help` of the installed console commands (pyproject's [project.scripts]).

absl's `--help` prints the `__main__` module's docstring and the flags that
module defined. Under `python -m purld_jax.main` that is purld_jax.main;
under the `purld-train` wrapper it is the wrapper, which has neither, so
the help was one USAGE line. `help_from(__name__)` lends the wrapper the
real module's docstring and key flags.
"""

from __future__ import annotations

import sys

from absl import flags


def help_from(module_name: str, flag_values=flags.FLAGS) -> None:
  """Makes `--help` of the running command show `module_name`'s docstring
  and flags (no-op when that module is itself `__main__`)."""
  if module_name == "__main__":
    return
  main = sys.modules.get("__main__")
  module = sys.modules[module_name]
  if main is not None and not main.__doc__:
    main.__doc__ = module.__doc__
  for flag in flag_values.get_key_flags_for_module(module_name):
    flag_values.register_key_flag_for_module(sys.argv[0], flag)
