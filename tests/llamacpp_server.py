"""The tests' llama.cpp teacher: purld_jax/tools/llamacpp.py."""

from purld_jax.tools.llamacpp import LlamaCppServer, free_port, gguf_path  # noqa: F401
