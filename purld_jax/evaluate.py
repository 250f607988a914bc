"""Held-out evaluation: greedy answers, verified accuracy, bootstrap intervals.

The main job evaluates three models on the held-out prompts (`data.eval_path`)
with the same greedy decoding: the initial student ("before"), the SFT
reference (stage 1) and the PU-RL result (stage 2). A prompt with a
reference `answer` is scored by `verify` (the last number of the answer text
equals the reference; exact, no partial credit), or with `verifier="math"` by
`verifiers.verify_math` (math-verify equivalence); the table gives each
model's accuracy with a 95 % percentile-bootstrap interval over prompts, and
each model's gain over the reference with a *paired* bootstrap interval (the
same resampled prompts for both models), so the spread of a small eval set
is in plain view. Per-prompt answers are written beside the summary so any
number can be checked by hand.

Evaluation never truncates silently: a model with fewer than `MIN_ENDED`
(95 %) of its answers ended by a stop token within `eval.max_new_tokens`
is scored on cut-off answers, so `summarize` prints a warning on stderr
naming the model, the share and the fix (raise `eval.max_new_tokens`), and
records it in the row (`truncation_warning`, in summary.json); the table
marks its "ended" share with "!" and repeats the warning under it.

Host-side orchestration around one jitted function (`sampling.sample` with
temperature 0 and K = 1, or the caller's sharded version of it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from purld_jax import data as data_lib
from purld_jax import sampling as sampling_lib

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
# Smallest share of held-out answers that must end (stop token reached
# before `eval.max_new_tokens`); below it the evaluation warns loudly.
MIN_ENDED = 0.95


# ----------------------------------------------------------------------------
# Verifiers


def last_number(text: str) -> str | None:
  """The last integer or decimal in `text` (thousands commas dropped, a
  trailing ".0" kept as written), or None."""
  found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
  return found[-1].replace(",", "") if found else None


def verify(text: str, answer: str | None) -> float:
  """1.0 when the last number in `text` equals the reference `answer`
  (compared as written, after stripping), else 0.0; 0.0 without one."""
  return float(answer is not None and last_number(text) == str(answer).strip())


def batch_verifier(answers: Sequence[str | None], *, kind: str = "last_number"
                   ) -> Callable[[int, str], float]:
  """verifier(b, text) -> `fn(text, answers[b])` (the oracle scheme's
  signature); `fn` is `verify` for kind "last_number", `verifiers.verify_math`
  (the math-verify package) for kind "math" (`verifiers.KINDS`)."""
  if kind == "last_number":
    return lambda b, text: verify(text, answers[b])
  from purld_jax import verifiers  # pylint: disable=g-import-not-at-top
  fn = verifiers.get(kind)
  return lambda b, text: fn(text, answers[b])


# ----------------------------------------------------------------------------
# Statistics (numpy, host)


def bootstrap_ci(values: np.ndarray, *, samples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
  """Percentile-bootstrap interval of the mean of `values` f[N] (prompts
  resampled with replacement)."""
  values = np.asarray(values, np.float64)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(values), size=(samples, len(values)))
  means = values[idx].mean(axis=1)
  tail = (1.0 - level) / 2 * 100
  lo, hi = np.percentile(means, [tail, 100 - tail])
  return float(lo), float(hi)


def bootstrap_stat_ci(statistic: Callable[..., float], *arrays: np.ndarray,
                      samples: int = 2000, seed: int = 0, level: float = 0.95
                      ) -> tuple[float, float]:
  """Percentile-bootstrap interval of `statistic(*arrays)` over rows: each
  array's leading axis (N, the same for all) is resampled with the same
  indices (pairs stay pairs). With `statistic=np.mean` and one array it is
  `bootstrap_ci` (the same draws for the same seed)."""
  arrays = [np.asarray(a) for a in arrays]
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f"arrays of different lengths {[len(a) for a in arrays]}")
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(samples, n))
  stats = np.array([statistic(*(a[i] for a in arrays)) for i in idx],
                   np.float64)
  tail = (1.0 - level) / 2 * 100
  lo, hi = np.percentile(stats, [tail, 100 - tail])
  return float(lo), float(hi)


def paired_ci(a: np.ndarray, b: np.ndarray, **kwargs) -> tuple[float, float]:
  """Bootstrap interval of mean(b - a) over the same prompts (paired)."""
  return bootstrap_ci(np.asarray(b, np.float64) - np.asarray(a, np.float64),
                      **kwargs)


def seed_prompt_ci(values_SN: np.ndarray, *, baseline: np.ndarray | None = None,
                   samples: int = 2000, seed: int = 0, level: float = 0.95
                   ) -> tuple[float, float]:
  """Two-stage percentile-bootstrap interval of the mean of `values_SN`
  f[S, N] (S training seeds x the same N prompts), minus `baseline` when
  given: f[N] (one run, e.g. the SFT reference: a paired gain) or f[S2, N]
  (S2 seeds of another method: a paired difference of two methods).

  Each draw resamples the N prompts (one draw shared by every seed of both
  sides, so differences stay paired) and, independently, the S seeds (and
  the baseline's S2), all with replacement; the statistic is the mean over
  the drawn seeds and prompts. `bootstrap_ci` resamples prompts only, so it
  leaves out how much a result moves from one training seed to the next;
  this interval keeps both. The prompt draws are `bootstrap_ci`'s for the
  same `seed`, so with one seed a side the two intervals agree
  (`paired_ci` with a baseline). With S = 2 a seed draw is one seed twice
  (half the draws) or both, so a seed that alone is far off widens the
  interval towards it.
  """
  v = np.asarray(values_SN, np.float64)
  if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
    raise ValueError(f"values_SN must be [seeds, prompts], got {v.shape}")
  b = None if baseline is None else np.asarray(baseline, np.float64)
  if b is not None and (b.ndim not in (1, 2) or b.shape[-1] != v.shape[1]
                        or b.shape[0] < 1):
    raise ValueError(f"baseline {b.shape} does not match [seeds, "
                     f"{v.shape[1]}] or [{v.shape[1]}]")
  if b is not None and b.ndim == 1:
    v, b = v - b[None], None
  n = v.shape[1]
  idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))

  def seed_means(x, stream):
    per_seed = np.stack([row[idx].mean(axis=1) for row in x], axis=1)
    pick = np.random.default_rng([seed, stream]).integers(
        0, x.shape[0], size=(samples, x.shape[0]))
    return np.take_along_axis(per_seed, pick, axis=1).mean(axis=1)

  means = seed_means(v, 1)
  if b is not None:
    means = means - seed_means(b, 2)
  tail = (1.0 - level) / 2 * 100
  lo, hi = np.percentile(means, [tail, 100 - tail])
  return float(lo), float(hi)


# ----------------------------------------------------------------------------
# Answers: greedy, or the mean of n samples per prompt


@dataclasses.dataclass(frozen=True)
class Answers:
  """One model's answers to the held-out prompts: greedy, or n samples
  each (`model_answers`), when every per-prompt figure is a mean over them.

  Attributes:
    name: the model's label (before | sft | final).
    ids: prompt ids, file order.
    texts: decoded answers (special tokens skipped; the first sample's).
    lengths: [N] answer tokens (end of turn included; mean over samples).
    finished: [N] the answer ended with a stop token (bool; with samples,
      the share of them that ended).
    correct: f[N] `verify` (or the chosen verifier) per prompt (with
      samples, the share right: sampled pass@1; NaN where the prompt has no
      answer).
  """

  name: str
  ids: tuple[str, ...]
  texts: tuple[str, ...]
  lengths: np.ndarray
  finished: np.ndarray
  correct: np.ndarray

  def to_records(self) -> list[dict]:
    flag = bool if self.finished.dtype == bool else float
    num = int if np.issubdtype(self.lengths.dtype, np.integer) else float
    return [dict(id=i, answer=t, tokens=num(n), finished=flag(f),
                 correct=None if np.isnan(c) else float(c))
            for i, t, n, f, c in zip(self.ids, self.texts, self.lengths,
                                     self.finished, self.correct)]


def greedy_params(tok, max_new_tokens: int) -> sampling_lib.SamplingParams:
  """The evaluation's decoding: greedy, the tokenizer's stop ids."""
  return sampling_lib.SamplingParams(max_new_tokens=max_new_tokens,
                                     stop_ids=tuple(tok.stop_ids), **GREEDY)


def sampled_params(tok, max_new_tokens: int, temperature: float
                   ) -> sampling_lib.SamplingParams:
  """Sampled pass@1's decoding: plain `temperature` sampling (no top-k/p
  filter), the tokenizer's stop ids."""
  return sampling_lib.SamplingParams(
      max_new_tokens=max_new_tokens, stop_ids=tuple(tok.stop_ids),
      temperature=temperature, top_k=0, top_p=1.0, min_p=0.0)


def greedy_answers(graphdef, params, tok, source: data_lib.Encoded, *,
                   max_new_tokens: int, **kwargs) -> Answers:
  """`model_answers` with greedy decoding, one answer per prompt."""
  return model_answers(graphdef, params, tok, source,
                       sampling=greedy_params(tok, max_new_tokens), **kwargs)


def model_answers(graphdef, params, tok, source: data_lib.Encoded, *,
                  name: str, batch_size: int,
                  sampling: sampling_lib.SamplingParams, samples: int = 1,
                  buckets: Sequence[int] | None, limit: int = 0,
                  progress: Callable | None = None,
                  sampler: Callable | None = None,
                  verifier: str = "last_number", seed: int = 0) -> Answers:
  """One model's answers to (the first `limit` of) `source`, `samples` per
  prompt; with more than one, the per-prompt figures are their means.

  Batches have one shape (the last is filled and the filler dropped), so the
  sampler compiles once per prompt bucket. `sampler(params, prompt_tokens,
  prompt_mask, key, prompt_index) -> Candidates` replaces `sampling.sample`
  with `sampling` and K = `samples` (e.g. `sharded.jit_sampler` with
  those); a batch of image prompts (`source` encoded with a
  vision-language student's processor) passes its pixel_values and
  pixel_mask after prompt_index. Every row's random stream is fold_in(key(seed), prompt index), so
  two models get the same draws per prompt (a paired comparison) and the
  batch size changes nothing. `verifier` names the check of `correct`
  (`batch_verifier`'s kinds).
  """
  if sampler is None:
    def sampler(p, t, m, key, i, pixel_values=None, pixel_mask=None):
      images = {} if pixel_values is None else dict(
          pixel_values=jnp.asarray(pixel_values),
          pixel_mask=jnp.asarray(pixel_mask))
      return sampling_lib.sample(
          graphdef, p, jnp.asarray(t), jnp.asarray(m), key,
          prompt_index=jnp.asarray(i), num_candidates=samples,
          sampling=sampling, pad_id=tok.pad_id, **images)
  texts, lengths, finished, ids, answers = [], [], [], [], []
  batches = data_lib.eval_batches(source, batch_size=batch_size,
                                  buckets=buckets, limit=limit,
                                  process_index=0, process_count=1)
  for batch in (progress(batches) if progress else batches):
    images = (() if batch.pixel_values is None
              else (batch.pixel_values, batch.pixel_mask))
    cands = jax.device_get(sampler(params, batch.tokens, batch.mask,
                                   jax.random.key(seed),
                                   np.asarray(batch.index, np.int32),
                                   *images))
    for i in np.flatnonzero(batch.valid):
      n = cands.lengths[i].astype(int)
      texts.append([tok.decode(cands.tokens[i, j, :n[j]])
                    for j in range(samples)])
      lengths.append(n)
      finished.append(np.asarray(cands.finished[i], bool))
      ids.append(batch.prompts[i].id)
      answers.append(batch.prompts[i].answer)
  check = batch_verifier(answers, kind=verifier)
  correct = np.array([np.nan if a is None else np.mean([check(i, t) for t in ts])
                      for i, (ts, a) in enumerate(zip(texts, answers))],
                     np.float64)
  one = samples == 1
  lengths = np.asarray(lengths).reshape(len(ids), samples)
  finished = np.asarray(finished, bool).reshape(len(ids), samples)
  return Answers(name=name, ids=tuple(ids), texts=tuple(t[0] for t in texts),
                 lengths=lengths[:, 0] if one else lengths.mean(-1),
                 finished=finished[:, 0] if one else finished.mean(-1),
                 correct=correct)


# ----------------------------------------------------------------------------
# Summary and table


def truncation_warning(r: Answers, *, max_new_tokens: int | None = None,
                       where: str = "") -> str | None:
  """The warning for a model whose held-out answers were cut: None when at
  least `MIN_ENDED` of them ended with a stop token (or there are none).
  `max_new_tokens` is the evaluation's budget; without it the text names the
  length the unfinished answers stopped at (the budget: a cut answer is
  exactly that long). `where` (e.g. the eval folder) is named too."""
  n = len(r.ids)
  if not n:
    return None
  ended = int(round(float(np.sum(r.finished))))  # with samples: a mean
  share = float(np.mean(r.finished))
  if share >= MIN_ENDED:
    return None
  if max_new_tokens is None:
    cut = np.asarray(r.lengths)[np.asarray(r.finished, float) < 1]
    budget = f"cut at {int(cut.max())} tokens" if cut.size else "cut"
  else:
    budget = f"eval.max_new_tokens={max_new_tokens}"
  place = f" ({where})" if where else ""
  return (f"TRUNCATED EVALUATION: model {r.name!r}{place}: only {ended}/{n} "
          f"= {100 * share:.1f}% of held-out answers ended (stop token) "
          f"within the budget ({budget}), below the required "
          f"{100 * MIN_ENDED:.0f}%; its accuracy scores cut-off answers and "
          "is NOT valid. Fix: raise eval.max_new_tokens and evaluate again.")


def summarize(results: Sequence[Answers], *, baseline: str, seed: int = 0,
              max_new_tokens: int | None = None, where: str = ""
              ) -> list[dict]:
  """One row per model: accuracy, its 95 % CI, the paired gain over
  `baseline` with its CI, mean answer length and share finished. A model
  with less than `MIN_ENDED` of its answers finished gets a
  `truncation_warning` (`truncation_warning`'s text, also printed on
  stderr; `max_new_tokens` and `where` go into it)."""
  base = {r.name: r for r in results}.get(baseline)
  rows = []
  for r in results:
    scored = ~np.isnan(r.correct)
    row = dict(model=r.name, prompts=len(r.ids), scored=int(scored.sum()),
               mean_tokens=float(np.mean(r.lengths)) if len(r.ids) else 0.0,
               finished=float(np.mean(r.finished)) if len(r.ids) else 0.0)
    warning = truncation_warning(r, max_new_tokens=max_new_tokens, where=where)
    if warning:
      row.update(truncation_warning=warning)
      print(f"\n{'!' * 72}\nWARNING: {warning}\n{'!' * 72}\n",
            file=sys.stderr)
    if scored.any():
      acc = r.correct[scored]
      row.update(accuracy=float(acc.mean()),
                 accuracy_ci=bootstrap_ci(acc, seed=seed))
      if base is not None and r.name != baseline and base.ids == r.ids:
        both = scored & ~np.isnan(base.correct)
        row.update(gain=float((r.correct[both] - base.correct[both]).mean()),
                   gain_ci=paired_ci(base.correct[both], r.correct[both],
                                     seed=seed))
    rows.append(row)
  return rows


def format_table(rows: Sequence[dict], *, baseline: str) -> str:
  """The summary as a fixed-width text table; a truncated model's "ended"
  share is marked "!" and its warning follows the table."""
  head = (f"{'model':<8} {'prompts':>7} {'accuracy':>9} {'95% CI':>15} "
          f"{'gain vs ' + baseline:>14} {'95% CI':>17} {'tokens':>7} "
          f"{'ended':>6}")
  lines = [head, "-" * len(head)]
  warnings = []
  for r in rows:
    acc = f"{100 * r['accuracy']:.1f}%" if "accuracy" in r else "n/a"
    ci = ("[{:.1f}, {:.1f}]".format(*(100 * x for x in r["accuracy_ci"]))
          if "accuracy_ci" in r else "")
    gain = f"{100 * r['gain']:+.1f} pt" if "gain" in r else ""
    gci = ("[{:+.1f}, {:+.1f}]".format(*(100 * x for x in r["gain_ci"]))
           if "gain_ci" in r else "")
    lines.append(f"{r['model']:<8} {r['prompts']:>7} {acc:>9} {ci:>15} "
                 f"{gain:>14} {gci:>17} {r['mean_tokens']:>7.1f} "
                 f"{100 * r['finished']:>5.0f}%"
                 + ("!" if r.get("truncation_warning") else ""))
    if r.get("truncation_warning"):
      warnings.append(f"WARNING: {r['truncation_warning']}")
  return "\n".join(lines + warnings)


def verdict(rows: Sequence[dict], *, baseline: str, final: str) -> str:
  """One honest sentence on whether `final` beat `baseline`."""
  row = {r["model"]: r for r in rows}.get(final, {})
  if "gain_ci" not in row:
    return f"no verified accuracy to compare {final} with {baseline}."
  lo, hi = row["gain_ci"]
  gain = 100 * row["gain"]
  n = row["scored"]
  if lo > 0:
    return (f"{final} beats {baseline} by {gain:+.1f} points on {n} held-out "
            "prompts; the 95% paired interval excludes zero.")
  if hi < 0:
    return (f"{final} is WORSE than {baseline} by {gain:+.1f} points on {n} "
            "held-out prompts; the 95% paired interval excludes zero.")
  return (f"{final} vs {baseline}: {gain:+.1f} points on {n} held-out "
          f"prompts, NOT significant (95% paired interval "
          f"[{100 * lo:+.1f}, {100 * hi:+.1f}] contains zero).")


def write(out_dir: str, results: Sequence[Answers],
          rows: Sequence[dict] | None = None, suffix: str = "") -> None:
  """out_dir/<model><suffix>.jsonl (per-prompt answers) and, given rows,
  out_dir/summary<suffix>.json."""
  os.makedirs(out_dir, exist_ok=True)
  for r in results:
    with open(os.path.join(out_dir, f"{r.name}{suffix}.jsonl"), "w",
              encoding="utf-8") as f:
      for rec in r.to_records():
        f.write(json.dumps(rec) + "\n")
  if rows is None:
    return
  with open(os.path.join(out_dir, f"summary{suffix}.json"), "w",
            encoding="utf-8") as f:
    json.dump(list(rows), f, indent=2)


def read_answers(path: str, name: str) -> Answers:
  """An `Answers` back from `write`'s <model>.jsonl."""
  with open(path, encoding="utf-8") as f:
    recs = [json.loads(line) for line in f if line.strip()]
  return Answers(
      name=name, ids=tuple(r["id"] for r in recs),
      texts=tuple(r["answer"] for r in recs),
      lengths=np.array([r["tokens"] for r in recs]),
      finished=np.array([r["finished"] for r in recs],
                        bool if all(isinstance(r["finished"], bool)
                                    for r in recs) else np.float64),
      correct=np.array([np.nan if r["correct"] is None else r["correct"]
                        for r in recs], np.float64))
