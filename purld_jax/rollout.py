"""One PU-RL iteration's data: METHOD.md steps 2 to 5 for a batch of prompts.

  group = rollout.collect(graphdef, policy_params, scorer_params, tok, batch,
                          anchors, key, k=K, sampling=..., ranking=...)

Steps: sample K candidates per prompt with the policy snapshot (jitted,
KV-cached); score them against the anchor with the scorer (policy snapshot or
reference, `ranking.scheme`), the anchor itself scored too (s_a); the
preferences (pairs or a label distribution) are then pure functions of
`group.scores` and `group.anchor_score` (preferences.py), built by each
trainer.

Members: the K candidates are members 0..K-1 and the anchor, written as the
assistant turn the chat template would give it, is member K. All members are
right-padded to one length T (the longer of max_new_tokens and the anchor
cap), so a trainer can score any of them against the prompt in one call
(`scoring.response_logps`).

Everything here is host-side orchestration of jitted pieces; the arrays
returned are numpy.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from purld_jax import ranking
from purld_jax import templates
from purld_jax import sampling as sampling_lib
from purld_jax import self_scoring
from purld_jax import vision
from purld_jax.models import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class RankingParams:
  """`config.ranking` as plain values (see `self_scoring.score_group`)."""

  scheme: str = "judge"
  template: str | None = None
  yes_word: str = "Yes"
  no_word: str = "No"
  aggregation: str = "bradley_terry"
  bt_iters: int = 100
  bt_prior: float = 0.1
  metric: str = "rouge_l"
  pmi_stop: bool = False
  pair_opponents: int = 0
  length_debias: bool = False
  gate: str = "none"
  gate_margin: float = 1.0
  rows_per_call: int = 64
  pad_multiple: int = 16
  vocab_chunk: int | None = None


# RankingParams.scheme of a run whose loss reads no score (pu.mode "nnpu"):
# `collect` samples and packs the group but ranks nothing (scores all 0).
UNRANKED = "none"


@dataclasses.dataclass(frozen=True)
class Group:
  """B prompts with K candidates, the anchor, and the self-ranking scores.

  Attributes:
    prompt_tokens: i32[B, P] left-padded; prompt_mask: bool[B, P].
    members: i32[B, K+1, T] candidates then the anchor, right-padded.
    member_mask: bool[B, K+1, T] real response tokens (stop token included).
    old_logps: f32[B, K, T] the sampling policy's log-probs of the candidates
      (temperature 1, unfiltered): PPO's old policy, for free.
    finished: bool[B, K] the candidate ended with a stop token.
    scores: f32[B, K] self-ranking scores s_k (after `ranking.length_debias`
      and `ranking.gate`, when on).
    anchor_score: f32[B] the anchor's own score s_a.
    valid: bool[B] False on filler rows.
    texts: B lists of K decoded candidates (logs, rollout store).
    pixel_values: None, or f32[B, I, 3, Y, X] the prompts' images (a
      vision-language student, `data.PromptBatch`); the trainers' scorer
      runs them with the prompts (`scoring.response_logps`).
    pixel_mask: None, or bool[B, I, Y, X].
    timings: seconds per phase: sample_s, score_s.
    stats: host-side figures of the step for the logs (length_slope: the
      slope `ranking.length_debias` removed; gated: the share of the valid
      prompts' candidates that failed `ranking.gate`; each when on).
  """

  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  members: np.ndarray
  member_mask: np.ndarray
  old_logps: np.ndarray
  finished: np.ndarray
  scores: np.ndarray
  anchor_score: np.ndarray
  valid: np.ndarray
  texts: list
  timings: dict
  stats: dict = dataclasses.field(default_factory=dict)
  pixel_values: np.ndarray | None = None
  pixel_mask: np.ndarray | None = None

  def images(self) -> dict:
    """{pixel_values, pixel_mask} for a trainer's batch; {} without images."""
    if self.pixel_values is None:
      return {}
    return dict(pixel_values=self.pixel_values, pixel_mask=self.pixel_mask)

  @property
  def k(self) -> int:
    return self.old_logps.shape[1]


def anchor_members(tok: tokenizer_lib.Tokenizer, messages_list, anchors,
                   *, max_len: int) -> list[list[int]]:
  """Each anchor as the assistant turn after its prompt (end of turn kept)."""
  from purld_jax.train import sft  # the one definition of a response's ids
  return [sft.response_ids(tok, m, a, max_len=max_len)
          for m, a in zip(messages_list, anchors)]


def pack_members(cand_tokens: np.ndarray, cand_mask: np.ndarray,
                 anchor_ids: Sequence[Sequence[int]], *, pad_id: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Candidates [B, K, Tc] plus anchors -> members [B, K+1, T], mask.

  T = max(Tc, longest anchor).
  """
  b, k, tc = cand_tokens.shape
  t = max(tc, max((len(a) for a in anchor_ids), default=0))
  members = np.full((b, k + 1, t), pad_id, np.int32)
  mask = np.zeros((b, k + 1, t), bool)
  members[:, :k, :tc] = np.where(cand_mask, cand_tokens, pad_id)
  mask[:, :k, :tc] = cand_mask
  for i, a in enumerate(anchor_ids):
    members[i, k, :len(a)] = a
    mask[i, k, :len(a)] = True
  return members, mask


def default_sampler(graphdef, *, k: int, sampling: sampling_lib.SamplingParams,
                    pad_id: int) -> Callable:
  """sampler(params, prompt_tokens, prompt_mask, key, prompt_index[,
  pixel_values, pixel_mask]) -> Candidates: `sampling.sample` on one device
  (what `collect` uses unless given a sharded one, `sharded.jit_sampler`,
  with the same arguments; the pixels follow for image prompts)."""
  def sample(params, prompt_tokens, prompt_mask, key, prompt_index,
             pixel_values=None, pixel_mask=None):
    images = {}
    if pixel_values is not None:
      images = dict(pixel_values=jnp.asarray(pixel_values),
                    pixel_mask=jnp.asarray(pixel_mask))
    return sampling_lib.sample(
        graphdef, params, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask),
        key, prompt_index=jnp.asarray(prompt_index, jnp.int32),
        num_candidates=k, sampling=sampling, pad_id=pad_id, **images)
  return sample


def with_stop_ids(sampling: sampling_lib.SamplingParams, tok
                  ) -> sampling_lib.SamplingParams:
  """`sampling` with the tokenizer's stop ids when it names none."""
  if sampling.stop_ids:
    return sampling
  return dataclasses.replace(sampling, stop_ids=tuple(tok.stop_ids))


def collect(graphdef, policy_params, scorer_params, tok, batch, anchors,
            key, *, k: int, sampling: sampling_lib.SamplingParams,
            ranking_params: RankingParams, max_anchor_len: int,
            verifier: Callable[[int, str], float] | None = None,
            sampler: Callable | None = None,
            scorers: self_scoring.Scorers | None = None,
            judge: Callable | None = None, processor=None) -> Group:
  """Samples, then self-ranks, one batch of prompts (see module docstring).

  Args:
    graphdef: the student's graphdef.
    policy_params: the sampling snapshot (pi_old).
    scorer_params: params of the self-ranking scorer (policy or reference).
    tok: the student's tokenizer.
    batch: a `data.PromptBatch` (B prompts, left-padded tokens, index).
    anchors: B anchor texts (from the ledger).
    key: this iteration's key.
    k: K candidates per prompt.
    sampling: the sampling rule (its stop ids default to the tokenizer's).
    ranking_params: the self-ranking scheme and its knobs.
    max_anchor_len: anchor tokens kept as member K.
    verifier: oracle scheme's verifier(b, text) -> reward.
    sampler: sampler(params, prompt_tokens, prompt_mask, key, prompt_index)
      -> Candidates (host or device arrays); default `default_sampler` (then
      `k`, `sampling` and the pad id are its arguments).
    scorers: the scorer's log-prob functions (`self_scoring.Scorers`,
      params bound); default `self_scoring.model_scorers` of
      `scorer_params`.
    judge: scheme "teacher_judge" only: judge(prompts, texts, valid) ->
      (scores [B, K], anchor_score [B]) on the host, texts the decoded
      candidates cut at their stop id (`teacher_judge.TeacherJudge`).
    processor: a vision-language student's processor: image prompts
      ranked by a scheme of ranking.ROW_SCHEMES rebuild their rows with it
      (`vision.PromptImages`).
  """
  sampling = with_stop_ids(sampling, tok)
  if sampler is None:
    sampler = default_sampler(graphdef, k=k, sampling=sampling,
                              pad_id=tok.pad_id)
  pixels = getattr(batch, "pixel_values", None)
  images = () if pixels is None else (pixels, batch.pixel_mask)
  if images and ranking_params.scheme not in (*ranking.IMAGE_SCHEMES,
                                              UNRANKED):
    raise ValueError(
        f"ranking.scheme {ranking_params.scheme!r} does not show the "
        "prompt's images to the scorer; with image prompts use one of "
        f"{', '.join(ranking.IMAGE_SCHEMES)}")
  prompt_images = None
  if images and ranking_params.scheme in ranking.ROW_SCHEMES:
    if processor is None:
      raise ValueError(f"ranking.scheme {ranking_params.scheme!r} on image "
                       "prompts needs the student's processor")
    prompt_images = vision.PromptImages(processor, batch.prompts, *images)
  t0 = time.perf_counter()
  cands = jax.device_get(sampler(policy_params, np.asarray(batch.tokens),
                                 np.asarray(batch.mask), key,
                                 np.asarray(batch.index, np.int32), *images))
  t1 = time.perf_counter()
  messages = [p.as_dicts() for p in batch.prompts]
  lists = [[list(cands.tokens[i, j, :cands.lengths[i, j]]) for j in range(k)]
           for i in range(len(messages))]
  rp = ranking_params
  # Candidates as text, cut at their stop id: what the teacher judge and the
  # answer gate read (decoded once, only when one of them is on).
  cut_texts = ([[tok.decode(templates.cut_at_stop(ids, tok.stop_ids))
                 for ids in g] for g in lists]
               if rp.scheme == "teacher_judge" or rp.gate != "none" else None)
  if scorers is None:
    scorers = self_scoring.model_scorers(
        nnx.merge(graphdef, scorer_params), vocab_chunk=rp.vocab_chunk)
  if rp.scheme == UNRANKED:  # pu.mode nnpu: the loss reads no score
    scores = np.zeros((len(messages), k), np.float32)
    s_a = np.zeros((len(messages),), np.float32)
  elif rp.scheme == "teacher_judge":
    if judge is None:
      raise ValueError("ranking.scheme 'teacher_judge' needs a judge")
    scores, s_a = judge(batch.prompts, cut_texts, np.asarray(batch.valid))
  else:
    scores, s_a = self_scoring.score_group(
        None, tok, messages, list(anchors), lists, scheme=rp.scheme,
        template=rp.template or None, score_anchor=True,
        yes_word=rp.yes_word, no_word=rp.no_word, aggregation=rp.aggregation,
        bt_iters=rp.bt_iters, bt_prior=rp.bt_prior, metric=rp.metric,
        verifier=verifier, pmi_stop=rp.pmi_stop,
        pair_opponents=rp.pair_opponents, rows_per_call=rp.rows_per_call,
        vocab_chunk=rp.vocab_chunk, pad_multiple=rp.pad_multiple,
        scorers=scorers, images=prompt_images)
  stats = {}
  if rp.length_debias:
    scores, s_a, stats["length_slope"] = ranking.length_debias(
        scores, sampling_lib.tokens_before_stop(cands.lengths, cands.finished),
        np.asarray(batch.valid), anchor_score=s_a,
        anchor_length=[len(tok.encode(a)) for a in anchors])
  if rp.gate != "none":
    passed = ranking.gate_passes(cut_texts, list(anchors), gate=rp.gate)
    valid = np.asarray(batch.valid, bool)
    scores = ranking.answer_gate(scores, passed, s_a, valid,
                                 margin=rp.gate_margin)
    stats["gated"] = float(1.0 - passed[valid].mean()) if valid.any() else 0.0
  t2 = time.perf_counter()
  anchor_ids = anchor_members(tok, messages, anchors, max_len=max_anchor_len)
  members, member_mask = pack_members(np.asarray(cands.tokens),
                                      np.asarray(cands.mask), anchor_ids,
                                      pad_id=tok.pad_id)
  t = members.shape[-1]
  old = np.zeros((len(messages), k, t), np.float32)
  old[:, :, :cands.logps.shape[-1]] = cands.logps
  texts = [[tok.decode(ids) for ids in g] for g in lists]
  return Group(prompt_tokens=np.asarray(batch.tokens),
               prompt_mask=np.asarray(batch.mask), members=members,
               member_mask=member_mask, old_logps=old,
               finished=np.asarray(cands.finished),
               scores=np.asarray(scores, np.float32),
               anchor_score=np.asarray(s_a, np.float32),
               valid=np.asarray(batch.valid), texts=texts,
               timings=dict(sample_s=t1 - t0, score_s=t2 - t1), stats=stats,
               pixel_values=pixels,
               pixel_mask=None if pixels is None else batch.pixel_mask)


def select(signal: np.ndarray, size: int, seed: int) -> np.ndarray:
  """i32[size] the rows to train on out of N drawn (`rl.oversample`): those
  with `signal` (bool[N]) first, a random `size` of them if more; then
  signal-less rows to fill the batch, also at random. Sorted, so the kept
  rows keep their drawn order. Deterministic in `seed` (resume replays it).
  """
  signal = np.asarray(signal, bool)
  if size > signal.shape[0]:
    raise ValueError(f"select: {size} rows asked of {signal.shape[0]}")
  order = np.random.default_rng(seed).permutation(signal.shape[0])
  ranked = order[np.argsort(~signal[order], kind="stable")]  # signal first
  return np.sort(ranked[:size]).astype(np.int32)


def take(group: Group, rows: np.ndarray) -> Group:
  """`group` restricted to `rows` (its B axis); timings and stats kept."""
  rows = np.asarray(rows)
  cut = {f.name: getattr(group, f.name)[rows]
         for f in dataclasses.fields(group)
         if isinstance(getattr(group, f.name), np.ndarray)}
  return dataclasses.replace(group, **cut,
                             texts=[group.texts[i] for i in rows])
