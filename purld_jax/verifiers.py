"""Answer verifiers by name: the last-number rule and `math-verify`.

`verify_math(text, answer)` asks the `math-verify` package (Hugging Face) for
mathematical equivalence: both sides are parsed to sympy (LaTeX, `\\boxed{}`,
plain expressions; "1,000" is 1000, `\\frac{1}{2}` is 0.5) and compared.
The reference is parsed as written and, when that finds nothing (bare LaTeX
such as `\\frac34`), again inside `$...$`. When either side yields nothing
(or math-verify raises), the answer falls back to `evaluate.verify`, the
last-number rule, so a prompt is never scored by silence.

Time limits: math-verify bounds parsing and comparison with `signal.alarm`,
which works on the main thread of the main interpreter only (elsewhere it
raises ValueError). `verify_math` passes `timeout_s` on the main thread and
None (no limit) on any other thread: a pathological expression can then take
as long as sympy needs. Keep verification on the main thread (the evaluation
and the trainer call it there), or run it in a process pool, to keep the
limit. A parse that times out yields nothing (the last-number fallback
decides); a comparison that times out counts as wrong.

`get(kind)` gives `fn(text, answer) -> float` for a kind in `KINDS`;
`evaluate.batch_verifier(answers, kind=...)` builds on it.
"""

from __future__ import annotations

import threading
from typing import Callable

from purld_jax import evaluate

KINDS = ("last_number", "math")


def _math_verify():
  try:
    import math_verify  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the 'math' verifier needs the math-verify package: "
                      "pip install math-verify") from e
  return math_verify


def _timeout(timeout_s: int | None) -> int | None:
  """`timeout_s` on the main thread; None (no limit) elsewhere (see above)."""
  if threading.current_thread() is threading.main_thread():
    return timeout_s
  return None


def parse_reference(answer: str, *, timeout_s: int | None = 5) -> list:
  """math-verify's parse of a reference answer: as written, then in $...$."""
  mv, limit = _math_verify(), _timeout(timeout_s)
  gold = mv.parse(answer, parsing_timeout=limit)
  if not gold:
    gold = mv.parse(f"${answer}$", parsing_timeout=limit)
  return gold


def verify_math(text: str, answer: str | None, *, timeout_s: int | None = 5
                ) -> float:
  """1.0 when `text`'s final answer equals `answer` mathematically, else 0.0.

  0.0 without a reference. Falls back to `evaluate.verify` (last number
  equals the reference) when math-verify parses nothing from either side or
  raises. `timeout_s` bounds parsing and comparison, on the main thread only.
  """
  if answer is None:
    return 0.0
  answer = str(answer).strip()
  mv, limit = _math_verify(), _timeout(timeout_s)
  try:
    gold = parse_reference(answer, timeout_s=timeout_s)
    pred = mv.parse(text, parsing_timeout=limit)
    if not gold or not pred:
      return evaluate.verify(text, answer)
    return float(mv.verify(gold, pred, timeout_seconds=limit))
  except Exception:  # pylint: disable=broad-except
    # math-verify logs and swallows its own errors by default; anything that
    # still escapes (a sympy corner) is scored by the plain rule.
    return evaluate.verify(text, answer)


_REGISTRY: dict[str, Callable[[str, str | None], float]] = {
    "last_number": evaluate.verify,
    "math": verify_math,
}


def get(kind: str) -> Callable[[str, str | None], float]:
  """The verifier `fn(text, answer) -> float` named `kind` (one of KINDS)."""
  if kind not in _REGISTRY:
    raise ValueError(f"unknown verifier {kind!r}; known: {', '.join(KINDS)}")
  return _REGISTRY[kind]
