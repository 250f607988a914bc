"""Self-ranking scores of a batch of groups: the host-side driver
(METHOD.md steps 3 and 4).

`score_group` builds a scheme's scoring rows (`templates`), runs the scorer
model over them a chunk of rows at a time (each group's shared prefix run
once: `share_prefixes`, `scoring.response_logps`) and turns the log-probs
into f32[B, K] scores with the scheme's pure function in `ranking`.

The scorer is whichever model the caller passes to `score_group`: the
policy snapshot that sampled the candidates, or the reference
(`nnx.merge(graphdef, ref_params)`): `ranking.scorer` in the config. The
model is reached only through four log-prob functions (`Scorers`): by
default `scoring.jitted_*` on the model (`model_scorers`); a trainer under a
mesh passes its own, jitted with shardings (`sharded.jit_scorers`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from purld_jax import ranking
from purld_jax import scoring
from purld_jax import templates
from purld_jax.models import tokenizer as tok_lib


@dataclasses.dataclass(frozen=True)
class Scorers:
  """The scorer model's log-prob functions over host arrays (outputs are
  anything `np.asarray` takes).

  Attributes:
    token_logps: (tokens i32[R, T], mask bool[R, T]) -> f32[R, T]
      (`scoring.token_logps`).
    last_logps: (tokens, mask) -> f32[R, V] (`scoring.last_logps`).
    response_logps: (prefix i32[G, P], prefix_mask, suffix i32[G, M, S],
      suffix_mask[, pixel_values, pixel_mask]) -> f32[G, M, S]
      (`scoring.response_logps`; the pixels, [G, I, ...], are the images
      of the prefixes' image tokens).
    response_next_logps: same arguments (the pixels too) -> f32[G, M, V]
      (`scoring.response_next_logps`).
  """
  token_logps: Callable
  last_logps: Callable
  response_logps: Callable
  response_next_logps: Callable


def model_scorers(model, *, vocab_chunk: int | None = None) -> Scorers:
  """`Scorers` of a model object, via `scoring.jitted_*` (one device)."""
  return Scorers(
      token_logps=functools.partial(scoring.jitted_token_logps, model,
                                    vocab_chunk=vocab_chunk),
      last_logps=functools.partial(scoring.jitted_last_logps, model),
      response_logps=lambda pt, pm, r, rm, pv=None, pxm=None: (
          scoring.jitted_response_logps(model, pt, pm, r, rm,
                                        vocab_chunk=vocab_chunk,
                                        pixel_values=pv, pixel_mask=pxm)),
      response_next_logps=lambda pt, pm, r, rm, pv=None, pxm=None: (
          scoring.jitted_response_next_logps(model, pt, pm, r, rm, pv,
                                             pxm)))


# ----------------------------------------------------------------------------
# chunked model calls over the rows of one group batch


def _rows_in_chunks(fn, arrays, rows_per_call: int) -> np.ndarray:
  """fn(*row_chunk) over chunks of min(rows_per_call, R) rows; the last
  chunk is padded by repeating its last row, so every call has the same
  shape."""
  r = arrays[0].shape[0]
  rows_per_call = min(rows_per_call, r)
  n = -(-r // rows_per_call) * rows_per_call
  idx = np.minimum(np.arange(n), r - 1)
  outs = [np.asarray(fn(*(jnp.asarray(x[idx[s:s + rows_per_call]])
                          for x in arrays)))
          for s in range(0, n, rows_per_call)]
  return np.concatenate(outs, axis=0)[:r]


@dataclasses.dataclass(frozen=True)
class SharedRows:
  """A `templates.ScoringBatch` of G groups of M rows as (shared prefix,
  suffixes).

  The rows of one group (one prompt's candidates) agree on a long head (the
  chat template, the prompt, the anchor): it is run once per group and the
  M suffixes attend to its keys and values (`scoring.response_logps`).

  Attributes:
    prefix: i32[G, P] left-padded; prefix_mask: bool[G, P].
    suffix: i32[G, M, S] right-padded; suffix_mask: bool[G, M, S].
  """
  prefix: np.ndarray
  prefix_mask: np.ndarray
  suffix: np.ndarray
  suffix_mask: np.ndarray


def share_prefixes(batch: templates.ScoringBatch, m: int, *, pad_id: int,
                   pad_multiple: int) -> SharedRows | None:
  """Splits each group of `m` consecutive rows at their longest common
  prefix, kept short enough that every suffix holds its targets and at
  least one token; None when some group would have an empty prefix."""
  r = batch.tokens.shape[0]
  rows = [batch.tokens[i][batch.attention_mask[i]].tolist() for i in range(r)]
  n_target = batch.target_mask.sum(-1)
  heads, tails = [], []
  for g in range(r // m):
    group = rows[g * m:(g + 1) * m]
    first = group[0]
    n = min(len(x) - max(int(n_target[g * m + j]), 1)
            for j, x in enumerate(group))
    lcp = 0
    while lcp < n and all(x[lcp] == first[lcp] for x in group):
      lcp += 1
    if lcp == 0:
      return None
    heads.append(first[:lcp])
    tails.extend(x[lcp:] for x in group)
  round_up = lambda x: -(-x // pad_multiple) * pad_multiple
  prefix, prefix_mask = tok_lib.pad_left(
      heads, pad_id, round_up(max(len(h) for h in heads)))
  s = round_up(max(len(t) for t in tails))
  suffix = np.full((r, s), pad_id, np.int32)
  suffix_mask = np.zeros((r, s), bool)
  for i, t in enumerate(tails):
    suffix[i, :len(t)] = t
    suffix_mask[i, :len(t)] = True
  return SharedRows(prefix, prefix_mask, suffix.reshape(r // m, m, s),
                    suffix_mask.reshape(r // m, m, s))


def _groups_in_chunks(fn, shared: SharedRows, rows_per_call: int):
  """fn(prefix, prefix_mask, suffix, suffix_mask) over chunks of
  max(1, rows_per_call // M) groups (the last padded by repeating its last
  group), concatenated over groups."""
  m = shared.suffix.shape[1]
  return _rows_in_chunks(
      fn, (shared.prefix, shared.prefix_mask, shared.suffix,
           shared.suffix_mask), max(1, rows_per_call // m))


def _image_prefixes(batch, m, images, pad_id, pad_multiple):
  """(SharedRows, pixel_values, pixel_mask) of rows of image prompts (m
  rows a prompt): the prompt's image tokens must all be in the prefix
  (the images are merged in the prefill). Each prompt's rows share a
  prefix when that holds; else each row is its own group, its prefix all
  of its context (the targets come after the image tokens)."""
  b = batch.tokens.shape[0] // m
  need = [images.image_tokens(g) for g in range(b)]
  for per in (m, 1):
    shared = share_prefixes(batch, per, pad_id=pad_id,
                            pad_multiple=pad_multiple)
    if shared is None:
      continue
    got = ((shared.prefix == images.image_token_id)
           & shared.prefix_mask).sum(-1)
    if all(got[g] == need[g * per // m] for g in range(len(got))):
      rep = m // per
      return (shared, np.repeat(images.pixel_values, rep, 0),
              np.repeat(images.pixel_mask, rep, 0))
  raise ValueError("a scoring row's context holds more <image> tokens than "
                   "its prompt's images (an anchor or template with a "
                   "literal <image>?)")


def _with_pixels(fn, batch, m, images, rows_per_call, pad_id, pad_multiple):
  """(SharedRows, fn(prefix, prefix_mask, suffix, suffix_mask, pixel_values,
  pixel_mask) [G, M', ...]) over rows of image prompts (`_image_prefixes`),
  in chunks of groups."""
  shared, pv, pm = _image_prefixes(batch, m, images, pad_id, pad_multiple)
  per = shared.suffix.shape[1]
  return shared, _rows_in_chunks(
      fn, (shared.prefix, shared.prefix_mask, shared.suffix,
           shared.suffix_mask, pv, pm), max(1, rows_per_call // per))


def _token_logps(scorers: Scorers, batch: templates.ScoringBatch, m: int,
                 rows_per_call, pad_id: int, pad_multiple: int, images=None):
  """f32[R, T] `scoring.token_logps` of the rows where targets are (0 on the
  shared prefix, never a target), each group's prefix run once. With
  `images` (`vision.PromptImages`, rows of image prompts) the prefixes
  hold the images' tokens and are run with their pixels."""
  if images is not None:
    shared, lp = _with_pixels(scorers.response_logps, batch, m, images,
                              rows_per_call, pad_id, pad_multiple)
  else:
    shared = share_prefixes(batch, m, pad_id=pad_id,
                            pad_multiple=pad_multiple)
    if shared is None:
      return _rows_in_chunks(scorers.token_logps,
                             (batch.tokens, batch.attention_mask),
                             rows_per_call)
    lp = _groups_in_chunks(scorers.response_logps, shared,
                           rows_per_call)  # [G, M, S]
  r, t = batch.tokens.shape
  lp = lp.reshape(r, -1)
  n = shared.suffix_mask.reshape(r, -1).sum(-1)
  out = np.zeros((r, t), np.float32)
  for i in range(r):  # a suffix is the last n[i] columns of its left-padded row
    out[i, t - n[i]:] = lp[i, :n[i]]
  return out


def _answer_logps(scorers: Scorers, batch: templates.ScoringBatch, m: int,
                  rows_per_call, pad_id: int, pad_multiple: int, images=None):
  """f32[R, V] log p(next token) after each row, each group's prefix run
  once (with `images`: its pixels too, as `_token_logps`)."""
  if images is not None:
    _, lp = _with_pixels(scorers.response_next_logps, batch, m, images,
                         rows_per_call, pad_id, pad_multiple)
    return lp.reshape(batch.tokens.shape[0], -1)
  shared = share_prefixes(batch, m, pad_id=pad_id, pad_multiple=pad_multiple)
  if shared is None:
    return _rows_in_chunks(scorers.last_logps,
                           (batch.tokens, batch.attention_mask), rows_per_call)
  lp = _groups_in_chunks(scorers.response_next_logps, shared,
                         rows_per_call)  # [G, M, V]
  return lp.reshape(batch.tokens.shape[0], -1)


def _right_pad(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  t = max(1, max(len(s) for s in seqs))
  tokens = np.zeros((len(seqs), t), np.int32)
  mask = np.zeros((len(seqs), t), bool)
  for r, s in enumerate(seqs):
    tokens[r, :len(s)] = s
    mask[r, :len(s)] = True
  return tokens, mask


def score_group(model, tok, prompts: Sequence[Sequence[dict]],
                anchors: Sequence[str],
                candidates: Sequence[Sequence[Sequence[int]]], *,
                scheme: str = "judge", template: str | None = None,
                score_anchor: bool = True, yes_word: str = "Yes",
                no_word: str = "No", aggregation: str = "bradley_terry",
                bt_iters: int = 100, bt_prior: float = 0.1,
                metric: str = "rouge_l",
                verifier: Callable[[int, str], float] | None = None,
                pmi_stop: bool = False, pair_opponents: int = 0,
                rows_per_call: int = 64,
                vocab_chunk: int | None = None, pad_multiple: int = 16,
                scorers: Scorers | None = None, images=None):
  """Self-ranking scores of a batch of groups (METHOD.md steps 3 and 4).

  Args:
    model: the scorer, a `models.llama.Llama` (the policy snapshot or the
      reference: the caller decides by which params it merges); None when
      `scorers` is given.
    tok: `models.tokenizer.Tokenizer`.
    prompts: B prompt conversations.
    anchors: B anchor texts.
    candidates: B lists of K token-id lists (cut at the first stop id).
    scheme: one of ranking.SCHEMES (`ranking.scheme`).
    template: the scheme's template; default its *_TEMPLATE constant.
    score_anchor: also score the anchor as a member, s_a = S(x, a, a), for
      PU calibration (`pu.*`); it is appended as member K.
    yes_word, no_word: the judge's answers (judge, self_reward,
      pairwise_judge).
    aggregation, bt_iters, bt_prior: `ranking.pairwise_judge` knobs.
    pair_opponents: `ranking.pairwise_judge`: 0 judges every pair of the
      K (+ anchor) members, (M (M - 1) rows per prompt for M members); an
      even number judges each member against that many others
      (`templates.pair_design`, M * pair_opponents rows).
    metric: `ranking.similarity` metric.
    verifier: `ranking.oracle` callback verifier(b, text) -> reward.
    pmi_stop: `pmi` also scores the stop token that ended a candidate (and
      an end of turn after the anchor), so stopping is a token like any
      other: an empty candidate scores log pi(stop | x, a) - log pi(stop |
      x), not 0. Off: METHOD.md's mean over the response tokens only.
    rows_per_call: most rows per model call (memory knob; every call of
      one `score_group` has the same row count, so a fixed (B, K) compiles
      once per row length).
    vocab_chunk: `scoring.token_logps` knob.
    pad_multiple: row lengths are rounded up to a multiple of this.
    scorers: the model's log-prob functions; default
      `model_scorers(model, vocab_chunk=vocab_chunk)`.
    images: None, or the prompts' images (`vision.PromptImages`, a
      vision-language scorer): the rows of schemes in
      ranking.IMAGE_SCHEMES keep each prompt's images in front of its
      rewritten user turn (judge rows: in front of the prompt's text in
      the template) and are scored with its pixels; other model-row
      schemes are refused.

  Returns:
    (scores np.float32[B, K], anchor_score np.float32[B] or None).
  """
  if scheme not in ranking.SCHEMES:
    raise ValueError(f"scheme {scheme!r} not in {ranking.SCHEMES}")
  if scheme == "teacher_judge":  # the teacher scores: not a self-ranking
    raise ValueError("scheme 'teacher_judge' is scored by the teacher "
                     "(teacher_judge.TeacherJudge via rollout.collect(judge=))")
  if images is not None and scheme not in ranking.IMAGE_SCHEMES:
    raise ValueError(f"ranking.scheme {scheme!r} is not implemented for "
                     "image prompts (its rows would drop the images); use "
                     f"one of {', '.join(ranking.IMAGE_SCHEMES)}")
  b = len(candidates)
  k = len(candidates[0])
  groups = [[templates.cut_at_stop(y, tok.stop_ids) for y in g]
            for g in candidates]
  if score_anchor:
    groups = [g + [tok.encode(a)] for g, a in zip(groups, anchors)]
  m = k + 1 if score_anchor else k
  pad = dict(pad_multiple=pad_multiple)
  run = dict(rows_per_call=rows_per_call, pad_id=tok.pad_id,
             pad_multiple=pad_multiple)
  if images is not None:  # rows rebuilt with the prompts' images
    pad["encode_chat"] = lambda i, msgs, at=0: images.encode_chat(
        tok, i, msgs, at)
    run["images"] = images
  if scorers is None and scheme not in ("similarity", "oracle"):
    scorers = model_scorers(model, vocab_chunk=vocab_chunk)

  if scheme in ranking.ANSWER_WORD_SCHEMES:
    yes = templates.answer_token_ids(tok, yes_word)
    no = templates.answer_token_ids(tok, no_word)
    if scheme == "pairwise_judge":
      design = templates.pair_design(m, pair_opponents)
      rows = int(design.sum())
      batch = templates.pairwise_batch(
          tok, prompts, anchors, groups, opponents=pair_opponents,
          template=template or templates.PAIRWISE_TEMPLATE, **pad)
      logps = _answer_logps(scorers, batch, rows, **run)
      l = ranking.judge(jnp.asarray(logps).reshape(b, rows, -1),
                        yes_ids=yes, no_ids=no)
      s = ranking.pairwise_judge(
          ranking.pair_matrix(l, m, pair_opponents),
          aggregation=aggregation, iters=bt_iters, bt_prior=bt_prior,
          pair_mask=jnp.asarray(design))
    else:
      default = (templates.JUDGE_TEMPLATE if scheme == "judge"
                 else templates.SELF_REWARD_TEMPLATE)
      batch = templates.judge_batch(tok, prompts, anchors, groups,
                                    template=template or default, **pad)
      logps = _answer_logps(scorers, batch, m, **run)
      s = ranking.judge(jnp.asarray(logps).reshape(b, m, -1), yes_ids=yes,
                        no_ids=no)
  elif scheme == "pmi":
    if pmi_stop:  # candidates uncut (pmi_batches keeps each one's stop)
      groups = [list(g) + ([tok.encode(a) + [tok.stop_ids[0]]]
                           if score_anchor else [])
                for g, a in zip(candidates, anchors)]
    with_a, plain = templates.pmi_batches(
        tok, prompts, anchors, groups,
        template=template or templates.PMI_TEMPLATE, keep_stop=pmi_stop,
        **pad)
    lw = _token_logps(scorers, with_a, m, **run)
    lo = _token_logps(scorers, plain, m, **run)
    s = ranking.pmi(lw.reshape(b, m, -1), lo.reshape(b, m, -1),
                    with_a.target_mask.reshape(b, m, -1))
  elif scheme == "anchor_recon":
    batch = templates.recon_batch(
        tok, prompts, anchors, groups,
        template=template or templates.RECON_TEMPLATE, **pad)
    lp = _token_logps(scorers, batch, m, **run)
    s = ranking.anchor_recon(lp.reshape(b, m, -1),
                             batch.target_mask.reshape(b, m, -1))
  elif scheme == "similarity":
    y, ym = _right_pad([ids for g in groups for ids in g])
    a, am = _right_pad([tok.encode(x) for x in anchors])
    s = ranking.similarity(y.reshape(b, m, -1), ym.reshape(b, m, -1), a,
                           am, metric=metric)
  else:
    if verifier is None:
      raise ValueError("scheme 'oracle' needs a verifier")
    s = ranking.oracle([[tok.decode(ids) for ids in g] for g in groups],
                       verifier)
  s = np.asarray(s, np.float32)
  return s[:, :k], (s[:, k] if score_anchor else None)
