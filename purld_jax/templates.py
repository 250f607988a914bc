"""The self-ranking's prompts: templates and the host-side rows they make.

The self-ranking's first layer (`self_scoring.py` runs the rows through the
scorer model and `ranking.py` turns log-probs into scores): numpy and Python
over rows, off the hot path. Each builder turns (prompt messages, anchor
text, candidate token ids) into a left-padded `ScoringBatch` of R rows,
ordered b * K + k: tokens i32[R, T], attention_mask bool[R, T] and
target_mask bool[R, T] (the scored suffix; T is the whole template row).
Candidates are cut at their first stop id (the stop token itself dropped)
before they are decoded into a template or appended as targets.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Sequence

import numpy as np

from purld_jax.models import tokenizer as tok_lib

# Default templates (user turns). Placeholders: {prompt}, {reference} (the
# anchor), {response} / {response_a} / {response_b} (decoded candidates),
# {draft} (a candidate shown as a draft).
JUDGE_TEMPLATE = (
    "Question:\n{prompt}\n\nReference answer:\n{reference}\n\n"
    "Candidate answer:\n{response}\n\n"
    "Is the candidate answer as good as the reference answer? "
    "Answer Yes or No.")
SELF_REWARD_TEMPLATE = (
    "Question:\n{prompt}\n\nCandidate answer:\n{response}\n\n"
    "Is the candidate answer a good answer to the question? "
    "Answer Yes or No.")
PAIRWISE_TEMPLATE = (
    "Question:\n{prompt}\n\nReference answer:\n{reference}\n\n"
    "Response A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
    "Using the reference answer as a guide, is Response A better than "
    "Response B? Answer Yes or No.")
PMI_TEMPLATE = "{prompt}\n\nA reference answer:\n{reference}"
RECON_TEMPLATE = (
    "{prompt}\n\nA draft answer:\n{draft}\n\nWrite the final answer.")


# Per scheme: (the placeholders its template is filled with, those it must
# hold: without them the scorer never sees the candidate, or the anchor).
# Schemes without a template (similarity, oracle) are absent.
PLACEHOLDERS = {
    "judge": (("prompt", "reference", "response"), ("response",)),
    "self_reward": (("prompt", "reference", "response"), ("response",)),
    "pairwise_judge": (("prompt", "reference", "response_a", "response_b"),
                       ("response_a", "response_b")),
    "pmi": (("prompt", "reference"), ("reference",)),
    "anchor_recon": (("prompt", "draft"), ("draft",)),
    "teacher_judge": (("prompt", "response"), ("response",)),
}


def template_problems(scheme: str, template: str) -> list[str]:
  """What is wrong with `template` as `scheme`'s template ([] if nothing).

  Checked before any compute (`main.validate`, `ranking.template`): the
  text must parse as a `str.format` string, use only the scheme's
  placeholders (PLACEHOLDERS), and hold the required ones; a literal brace
  is written {{ or }}. A scheme with no template accepts anything.
  """
  if scheme not in PLACEHOLDERS:
    return []
  allowed, required = PLACEHOLDERS[scheme]
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template)
              if f is not None]
  except ValueError as e:
    return [f"not a format string ({e}; a literal brace is written "
            "{{ or }})"]
  names = [f.split(".")[0].split("[")[0] for f in fields]
  takes = ", ".join("{" + a + "}" for a in allowed)
  problems = []
  for n in dict.fromkeys(names):
    if n not in allowed:
      shown = "{" + n + "}" if n else "{} (a positional field)"
      problems.append(f"unknown placeholder {shown}; scheme {scheme!r} "
                      f"takes {takes}")
  for r in required:
    if r not in names:
      problems.append(f"no {{{r}}}: scheme {scheme!r} would never show it "
                      f"(takes {takes})")
  return problems


@dataclasses.dataclass(frozen=True)
class ScoringBatch:
  """Left-padded rows for one model call (numpy, host side).

  Attributes:
    tokens: i32[R, T].
    attention_mask: bool[R, T], False on padding.
    target_mask: bool[R, T], True on the scored suffix (candidate or anchor
      tokens); all False for judge rows, which are read after the last
      column (`scoring.last_logps`).
  """
  tokens: np.ndarray
  attention_mask: np.ndarray
  target_mask: np.ndarray


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
  """`ids` up to (not including) the first stop id."""
  out = []
  for i in ids:
    if int(i) in stop_ids:
      break
    out.append(int(i))
  return out


def through_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
  """`ids` up to and including the first stop id (all of `ids` when none)."""
  cut = cut_at_stop(ids, stop_ids)
  return cut + [int(ids[len(cut)])] if len(cut) < len(ids) else cut


def candidate_lists(tokens: np.ndarray, mask: np.ndarray
                    ) -> list[list[list[int]]]:
  """Sampler arrays i32[B, K, T] + bool[B, K, T] -> B x K token-id lists."""
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  return [[tokens[b, k][mask[b, k]].tolist() for k in range(tokens.shape[1])]
          for b in range(tokens.shape[0])]


def prompt_text(messages: Sequence[dict]) -> str:
  """A prompt conversation as plain text for a template: the content of a
  single user turn as is; otherwise "role: content" lines."""
  if len(messages) == 1 and messages[0]["role"] == "user":
    return messages[0]["content"]
  return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _with_last_user(messages: Sequence[dict], content: str) -> list[dict]:
  """`messages` with the last user turn's content replaced."""
  out = [dict(m) for m in messages]
  last = max(i for i, m in enumerate(out) if m["role"] == "user")
  out[last]["content"] = content
  return out


def finish_rows(rows, n_target, pad_id, pad_multiple, length=None
                ) -> ScoringBatch:
  """Left-pads rows to `length` (default: longest, rounded up to
  pad_multiple); the last n_target[r] tokens of row r are targets."""
  if length is None:
    longest = max(len(r) for r in rows)
    length = -(-longest // pad_multiple) * pad_multiple
  tokens, mask = tok_lib.pad_left(rows, pad_id, length)
  cols = np.arange(length)[None, :]
  target = cols >= length - np.asarray(n_target, np.int64)[:, None]
  return ScoringBatch(tokens, mask, target & mask)


def prompt_at(template: str, **fields) -> int:
  """Where the text of the first {prompt} field begins in
  template.format(**fields) (0 when the template has none): a judge row's
  images go there (`vision.with_image_parts`)."""
  head = []
  for literal, field, spec, conv in string.Formatter().parse(template):
    head.append(literal.replace("{", "{{").replace("}", "}}"))
    if field is None:
      continue
    if field.split(".")[0].split("[")[0] == "prompt":
      return len("".join(head).format(**fields))
    head.append("{" + field + (f"!{conv}" if conv else "")
                + (f":{spec}" if spec else "") + "}")
  return 0


def _judge_row(tok, template, encode_chat, b, **fields) -> list[int]:
  """Token ids of one judge conversation: a single user turn,
  template(**fields). With `encode_chat(b, messages, at)` (image prompts:
  `vision.PromptImages.encode_chat`) prompt b's images are put where the
  prompt's text begins (`prompt_at`)."""
  msgs = [{"role": "user", "content": template.format(**fields)}]
  if encode_chat is None:
    return tok.encode_chat(msgs)
  return encode_chat(b, msgs, prompt_at(template, **fields))


def judge_batch(tok, prompts, anchors, candidates, *,
                template: str = JUDGE_TEMPLATE,
                pad_multiple: int = 16, encode_chat=None) -> ScoringBatch:
  """One judge conversation per candidate, R = B * K rows.

  Args:
    tok: `models.tokenizer.Tokenizer`.
    prompts: B prompt conversations (lists of {"role", "content"}).
    anchors: B anchor texts (ignored by templates without {reference}, such
      as SELF_REWARD_TEMPLATE).
    candidates: B lists of K token-id lists.
    template: user-turn text with {prompt}, {reference}, {response}.
    pad_multiple: T is rounded up to a multiple of this (fewer recompiles).
    encode_chat: None (text prompts: `tok.encode_chat`), or
      encode_chat(b, messages, at) -> ids for image prompts (`_judge_row`).
  """
  rows = []
  for b, (msgs, anchor, group) in enumerate(zip(prompts, anchors,
                                                candidates)):
    for ids in group:
      text = tok.decode(cut_at_stop(ids, tok.stop_ids))
      rows.append(_judge_row(tok, template, encode_chat, b,
                             prompt=prompt_text(msgs), reference=anchor,
                             response=text))
  return finish_rows(rows, [0] * len(rows), tok.pad_id, pad_multiple)


def pair_design(k: int, opponents: int = 0) -> np.ndarray:
  """bool[K, K]: which members a pairwise judge compares (symmetric, False
  on the diagonal; `ranking.pair_opponents`).

  opponents = 0, or >= K - 1: every pair (K (K - 1) / 2 pairs). Else an even
  number 2r: the cyclic design, member i meets i +- 1, ..., i +- r (mod K),
  so every member has exactly `opponents` opponents (win counts stay
  comparable) and the comparison graph is connected (Bradley-Terry is
  identified): K r pairs, K * opponents ordered rows instead of K (K - 1).
  """
  if opponents < 0 or (opponents % 2 and opponents < k - 1):
    raise ValueError(f"pair opponents={opponents}: must be 0 (all pairs) or "
                     f"an even number >= 2 (or >= K - 1 = {k - 1})")
  if opponents == 0 or opponents >= k - 1:
    return ~np.eye(k, dtype=bool)
  gap = np.abs(np.arange(k)[:, None] - np.arange(k)[None, :])
  cyclic = np.minimum(gap, k - gap)  # 0 on the diagonal
  return (cyclic >= 1) & (cyclic <= opponents // 2)


def ordered_pairs(k: int, opponents: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """np.int32[R] (i, j): both orders of every pair of `pair_design(K,
  opponents)`, row-major (R = K (K - 1) for all pairs)."""
  i, j = np.nonzero(pair_design(k, opponents))
  return i.astype(np.int32), j.astype(np.int32)


def pairwise_batch(tok, prompts, anchors, candidates, *,
                   template: str = PAIRWISE_TEMPLATE,
                   pad_multiple: int = 16, opponents: int = 0,
                   encode_chat=None) -> ScoringBatch:
  """One judge conversation per ordered pair (A = y_i, B = y_j), both
  orders, in `ordered_pairs(K, opponents)` order per prompt (R = B * K
  (K - 1) rows for all pairs, B * K * opponents for a sparse design).
  `encode_chat` as in `judge_batch`."""
  rows = []
  for b, (msgs, anchor, group) in enumerate(zip(prompts, anchors,
                                                candidates)):
    texts = [tok.decode(cut_at_stop(ids, tok.stop_ids)) for ids in group]
    for i, j in zip(*ordered_pairs(len(group), opponents)):
      rows.append(_judge_row(tok, template, encode_chat, b,
                             prompt=prompt_text(msgs), reference=anchor,
                             response_a=texts[i], response_b=texts[j]))
  return finish_rows(rows, [0] * len(rows), tok.pad_id, pad_multiple)


def pmi_batches(tok, prompts, anchors, candidates, *,
                template: str = PMI_TEMPLATE, pad_multiple: int = 16,
                keep_stop: bool = False, encode_chat=None
                ) -> tuple[ScoringBatch, ScoringBatch]:
  """Each candidate after two contexts, R = B * K rows each, same T.

  A candidate is cut at its first stop id, which is kept as its last target
  with `keep_stop` (`ranking.pmi_stop`).

  With the anchor: the last user turn becomes template(prompt, reference);
  without: the prompt as is. The candidate's tokens are appended after the
  generation prompt unchanged (no re-tokenisation) and are the targets;
  left padding to a common T puts them at the same columns in both batches.
  `encode_chat(b, messages)` encodes prompt b's contexts (default
  `tok.encode_chat`; image prompts: `vision.PromptImages.encode_chat`, so
  both contexts hold the prompt's images).
  """
  encode_chat = encode_chat or (lambda b, msgs: tok.encode_chat(msgs))
  with_a, plain, n = [], [], []
  for b, (msgs, anchor, group) in enumerate(zip(prompts, anchors,
                                                candidates)):
    last = [m for m in msgs if m["role"] == "user"][-1]["content"]
    ctx_a = encode_chat(b, _with_last_user(
        msgs, template.format(prompt=last, reference=anchor)))
    ctx = encode_chat(b, msgs)
    for ids in group:
      y = (through_stop if keep_stop else cut_at_stop)(ids, tok.stop_ids)
      with_a.append(ctx_a + y)
      plain.append(ctx + y)
      n.append(len(y))
  longest = max(len(r) for r in with_a + plain)
  length = -(-longest // pad_multiple) * pad_multiple
  return (finish_rows(with_a, n, tok.pad_id, pad_multiple, length),
          finish_rows(plain, n, tok.pad_id, pad_multiple, length))


def recon_batch(tok, prompts, anchors, candidates, *,
                template: str = RECON_TEMPLATE,
                pad_multiple: int = 16, encode_chat=None) -> ScoringBatch:
  """The candidate shown as a draft, the anchor as the answer to score.

  The last user turn becomes template(prompt, draft = decoded candidate);
  the targets are tok.encode(anchor) after the generation prompt (no
  end-of-turn token). R = B * K rows. `encode_chat(b, messages)` as in
  `pmi_batches` (image prompts: the images stay in front of the rewritten
  user turn).
  """
  encode_chat = encode_chat or (lambda b, msgs: tok.encode_chat(msgs))
  rows, n = [], []
  for b, (msgs, anchor, group) in enumerate(zip(prompts, anchors,
                                                candidates)):
    last = [m for m in msgs if m["role"] == "user"][-1]["content"]
    a = tok.encode(anchor)
    for ids in group:
      draft = tok.decode(cut_at_stop(ids, tok.stop_ids))
      ctx = encode_chat(b, _with_last_user(
          msgs, template.format(prompt=last, draft=draft)))
      rows.append(ctx + a)
      n.append(len(a))
  return finish_rows(rows, n, tok.pad_id, pad_multiple)


def answer_token_ids(tok, word: str) -> tuple[int, ...]:
  """Ids of the single-token encodings of `word` and " " + `word`.

  The judge's p("Yes") sums over these variants (logsumexp), so it does not
  matter whether the model puts a space before its answer.
  """
  ids = []
  for text in (word, " " + word):
    enc = tok.encode(text)
    if len(enc) == 1 and enc[0] not in ids:
      ids.append(int(enc[0]))
  if not ids:
    raise ValueError(f"{word!r} is not a single token in this vocabulary")
  return tuple(ids)
