"""The judge's prompt, and how its replies score a pair (pure; no judge).

What `winrate.py` asks a judge and how it reads the replies:

  SYSTEM, TEMPLATE, judge_messages      the judge's conversation for answers
                                        A and B (`prompt_text`: the request)
  parse_verdict                         "A", "B", "tie" or None from a reply
  order_outcome, pair_outcomes          verdict scoring
  verdict_position, verdict_probs,      probability scoring, from the top
  order_probability                     log-probabilities of the reply

Names below not defined here are `winrate.py`'s: `scoring` and
`unparseable` are `winrate.winrate`'s arguments; `unparseable`, `failed`,
`judged`, `disagreements` and W/T/L are `WinRate` fields; `TIE_TOL`.

Both orders, to cancel position bias: the pair is judged once with the
model's answer as A ("model first") and once with it as B ("reference
first"). The model's outcome in one order is 1 (its answer preferred), 0
(the reference preferred) or 0.5 (tie). The pair's outcome is the common
value when the two orders agree, and 0.5 (a tie) when they disagree in any
way: a judge that always says "A" scores every pair a tie, and so does a
(win, tie) pair. A verdict that cannot be parsed (`parse_verdict` -> None)
is counted (`unparseable`) and its pair is left out of the rates
(`unparseable="exclude"`, the default) or scored 0.5 (`"tie"`); a judge
request that failed after its retries is counted in `failed` and its pair
left out the same way. `judged` says how many pairs the rates are over.

Probability scoring (`scoring="probability"`), for small judges whose
one-line verdict is the same letter whatever the order (a 0.5B-1.5B model
answers "Verdict: A" to nearly everything, so every pair is a tie): the
judge is asked for the top log-probabilities of its reply's tokens
(`teacher.TeacherConfig.top_logprobs`), and at the verdict position (the
token after "Verdict:", else a bare "A"/"B"/"tie" reply's first token) the
probabilities of the three verdicts are read, each summed over the listed
tokens that spell it (" A", "A", "a", ...), and renormalised over the
three: (pA, pB, ptie). The model's outcome in one order is
P(model better) = p_model + ptie / 2 (p_model = pA when the model's answer
is A); the pair's outcome is the mean over the two orders. A judge biased
toward one position by a constant cancels out (pA = 0.8 in both orders
gives 0.8 and 0.2, mean 0.5), while a preference for the model's answer
that survives the swap moves the outcome above 0.5. Outcomes are in
[0, 1]; W/T/L count outcomes above, at (within `TIE_TOL`) and below 0.5;
`disagreements` counts pairs whose two orders favour different answers
(P(model better) above 0.5 in one, below in the other: a judge that says
"A" in both orders disagrees with itself on every pair). An order
without logprobs or without a verdict position is unreadable (as an
unparseable verdict is in verdict scoring).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from purld_jax import prompts as prompts_lib
from purld_jax import teacher_wire

VERDICTS = ("A", "B", "tie")

SYSTEM = ("You are a careful, impartial judge of answers to user requests. "
          "Judge helpfulness, correctness and clarity; do not prefer an "
          "answer for its length or for its position.")

TEMPLATE = """\
[User request]
{prompt}

[Answer A]
{a}

[Answer B]
{b}

Which answer serves the user request better? Reply with one line, exactly \
one of:
Verdict: A
Verdict: B
Verdict: tie"""


def prompt_text(prompt: prompts_lib.Prompt) -> str:
  """The request as the judge reads it: a lone user message as is, else one
  "role: content" paragraph per message."""
  if len(prompt.messages) == 1:
    return prompt.messages[0][1]
  return "\n\n".join(f"{role}: {content}" for role, content in prompt.messages)


def judge_messages(prompt: prompts_lib.Prompt, a: str, b: str, *,
                   template: str = TEMPLATE, system: str = SYSTEM
                   ) -> tuple[tuple[str, str], ...]:
  """The judge's conversation for answers `a` (shown first) and `b`."""
  user = template.format(prompt=prompt_text(prompt), a=a, b=b)
  return ((("system", system),) if system else ()) + (("user", user),)


_VERDICT_LINE = re.compile(r"verdict\W{0,6}(a|b|tie)\b", re.IGNORECASE)
_BARE = re.compile(r"^\W*(?:answer\s+)?(a|b|tie)\W*$", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
  """"A", "B" or "tie" from a judge's reply, or None.

  The last "Verdict: X" (any case, markdown around it allowed) wins; else a
  reply that is only "A", "B", "tie" or "Answer A" (punctuation and brackets
  around it allowed, e.g. "[[B]]"); anything else is unparseable.
  """
  found = _VERDICT_LINE.findall(text)
  if not found:
    found = _BARE.findall(text.strip())
  if not found:
    return None
  v = found[-1].lower()
  return "tie" if v == "tie" else v.upper()


_VERDICT_PREFIX = re.compile(r"verdict\W{0,6}$", re.IGNORECASE)


def _verdict_token(token: str) -> str | None:
  t = re.sub(r"[\W_]+", "", token).lower()
  return {"a": "A", "b": "B", "tie": "tie"}.get(t)


def verdict_position(logprobs: teacher_wire.Logprobs) -> int | None:
  """Index of the verdict token: the first position right after text ending
  in "Verdict:" (any case, up to 6 non-word characters after it) whose
  chosen token spells a verdict; else position 0 when its chosen token does
  (a bare reply); else None."""
  text = ""
  for i, pos in enumerate(logprobs):
    if _VERDICT_PREFIX.search(text) and _verdict_token(pos[0][0]):
      return i
    text += pos[0][0]
  if logprobs and _verdict_token(logprobs[0][0][0]):
    return 0
  return None


def verdict_probs(logprobs: teacher_wire.Logprobs | None
                  ) -> tuple[float, float, float] | None:
  """(pA, pB, ptie) at `verdict_position`, renormalised over the three (each
  summed over the listed tokens that spell it); None without logprobs, a
  verdict position, or any verdict probability."""
  if not logprobs:
    return None
  i = verdict_position(logprobs)
  if i is None:
    return None
  mass = {"A": 0.0, "B": 0.0, "tie": 0.0}
  for token, lp in logprobs[i]:
    v = _verdict_token(token)
    if v is not None:
      mass[v] += float(np.exp(lp))
  total = sum(mass.values())
  if total <= 0:
    return None
  return mass["A"] / total, mass["B"] / total, mass["tie"] / total


def order_probability(probs: tuple[float, float, float] | None, *,
                      model_first: bool) -> float:
  """P(model better) in one order: p_model + ptie / 2; NaN for None."""
  if probs is None:
    return float("nan")
  p_a, p_b, p_tie = probs
  return (p_a if model_first else p_b) + p_tie / 2


def order_outcome(verdict: str | None, *, model_first: bool) -> float:
  """The model's outcome in one order: 1 win, 0 loss, 0.5 tie; NaN when
  the verdict is None."""
  if verdict is None:
    return float("nan")
  if verdict == "tie":
    return 0.5
  return float((verdict == "A") == model_first)


def pair_outcomes(model_first: Sequence[str | None],
                  reference_first: Sequence[str | None], *,
                  unparseable: str = "exclude") -> np.ndarray:
  """Per-pair outcome f[N]: the orders' common outcome, 0.5 when they
  disagree; a pair with a missing verdict is NaN (`unparseable="exclude"`)
  or 0.5 (`"tie"`)."""
  if unparseable not in ("exclude", "tie"):
    raise ValueError(f"unparseable={unparseable!r}; known: exclude, tie")
  out = []
  for v1, v2 in zip(model_first, reference_first, strict=True):
    o1 = order_outcome(v1, model_first=True)
    o2 = order_outcome(v2, model_first=False)
    if np.isnan(o1) or np.isnan(o2):
      out.append(np.nan if unparseable == "exclude" else 0.5)
    else:
      out.append(o1 if o1 == o2 else 0.5)
  return np.asarray(out, np.float64)
