"""Keeps library lines that say nothing about a run off the terminal.

  from purld_jax import quiet
  quiet.libraries()   # first thing in an entry point, before transformers

Two lines came with every command: transformers' advisory "PyTorch was not
found. Models won't be available ..." (the tokenizer is all it is used for
here) and JAX's "Unable to initialize backend 'tpu': ... libtpu.so" (an INFO
record, which absl prints at its default verbosity, on every machine without
a TPU). Only those are turned off: transformers' advisory warnings
(TRANSFORMERS_NO_ADVISORY_WARNINGS; its real warnings stay) and records
below WARNING of JAX's backend discovery (its warnings, e.g. "A Google TPU
may be present ... Falling back to cpu", stay). Our own messages and
warnings are untouched, and an explicit TRANSFORMERS_NO_ADVISORY_WARNINGS
in the environment wins.
"""

from __future__ import annotations

import logging
import os

# JAX's logger for backend discovery (jax/_src/xla_bridge.py).
JAX_BACKEND_LOGGER = "jax._src.xla_bridge"


def libraries() -> None:
  """Silences the advisory and backend-discovery lines (see module doc).

  Call it before transformers is imported (the advisory is printed at
  import) and before JAX's first computation (the backend is chosen then).
  """
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  logging.getLogger(JAX_BACKEND_LOGGER).setLevel(logging.WARNING)
