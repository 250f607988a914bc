"""Teacher-as-judge (RLAIF), a baseline of METHOD.md: the TEACHER scores each
of the K candidates of a prompt, K teacher calls per prompt (the costly
reference against which PU-RLD's one anchor per prompt is measured).

  judge = TeacherJudge(workdir, teacher)            # teacher_lib.make(...)
  scores, anchor_score = judge(prompts, texts, valid)  # f32[B, K], f32[B]

`ranking.scheme = "teacher_judge"` makes `rollout.collect` call this instead
of the student's self-ranking (`self_scoring.score_group`).

The judge prompt (JUDGE_TEMPLATE, or `ranking.template` when set; placeholders
{prompt} and {response}) shows the question and one candidate, no anchor, and
asks for a score from SCORE_MIN to SCORE_MAX. `parse_score` reads the reply.

Ledger: every judge request goes through the anchors' machinery
(`anchors.AnchorStore`, same schema, same guarantees: an intent row under a
flock before the request, the answer committed before it is used), in its own
file `<workdir>/judgements.sqlite` (FILENAME), keyed by `ledger.ledger_key`
of the judge request (its canonical JSON: the judge conversation as sent,
backend, model, generation params). So a resumed run never pays a judgement
twice, and anchors and judgements are counted apart: `teacher_calls` (HTTP
attempts for anchors) and `judge_calls` (judge requests, see `metrics`).

Unparseable replies: a reply `parse_score` cannot read is asked again, up to
`teacher.max_retries` times (each re-ask is billed; at temperature 0 it often
gives the same reply). The last reply is stored all the same (it was paid
for; a resumed run does not ask again), then counted (`judge_unparseable`),
warned about, and given the minimum parsed score of its group (SCORE_MIN when
no member of the group parsed).

The anchor's score: the anchor is not judged (K calls, not K + 1);
`anchor_score` = the max of the group's K scores, i.e. the anchor is taken
as at least as good as the best candidate (under `pu.mode = "gate"` the
candidates that tie with the best, s_k = s_a, are the likely positives).

Where the judge is asked: the teacher block itself, or, with
`ranking.judge_url` set, that OpenAI-compatible endpoint with the teacher
block's generation params and retries (`judge_teacher`), so recorded
anchors can be judged by a live server.

The `dataset` backend gets a SIMULATED judge: score SCORE_MAX when the
candidate's last number equals the prompt's reference answer
(`evaluate.verify`), else SCORE_MIN. On verifiable tasks it is the oracle
(scheme "oracle") rescaled; it costs nothing, and its ledger rows say
`simulated`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from purld_jax import anchors as anchors_lib
from purld_jax import evaluate
from purld_jax import prompts as prompts_lib
from purld_jax import shared_anchors
from purld_jax import templates
from purld_jax import teacher as teacher_lib
from purld_jax import teacher_wire

FILENAME = "judgements.sqlite"
SCORE_MIN, SCORE_MAX = 1.0, 10.0
JUDGE_TEMPLATE = (
    "Question:\n{prompt}\n\nCandidate answer:\n{response}\n\n"
    "Rate the candidate answer to the question on a scale from 1 (wrong or "
    "useless) to 10 (fully correct and helpful). Reply with the score only, "
    "in the form \"Score: N\".")
SIMULATED_LABEL = ("dataset (SIMULATED judge: 10 if the candidate's last "
                   "number equals the reference answer, else 1)")

_NUM = r"(-?\d+(?:\.\d+)?)"
_KEYWORD = re.compile(r"\b(?:score|rating|grade)\b\s*(?:is|of)?\s*[:=]?\s*"
                      + _NUM, re.IGNORECASE)
_OUT_OF = re.compile(_NUM + r"\s*(?:/|out\s+of)\s*10\b", re.IGNORECASE)
_SCALE = re.compile(r"\b1\s*(?:-|–|to)\s*10\b")
_ALL_NUMS = re.compile(r"(?<![\w.])" + _NUM + r"(?![\w])")


def parse_score(text: str, *, lo: float = SCORE_MIN,
                hi: float = SCORE_MAX) -> float | None:
  """The score in a judge's reply, or None.

  Rules, first that applies (markdown * _ ` # dropped first):
    1. the last "score|rating|grade [is|of] [:|=] N"  ("Score: 7", "**Rating**: 8");
    2. the last "N/10" or "N out of 10"               ("7/10", "7 out of 10");
    3. the only number left once a "1-10" / "1 to 10" scale is dropped
       ("7", "I'd give it 7.", "On a scale of 1 to 10: 6").
  Several numbers and no rule 1-2 -> None (ambiguous). A number outside
  [lo, hi] -> None.
  """
  t = re.sub(r"[*_`#]", "", text or "")
  found = _KEYWORD.findall(t) or _OUT_OF.findall(t)
  if found:
    value = float(found[-1])
  else:
    nums = _ALL_NUMS.findall(_SCALE.sub(" ", t))
    if len(nums) != 1:
      return None
    value = float(nums[0])
  return value if lo <= value <= hi else None


@dataclasses.dataclass(frozen=True)
class JudgeItem:
  """One judgement to ask for: a candidate to a question.

  `id` names it in the ledger (`<prompt id>/k<k>`); `answer` is the prompt's
  reference answer (the simulated judge's only use of it); `images` are the
  prompt's (`Prompt.images`), shown to the judge with the judge message.
  """

  id: str
  question: str
  response: str
  answer: str | None = None
  images: tuple[bytes, ...] = dataclasses.field(default=(), repr=False)


def judge_text(item: JudgeItem, template: str = JUDGE_TEMPLATE) -> str:
  return template.format(prompt=item.question, response=item.response)


class JudgeTeacher:
  """The teacher, asked to judge: the `teacher.Teacher` protocol over
  `JudgeItem`s, so `anchors.AnchorStore` keeps its ledger unchanged.

  A real teacher is asked the judge conversation (its system prompt and
  generation params as for anchors); a `teacher.DatasetTeacher` becomes the
  SIMULATED judge of the module docstring.
  """

  def __init__(self, teacher: teacher_lib.Teacher, *,
               template: str = JUDGE_TEMPLATE, max_retries: int | None = None):
    self.teacher, self.template = teacher, template
    self.simulated = isinstance(teacher, teacher_lib.DatasetTeacher)
    self.label = SIMULATED_LABEL if self.simulated else teacher.label
    self.max_concurrency = teacher.max_concurrency
    cfg = getattr(teacher, "cfg", None)
    self.max_retries = (max_retries if max_retries is not None
                        else getattr(cfg, "max_retries", 0))

  def _prompt(self, item: JudgeItem) -> prompts_lib.Prompt:
    return prompts_lib.Prompt.from_text(judge_text(item, self.template),
                                        id=item.id, images=item.images)

  def request(self, item: JudgeItem) -> teacher_lib.Request:
    if self.simulated:  # the reference answer is what decides: in the key
      return teacher_lib.Request(
          messages=(("user", judge_text(item, self.template)),),
          backend="dataset", model="simulated-judge:last-number",
          params=(("answer", item.answer),), images=item.images)
    return self.teacher.request(self._prompt(item))

  def prepare(self) -> None:
    self.teacher.prepare()

  def _simulated(self, item, on_attempt) -> teacher_lib.Reply:
    if item.answer is None:
      raise teacher_wire.TeacherError(
          f"{item.id!r}: no reference 'answer'; the simulated (dataset) judge "
          "needs one", kind="no_answer")
    score = SCORE_MAX if evaluate.verify(item.response, item.answer) else SCORE_MIN
    attempt = teacher_wire.Attempt(1, "ok")
    if on_attempt:
      on_attempt(attempt)
    return teacher_lib.Reply(
        text=f"Score: {score:g}", finish_reason="stop", truncated=False,
        prompt_tokens=None, completion_tokens=None, latency_s=0.0,
        attempts=(attempt,), simulated=True, teacher=self.label)

  def ask(self, item: JudgeItem,
          on_attempt: Callable[[teacher_wire.Attempt], None] | None = None
          ) -> teacher_lib.Reply:
    """The judge's reply, re-asked up to `max_retries` times while
    unparseable; the last reply is returned even if unparseable."""
    if self.simulated:
      return self._simulated(item, on_attempt)
    attempts: list[teacher_wire.Attempt] = []

    def record(a):  # attempts numbered across re-asks
      a = dataclasses.replace(a, n=len(attempts) + 1)
      attempts.append(a)
      if on_attempt:
        on_attempt(a)

    for n in range(self.max_retries + 1):
      reply = self.teacher.ask(self._prompt(item), on_attempt=record)
      if parse_score(reply.text) is not None:
        break
      logging.warning("teacher judge: %s: unparseable reply %r (%d/%d)",
                      item.id, reply.text[:80], n + 1, self.max_retries + 1)
    return dataclasses.replace(reply, attempts=tuple(attempts))


def items(prompts: Sequence[prompts_lib.Prompt],
          texts: Sequence[Sequence[str]]) -> list[list[JudgeItem]]:
  """B x K JudgeItems of the prompts' candidates (texts already decoded)."""
  return [[JudgeItem(id=f"{p.id}/k{k}",
                     question=templates.prompt_text(p.as_dicts()),
                     response=t, answer=p.answer, images=p.images)
           for k, t in enumerate(group)]
          for p, group in zip(prompts, texts)]


def group_scores(replies: Sequence[Sequence[str]], *, ids=None
                 ) -> tuple[np.ndarray, int]:
  """Judge replies B x K -> (scores np.float32[B, K], unparseable count).

  An unparseable reply gets its group's minimum parsed score (SCORE_MIN if
  none parsed), with a warning naming it.
  """
  out = np.full((len(replies), len(replies[0]) if replies else 0), SCORE_MIN,
                np.float32)
  bad = 0
  for b, group in enumerate(replies):
    parsed = [parse_score(r) for r in group]
    fill = min((s for s in parsed if s is not None), default=SCORE_MIN)
    for k, s in enumerate(parsed):
      if s is None:
        bad += 1
        logging.warning("teacher judge: unparseable reply to %s: %r; given "
                        "the group's minimum %g",
                        ids[b][k] if ids else f"{b}/k{k}", group[k][:80], fill)
      out[b, k] = fill if s is None else s
  return out, bad


class TeacherJudge:
  """Judge scores of candidate groups through the ledger (a collective on
  several processes: process 0 holds the ledger and asks the teacher, the
  reply texts reach the others as `shared_anchors.broadcast_texts`)."""

  def __init__(self, workdir, teacher: teacher_lib.Teacher, *,
               template: str | None = None, process_index: int | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    pi = jax.process_index() if process_index is None else process_index
    self.judge = JudgeTeacher(teacher, template=template or JUDGE_TEMPLATE)
    self.store = (anchors_lib.AnchorStore(workdir, self.judge,
                                          filename=FILENAME)
                  if pi == 0 else None)
    self.last_unparseable = 0

  def __call__(self, prompts: Sequence[prompts_lib.Prompt],
               texts: Sequence[Sequence[str]],
               valid: Sequence[bool] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(scores np.float32[B, K], anchor_score np.float32[B]); rows with
    valid False (fillers) are not judged (SCORE_MIN, no call)."""
    b, k = len(texts), len(texts[0])
    valid = np.ones(b, bool) if valid is None else np.asarray(valid, bool)
    rows = [r for r in range(b) if valid[r]]
    todo = items([prompts[r] for r in rows], [texts[r] for r in rows])
    flat = [it for g in todo for it in g]
    try:
      local = (None if self.store is None
               else [a.text for a in self.store.get_or_query(flat)])
    except anchors_lib.AnchorError as e:  # its words say "anchor"
      raise anchors_lib.AnchorError(f"teacher judge ({FILENAME}): {e}") from None
    replies = shared_anchors.broadcast_texts(local, len(flat))
    scores = np.full((b, k), SCORE_MIN, np.float32)
    if rows:
      got, self.last_unparseable = group_scores(
          [replies[i * k:(i + 1) * k] for i in range(len(rows))],
          ids=[[it.id for it in g] for g in todo])
      scores[rows] = got
    else:
      self.last_unparseable = 0
    return scores, scores.max(axis=1)

  def calls(self) -> float:
    """Judge requests sent so far, in the ledger (simulated ones included;
    0 on processes other than 0): the RLAIF baseline's teacher cost."""
    return 0.0 if self.store is None else float(
        self.store.ledger.stats().requests)

  def close(self):
    if self.store is not None:
      self.store.close()


def metrics(judge: TeacherJudge | None) -> dict:
  """Per-step log values: judge_calls (cumulative judge requests, 0 without
  a judge) and judge_unparseable (this step's unparseable replies)."""
  if judge is None:
    return {"judge_calls": 0.0}
  return {"judge_calls": judge.calls(),
          "judge_unparseable": float(judge.last_unparseable)}


def judge_config(config) -> teacher_lib.TeacherConfig | None:
  """The judge's own TeacherConfig when `ranking.judge_url` is set: the
  teacher block with backend openai at that URL, model judge_model, key
  from judge_api_key_env. None: the teacher block is the judge."""
  r = config.ranking
  if not r.get("judge_url", ""):
    return None
  return teacher_lib.TeacherConfig.from_mapping({
      **config.teacher.to_dict(), "backend": "openai",
      "base_url": r.judge_url, "model": r.judge_model,
      "api_key_env": r.judge_api_key_env, "recorded_path": ""})


def judge_teacher(config, teacher: teacher_lib.Teacher) -> teacher_lib.Teacher:
  """The teacher that judges: `teacher` (the anchors') or, with
  `ranking.judge_url`, a client of that endpoint."""
  cfg = judge_config(config)
  return teacher if cfg is None else teacher_lib.make(cfg)


def config_problems(config) -> list[str]:
  """Why `ranking.scheme = teacher_judge` cannot run with this config."""
  try:
    cfg = judge_config(config)
  except teacher_lib.ConfigError as e:
    return [f"ranking.judge_url: {e}"]
  if cfg is None and config.teacher.backend == "recorded":
    return ["ranking.scheme='teacher_judge' with teacher.backend='recorded': "
            "a recording holds anchors, not judgements of new candidates; "
            "set ranking.judge_url to a live OpenAI-compatible endpoint"]
  return []
