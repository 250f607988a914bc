"""Prompt -> anchor, through a ledger: the teacher is paid once per prompt, ever.

The ledger (``ledger.py``: ``<workdir>/anchors.sqlite``) holds every answer,
keyed by the exact request; ``AnchorStore`` asks the teacher only for keys it
has no answer for, and stores each answer before it is used.

A failed request (its retries spent: resets, timeouts, 429, 5xx) fails its
prompt alone: the fetch goes on with the others, reports it (``FetchReport``:
answered, failed, skipped, unanswered), and a later fetch asks exactly the
unanswered ones again. Only a fatal error (401/403/404, or a server never
reached: see ``teacher.py``) stops a fetch; the requests running then are
stored, the rest skipped. ``get_or_query`` (training) raises an
``AnchorError`` naming the teacher and how many prompts are unanswered.

Several training processes: ``shared_anchors.py``.

Command line (``--help`` for all flags)::

  python -m purld_jax.anchors fetch --prompts=FILE.jsonl --workdir=DIR \\
      --teacher.base_url=http://host/v1 --teacher.model=NAME \\
      --teacher.api_key_env=OPENAI_API_KEY
  python -m purld_jax.anchors fetch --config=configs/x.py --workdir=DIR
  python -m purld_jax.anchors stats --workdir=DIR

With ``--config``, the prompt file is ``data.train_path`` and the teacher is
the ``teacher`` block (override with ``--config.teacher.model=...``); explicit
``--prompts`` and ``--teacher.*`` flags win over both. ``fetch`` ends with a
summary (answered, failed, skipped) and exits 0 when every prompt has an
answer, 1 when some are unanswered (run it again: it asks only those), 2 on
an error (a fatal teacher error, a bad flag, an unusable ledger), printed as
one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence

from purld_jax import ledger as ledger_lib
from purld_jax import prompts as prompts_lib
from purld_jax import teacher as teacher_lib
from purld_jax import teacher_wire

# Raised here and by the ledger (a ledger that cannot be used).
AnchorError = ledger_lib.AnchorError


@dataclasses.dataclass(frozen=True)
class Anchor:
  """The teacher's one answer to a prompt."""

  prompt_id: str
  key: str
  text: str
  finish_reason: str
  truncated: bool
  simulated: bool   # True: a reference answer (dataset backend), not a teacher
  teacher: str      # the teacher's label
  logprobs: teacher_wire.Logprobs | None = None  # when the request asked for them

  @property
  def problem(self) -> str | None:
    """Why it cannot be an anchor ("truncated", "empty"), or None."""
    return ledger_lib.answer_problem(self.text, self.finish_reason,
                                     self.truncated)

  @property
  def usable(self) -> bool:
    """False for a truncated or empty answer: stored (paid for), never
    trained on."""
    return self.problem is None


@dataclasses.dataclass(frozen=True)
class FetchReport:
  """What a fetch did; `unanswered` keys are what the next fetch asks."""

  prompts: int
  distinct: int             # distinct ledger keys among them
  already: int              # keys that had an answer before this fetch
  stored: int               # answers stored by this fetch (replacements too)
  failed: tuple             # ((prompt_id, message), ...)
  reasked: int = 0          # unusable answers re-asked (on_truncated='retry')
  skipped: int = 0          # not asked: a fatal error stopped the fetch first
  unanswered: int = 0       # keys still without an answer after it

  @property
  def answered(self) -> int:
    """Distinct keys with an answer (usable or not) after the fetch."""
    return self.distinct - self.unanswered

  def summary(self) -> str:
    """One line: prompts, answered (already / now), failed, skipped."""
    return (f"prompts {self.prompts} (distinct {self.distinct}): answered "
            f"{self.answered} (already stored {self.already}, stored now "
            f"{self.stored}), failed {len(self.failed)}, skipped {self.skipped}"
            + (f", unusable re-asked {self.reasked}" if self.reasked else ""))


class AnchorStore:
  """Anchors for prompts, asking the teacher only for keys not in the ledger.

  `on_truncated` (default: the teacher's `cfg.on_truncated`, else "keep"):
  under "retry" a stored unusable answer (truncated or empty) is re-asked
  once, with the same request, and replaced if the new answer is usable; the
  re-ask is a new paid request (in the ledger's `calls` and `reasked`).
  Under "keep" or "error" it is never asked again.
  """

  def __init__(self, workdir: str | os.PathLike, teacher: teacher_lib.Teacher,
               *, filename: str = ledger_lib.FILENAME,
               on_truncated: str | None = None):
    self.teacher = teacher
    if on_truncated is None:
      on_truncated = getattr(getattr(teacher, "cfg", None), "on_truncated", None)
      if not isinstance(on_truncated, str):  # a teacher with no such config
        on_truncated = "keep"
    if on_truncated not in teacher_lib.TRUNCATED_POLICIES:
      raise teacher_lib.ConfigError(
          f"on_truncated={on_truncated!r}; known: "
          f"{', '.join(teacher_lib.TRUNCATED_POLICIES)}")
    self.on_truncated = on_truncated
    self.ledger = ledger_lib.Ledger(workdir, filename=filename)

  @property
  def reasks(self) -> bool:
    """Unusable stored answers are re-asked (once): on_truncated='retry'."""
    return self.on_truncated == "retry"

  def close(self):
    self.ledger.close()

  def _by_key(self, prompts: Sequence[prompts_lib.Prompt]
              ) -> dict[str, prompts_lib.Prompt]:
    """Ledger key -> the first prompt with that key."""
    todo = {}
    for p in prompts:
      todo.setdefault(ledger_lib.ledger_key(self.teacher.request(p)), p)
    return todo

  def _reaskable(self, keys: Sequence[str]) -> set[str]:
    return self.ledger.reaskable(list(keys)) if self.reasks else set()

  def lookup(self, prompts: Sequence[prompts_lib.Prompt]) -> list[Anchor | None]:
    """The stored anchors (None where absent); never asks the teacher.
    Unusable ones (`Anchor.usable` False) are returned too."""
    keys = [ledger_lib.ledger_key(self.teacher.request(p)) for p in prompts]
    rows = self.ledger.rows(keys)
    return [Anchor(prompt_id=p.id, key=k, **rows[k]) if k in rows else None
            for p, k in zip(prompts, keys)]

  def missing(self, prompts: Sequence[prompts_lib.Prompt]
              ) -> dict[str, prompts_lib.Prompt]:
    """Ledger key -> first prompt with that key, for keys `fetch` would ask:
    without an answer, or (on_truncated='retry') with an unusable one not yet
    re-asked."""
    todo = self._by_key(prompts)
    have = self.ledger.rows(list(todo))
    again = self._reaskable([k for k in todo if k in have])
    return {k: p for k, p in todo.items() if k not in have or k in again}

  def fetch(self, prompts: Sequence[prompts_lib.Prompt], *,
            on_done: Callable[[str, object], None] | None = None) -> FetchReport:
    """Asks for every distinct key without an answer; commits each as it comes.

    Under on_truncated='retry' it also re-asks, once, each key whose stored
    answer is unusable (see the class docstring).
    ``on_done(prompt_id, reply_or_error)`` is called per finished request.
    Failed requests are reported, not raised: the others go on. A fatal one
    (401/403/404, a server never reached) is raised once the requests
    already running are stored, with this fetch's `FetchReport` as its
    ``report`` (the requests never started counted as ``skipped``).
    """
    todo = self._by_key(prompts)
    already = len(self.ledger.rows(list(todo)))
    stored, failed, reasked, finished = 0, [], 0, 0
    with self.ledger.writer():
      have = self.ledger.rows(list(todo))  # again, under the lock
      again = self._reaskable([k for k in todo if k in have])
      missing = [(k, p) for k, p in todo.items() if k not in have or k in again]
      if missing:
        self.teacher.prepare()
      try:
        for (key, prompt), result in teacher_lib.ask_many(
            self.teacher, missing, ask=self._ask_and_store):
          finished += 1
          reasked += key in again and result is not None
          if isinstance(result, teacher_wire.TeacherError):
            failed.append((prompt.id, str(result)))
          elif result is not None:
            result, outcome = result
            stored += outcome in ("stored", "replaced")
          if on_done:
            on_done(prompt.id, result)
      except teacher_wire.TeacherError as e:
        e.report = self._report(prompts, todo, already, stored, failed,
                                reasked, skipped=len(missing) - finished)
        raise
    return self._report(prompts, todo, already, stored, failed, reasked)

  def _report(self, prompts, todo, already, stored, failed, reasked, *,
              skipped=0) -> FetchReport:
    """The FetchReport, with the keys still unanswered counted now."""
    rows = self.ledger.rows(list(todo))
    return FetchReport(len(prompts), len(todo), already, stored, tuple(failed),
                       reasked=reasked, skipped=skipped,
                       unanswered=sum(k not in rows for k in todo))

  def _ask_and_store(self, item):
    key, prompt = item
    request = self.teacher.request(prompt)
    rid = self.ledger.begin(key, prompt.id, request.backend,
                            reask_unusable=self.reasks)
    if rid is None:
      return None
    try:
      reply = self.teacher.ask(
          prompt, on_attempt=lambda a: self.ledger.record_attempt(rid, a))
    except Exception as e:
      self.ledger.fail(rid, e)
      raise
    return reply, self.ledger.store(rid, key, prompt.id, request, reply)

  def get_or_query(self, prompts: Sequence[prompts_lib.Prompt]) -> list[Anchor]:
    """One anchor per prompt; asks only for those not yet in the ledger (and,
    under on_truncated='retry', once for those whose answer is unusable).

    Unusable anchors are returned as they are (check `Anchor.usable`); a
    failed re-ask is logged, not raised. Prompts left without an answer
    (their requests failed, or a fatal error stopped the fetch) raise an
    AnchorError naming the teacher and how many; the answers stored so far
    are kept, and a later call asks only the others.
    """
    anchors = self.lookup(prompts)
    again = self._reaskable(list({a.key for a in anchors
                                  if a is not None and not a.usable}))
    todo = [p for p, a in zip(prompts, anchors) if a is None or a.key in again]
    if todo:
      fatal = None
      try:
        report = self.fetch(todo)
      except teacher_wire.TeacherError as e:
        if getattr(e, "report", None) is None:  # not from the asking
          raise
        fatal, report = e, e.report
      anchors = self.lookup(prompts)
      lost = [p.id for p, a in zip(prompts, anchors) if a is None]
      if lost:
        raise AnchorError(self._unanswered(lost, len(prompts), report, fatal))
      for pid, msg in report.failed:
        logging.warning("anchors: re-asking the unusable answer of %r failed "
                        "(it stays unusable; not asked again): %s", pid, msg)
    return anchors

  def _unanswered(self, lost: Sequence[str], n: int, report: FetchReport,
                  fatal: Exception | None) -> str:
    """One line: how many prompts have no answer, from which teacher, why."""
    why = (str(fatal) if fatal is not None
           else dict(report.failed).get(lost[0])
           or (report.failed[0][1] if report.failed else "no answer stored"))
    return (f"{len(lost)} prompt(s) of {n} unanswered by the teacher "
            f"{self.teacher.label} (e.g. {lost[0]!r}: {' '.join(why.split())})"
            f"; the answers stored are kept in {self.ledger.path}, and a "
            "later run asks only the unanswered")


# ---------------------------------------------------------------- command line

_TEACHER_FLAG_KIND = {str: "string", float: "float", int: "integer"}


def _define_flags():
  """The command line's flags (defined only when it runs)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "optional config file with a `teacher` block and "
      "`data.train_path`; override fields with --config.teacher.model=...",
      lock_config=True)
  flags.DEFINE_string("prompts", None, "JSONL prompt file (default: the "
                      "config's data.train_path)")
  flags.DEFINE_string("workdir", None, "run directory holding anchors.sqlite")
  flags.DEFINE_bool("progress", True, "show a progress bar (stderr)")
  # --teacher.* flags win over the config's teacher block.
  defaults = teacher_lib.TeacherConfig()
  for f in dataclasses.fields(teacher_lib.TeacherConfig):
    kind = _TEACHER_FLAG_KIND[type(getattr(defaults, f.name))]
    getattr(flags, f"DEFINE_{kind}")(
        f"teacher.{f.name}", None,
        f"{f.metadata['help']} (default {getattr(defaults, f.name)!r})")
  return flags.FLAGS


def _teacher_config(flags_, config) -> teacher_lib.TeacherConfig:
  """Defaults < the config's teacher block < explicit --teacher.* flags."""
  values = {}
  if config is not None and "teacher" in config:
    values.update(config.teacher.to_dict())
  for f in dataclasses.fields(teacher_lib.TeacherConfig):
    if flags_[f"teacher.{f.name}"].present:
      values[f.name] = flags_[f"teacher.{f.name}"].value
  return teacher_lib.TeacherConfig.from_mapping(values)


def _prompts_path(flags_, config) -> str:
  if flags_.prompts:
    return flags_.prompts
  try:
    return config.data.train_path
  except (AttributeError, KeyError):
    raise AnchorError(
        "no prompt file: give --prompts=FILE.jsonl, or a --config with "
        "data.train_path") from None


def _fetch(flags_, config) -> int:
  """`fetch`: prints the summary and the ledger's stats. Returns 0 when every
  prompt has an answer, 1 when some are unanswered (their requests failed:
  run again to ask only those); raises the fatal TeacherError that stopped
  it, if any left prompts unanswered (exit 2)."""
  import tqdm  # pylint: disable=g-import-not-at-top
  cfg = _teacher_config(flags_, config)
  prompts = prompts_lib.read_jsonl(_prompts_path(flags_, config))
  store = AnchorStore(flags_.workdir, teacher_lib.make(cfg))
  fatal = None
  try:
    print(f"teacher: {store.teacher.label}")
    bar = tqdm.tqdm(total=len(store.missing(prompts)), unit="prompt",
                    disable=not flags_.progress, dynamic_ncols=True)
    try:
      report = store.fetch(prompts, on_done=lambda *_: bar.update())
    except teacher_wire.TeacherError as e:
      if getattr(e, "report", None) is None:
        raise
      fatal, report = e, e.report
    finally:
      bar.close()
    stats = store.ledger.stats()
  finally:
    store.close()
  _print_report(report, stats)
  if fatal is not None and report.unanswered:
    raise fatal
  return 1 if report.unanswered else 0


def _print_report(report: FetchReport,
                  stats: ledger_lib.Stats) -> None:
  """The fetch's summary, its first failures, the ledger's stats, and what
  to do about unanswered prompts."""
  print(report.summary())
  for pid, msg in report.failed[:10]:
    print(f"  failed {pid}: {msg}")
  if len(report.failed) > 10:
    print(f"  ... and {len(report.failed) - 10} more")
  print(ledger_lib.format_stats(stats))
  if report.unanswered:
    print(f"{report.unanswered} prompt(s) unanswered: run the same command "
          "again to ask only those (answered ones are never asked again)")


def _main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  flags_ = _FLAGS
  if len(argv) != 2 or argv[1] not in ("fetch", "stats"):
    raise app.UsageError("usage: python -m purld_jax.anchors fetch|stats "
                         "--workdir=DIR [...]; see --help")
  if not flags_.workdir:
    raise app.UsageError("--workdir is required")
  if flags_.verbosity < 1:  # one INFO line per HTTP request is noise
    for name in ("httpx", "httpx2"):
      logging.getLogger(name).setLevel(logging.WARNING)
  try:
    if argv[1] == "stats":
      ledger = ledger_lib.Ledger(flags_.workdir, readonly=True)
      print(ledger_lib.format_stats(ledger.stats()))
      ledger.close()
      return 0
    return _fetch(flags_, flags_.config)
  except (AnchorError, teacher_lib.ConfigError,
          teacher_wire.TeacherError, prompts_lib.PromptFileError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def console_main():
  """The `purld-anchors` command: the same as `python -m purld_jax.anchors`."""
  global _FLAGS
  from absl import app  # pylint: disable=g-import-not-at-top
  from purld_jax import quiet  # pylint: disable=g-import-not-at-top
  quiet.libraries()
  _FLAGS = _define_flags()
  from purld_jax import console  # pylint: disable=g-import-not-at-top
  console.help_from(__name__)
  app.run(_main)


if __name__ == "__main__":
  console_main()
