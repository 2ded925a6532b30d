"""MATH (Hendrycks et al.) from a local JSONL file: problem, solution, level, type.

The answer relation. An answer is the last `\\boxed{}` of a response (an
unclosed last box is no answer); its key is the box's text with whitespace
collapsed. Two answers are the same when math-verify finds them equivalent
(its sympy parse of both boxes), and by exact text when either cannot be
parsed. Votes cluster a problem's answers with this relation (`3x` and `3`
differ; `x=5` and `5`, `2(x+1)` and `2x+2`, `\\frac{1}{2}` and `0.5` agree),
and grading is the same relation against the reference box, as the paper's
code clusters answers with its grader.

math-verify's default timeouts use SIGALRM, which only works on the main
thread. Off the main thread (grain workers, thread pools) we call it with
timeouts disabled, so a pathological expression can take as long as sympy
needs; on the main thread the default 5-second guards stay on.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading

from maft_jax.tasks import answers
from maft_jax.tasks.base import Problem, Task, TaskError, read_jsonl, require


def _math_verify():
  try:
    import math_verify
  except ImportError:
    raise TaskError("task 'math' needs the math-verify package: pip install -r "
                    "requirements-tasks.txt") from None
  logging.getLogger("math_verify").setLevel(logging.ERROR)
  return math_verify


def _timeout() -> int | None:
  return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=65536)
def _parse_cached(box: str, timeout: int | None):
  return tuple(_math_verify().parse(f"\\boxed{{{box}}}", parsing_timeout=timeout))


def parse_box(box: str) -> list:
  """math-verify's parse of one boxed answer ([] when it cannot parse).
  Cached: a problem's answers are parsed once for votes and grading."""
  return list(_parse_cached(box, _timeout()))


def _levels(levels) -> frozenset[int] | None:
  if levels is None or levels == "":
    return None
  items = (levels.split(",") if isinstance(levels, str) else [levels] if isinstance(levels, int)
           else list(levels))
  try:
    out = frozenset(int(str(x).strip().removeprefix("Level ").strip()) for x in items)
  except ValueError:
    raise TaskError(f"math: levels={levels!r}; expected e.g. '1,2,3'") from None
  if not out <= set(range(1, 6)):
    raise TaskError(f"math: levels={levels!r}; MATH levels are 1..5")
  return out


class MATH(Task):
  name = "math"
  answer_format = "a simplified expression"

  def __init__(self, *, path: str | None = None, levels=None, on_bad_record: str = "error",
               **kw):
    super().__init__(**kw)
    if not path:
      raise TaskError("math: option path=FILE.jsonl is required (records with 'problem', "
                      "'solution', 'level', 'type')")
    self.path, self.levels, self.on_bad_record = path, _levels(levels), on_bad_record
    _math_verify()

  def _all_problems(self):
    out, self.skipped = [], 0
    for lineno, rec in read_jsonl(self.path, on_bad_record=self.on_bad_record):
      where = f"{self.path}:{lineno}"
      try:
        problem = require(rec, "problem", where)
        solution = require(rec, "solution", where)
        level_text = require(rec, "level", where)
        reference = answers.last_boxed(solution)
        if reference is None:
          raise TaskError(f"{where}: field 'solution' has no \\boxed{{}} answer")
        try:
          level = int(level_text.removeprefix("Level ").strip())
        except ValueError:
          level = None  # "Level ?" occurs in the real data
      except TaskError:
        if self.on_bad_record == "skip":
          self.skipped += 1
          continue
        raise
      if self.levels is not None and level not in self.levels:
        continue
      pid = str(rec.get("id") or "math-" + hashlib.sha256(problem.encode()).hexdigest()[:16])
      out.append(Problem(id=pid, question=problem, reference=reference,
                         fields={"solution": solution, "level": level,
                                 "type": rec.get("type")}))
    if not out:
      raise TaskError(f"{self.path}: no problems (levels filter: {sorted(self.levels or [])})")
    return out

  def extract_answer(self, text: str) -> str | None:
    box = answers.last_boxed(text)
    return " ".join(box.split()) if box else None

  def same_answer(self, a: str, b: str) -> bool:
    if a == b:
      return True
    gold, pred = parse_box(a), parse_box(b)
    if not gold or not pred:
      return " ".join(a.split()) == " ".join(b.split())
    return bool(_math_verify().verify(gold, pred, timeout_seconds=_timeout()))
