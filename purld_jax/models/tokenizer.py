"""Tokenizer, chat template and special ids, over transformers' AutoTokenizer.

The tokenizers (Rust) backend only: no torch, no network. Chat rendering uses
the template shipped in the model directory's tokenizer_config.json (jinja2).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Sequence

import numpy as np

# End-of-turn markers of the supported families, used as stop tokens when
# the vocabulary has them.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
                "<|endoftext|>", "</s>", "<end_of_utterance>")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A Hugging Face tokenizer plus the ids sampling and scoring need.

  Attributes:
    hf: the transformers tokenizer.
    stop_ids: ids that end a response (EOS and end-of-turn).
    pad_id: id used for padding (never attended to).
    content_parts: the chat template reads each message's content as a list
      of {"type": "text" | "image", ...} parts (SmolVLM, Idefics3): string
      contents are passed as one text part, lists as they are.
  """

  hf: object
  stop_ids: tuple[int, ...]
  pad_id: int
  content_parts: bool = False

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  def render_chat(self, messages: Sequence[dict], *,
                  add_generation_prompt: bool = True) -> str:
    """The chat template applied to `messages` as text."""
    if not getattr(self.hf, "chat_template", None):
      raise ValueError(f"{self.hf.name_or_path}: tokenizer has no chat_template "
                       "(tokenizer_config.json field 'chat_template')")
    if self.content_parts:
      messages = [dict(m, content=[{"type": "text", "text": m["content"]}])
                  if isinstance(m["content"], str) else m for m in messages]
    return self.hf.apply_chat_template(
        list(messages), tokenize=False,
        add_generation_prompt=add_generation_prompt)

  def encode_chat(self, messages: Sequence[dict], *,
                  add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered chat (special tokens come from the text)."""
    return self.encode(self.render_chat(
        messages, add_generation_prompt=add_generation_prompt))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, adding no BOS/EOS."""
    return list(self.hf.encode(text, add_special_tokens=False))

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    return self.hf.decode([int(i) for i in ids],
                          skip_special_tokens=skip_special_tokens)


def _generation_eos(path: pathlib.Path) -> list[int]:
  f = path / "generation_config.json"
  if not f.is_file():
    return []
  eos = json.loads(f.read_text()).get("eos_token_id")
  if eos is None:
    return []
  return list(eos) if isinstance(eos, list) else [eos]


def load(path: str | os.PathLike, *, content_parts: bool = False
         ) -> Tokenizer:
  """Loads the tokenizer of a Hugging Face model directory, offline
  (`content_parts`: see `Tokenizer`)."""
  import transformers  # heavy import kept at the edge
  path = pathlib.Path(path)
  if not (path / "tokenizer.json").is_file() and not (
      path / "tokenizer_config.json").is_file():
    raise FileNotFoundError(f"{path}: no tokenizer.json or "
                            "tokenizer_config.json")
  hf = transformers.AutoTokenizer.from_pretrained(str(path),
                                                  local_files_only=True)
  stops = []
  if hf.eos_token_id is not None:
    stops.append(hf.eos_token_id)
  stops += _generation_eos(path)
  vocab = hf.get_vocab()
  stops += [vocab[t] for t in _END_OF_TURN if t in vocab]
  stop_ids = tuple(dict.fromkeys(int(s) for s in stops))
  pad = hf.pad_token_id if hf.pad_token_id is not None else stop_ids[0]
  return Tokenizer(hf=hf, stop_ids=stop_ids, pad_id=int(pad),
                   content_parts=content_parts)


def bucket_length(n: int, buckets: Sequence[int] | None) -> int:
  """The smallest bucket >= n (n itself when no buckets fit)."""
  if not buckets:
    return n
  fits = [b for b in sorted(buckets) if b >= n]
  return fits[0] if fits else n


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists.

  Returns:
    tokens np.int32[B, P] and mask np.bool_[B, P] (True on real tokens),
    P = `length` or the longest sequence.
  """
  p = max(len(s) for s in seqs) if length is None else length
  if any(len(s) > p for s in seqs):
    raise ValueError(f"a sequence of {max(len(s) for s in seqs)} tokens does "
                     f"not fit length {p}")
  tokens = np.full((len(seqs), p), pad_id, np.int32)
  mask = np.zeros((len(seqs), p), bool)
  for i, s in enumerate(seqs):
    if len(s):
      tokens[i, p - len(s):] = s
      mask[i, p - len(s):] = True
  return tokens, mask
