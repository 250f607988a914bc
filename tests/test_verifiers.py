"""Verifiers: math-verify equivalence, its fallback, the registry."""

import threading

import pytest

from purld_jax import evaluate
from purld_jax import verifiers

math_verify = pytest.importorskip("math_verify")


@pytest.mark.parametrize("text, answer, want", [
    (r"So $x = \frac{1}{2}$.", "0.5", 1.0),        # 1/2 = 0.5
    ("The answer is 0.5", r"\frac{1}{2}", 1.0),     # bare LaTeX reference
    (r"Adding up, \boxed{42}. Check: 40 + 2.", "42", 1.0),  # boxed wins
    ("The total is 1,000 dollars.", "1000", 1.0),   # thousands comma
    ("1000", "1,000", 1.0),
    (r"\boxed{\dfrac{3}{4}}", r"\frac34", 1.0),
    ("so the answer is 7", "8", 0.0),               # wrong
    (r"\boxed{-2}", "2", 0.0),                       # sign matters
    ("42", None, 0.0),                               # no reference
])
def test_verify_math_on_written_examples(text, answer, want):
  assert verifiers.verify_math(text, answer) == want


def test_last_number_rule_misses_what_math_verify_sees():
  # 1/2 written as a fraction: the last number is "2", not "0.5".
  assert evaluate.verify(r"$\frac{1}{2}$", "0.5") == 0.0
  assert verifiers.verify_math(r"$\frac{1}{2}$", "0.5") == 1.0


def test_falls_back_to_the_last_number_rule_when_nothing_parses(monkeypatch):
  monkeypatch.setattr(math_verify, "parse", lambda *a, **k: [])
  assert verifiers.verify_math("so it is 54", "54") == 1.0   # last number 54
  assert verifiers.verify_math("so it is 55", "54") == 0.0

  def boom(*a, **k):
    raise RuntimeError("sympy corner")
  monkeypatch.setattr(math_verify, "parse", boom)
  assert verifiers.verify_math("= 12", "12") == 1.0


def test_works_off_the_main_thread():
  # math-verify's signal.alarm timeouts raise ValueError off the main thread;
  # verify_math turns them off there.
  got = []
  t = threading.Thread(target=lambda: got.append(
      (verifiers.verify_math(r"\boxed{\frac{1}{2}}", "0.5"),
       verifiers.verify_math("7", "8"))))
  t.start()
  t.join()
  assert got == [(1.0, 0.0)]


def test_registry_and_batch_verifier_kinds():
  assert verifiers.get("last_number") is evaluate.verify
  assert verifiers.get("math") is verifiers.verify_math
  with pytest.raises(ValueError, match="unknown verifier"):
    verifiers.get("regex")
  answers = ["0.5", None]
  plain = evaluate.batch_verifier(answers)
  math = evaluate.batch_verifier(answers, kind="math")
  assert (plain(0, r"$\frac{1}{2}$"), math(0, r"$\frac{1}{2}$")) == (0.0, 1.0)
  assert (plain(1, "0.5"), math(1, "0.5")) == (0.0, 0.0)
  with pytest.raises(ValueError, match="unknown verifier"):
    evaluate.batch_verifier(answers, kind="regex")
