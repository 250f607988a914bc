"""The answers of `purld_jax.chat`: a text model's streamed decoding
(`Decoder`, compiled once per prompt bucket) and the `Reply` it gives;
a vision-language student's answers are chat_images.py's."""

from __future__ import annotations

import collections
import dataclasses
import sys
import time
from typing import Sequence

# Prompt lengths (tokens) are padded up to one of these; each is compiled
# once. The largest is the longest conversation kept.
BUCKETS = (64, 128, 256, 512, 1024)


@dataclasses.dataclass
class Reply:
  """One answer: its text, token ids (stop token excluded) and timings."""

  text: str
  ids: list[int]
  prefill_s: float  # the prompt's forward pass and the first token
  decode_s: float  # the `steps` one-token steps after it
  steps: int


def fitting_buckets(buckets, max_new_tokens: int,
                    positions: int) -> tuple[int, ...]:
  """The prompt buckets that leave room for `max_new_tokens` within the
  model's `positions`, sorted; ValueError when none does."""
  out = tuple(b for b in sorted(buckets) if b <= positions - max_new_tokens)
  if not out:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no prompt "
                     f"bucket {tuple(buckets)} within the model's "
                     f"{positions} positions")
  return out


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
    self.buckets = fitting_buckets(buckets, max_new_tokens,
                                   model.cfg.max_position_embeddings)
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
