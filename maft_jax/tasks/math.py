"""MATH (Hendrycks et al.) from a local JSONL file: problem, solution, level, type.

Answers are the last `\\boxed{}` of a response. Votes use a canonical key:
exact numbers via `answers.number_key`, other expressions via math-verify's
sympy parse (so `\\frac{1}{2}`, `0.5` and `\\dfrac12` vote together);
correctness is math-verify's equivalence check against the reference box.

math-verify's default timeouts use SIGALRM, which only works on the main
thread. Off the main thread (grain workers, thread pools) we call it with
timeouts disabled, so a pathological expression can take as long as sympy
needs; on the main thread the default 5-second guards stay on.
"""

from __future__ import annotations

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


def parse_box(box: str):
  """math-verify's parse of one boxed answer ([] when it cannot parse)."""
  mv = _math_verify()
  return mv.parse(f"\\boxed{{{box}}}", parsing_timeout=_timeout())


def _levels(levels) -> frozenset[int] | None:
  if levels is None or levels == "":
    return None
  items = levels.split(",") if isinstance(levels, str) else list(levels)
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
    if box is None or not box:
      return None
    key = answers.number_key(box)
    if key is not None:
      return key
    parsed = parse_box(box)
    if parsed:
      return str(parsed[0])
    return " ".join(box.split())

  def is_correct(self, text: str, problem: Problem) -> bool:
    box = answers.last_boxed(text)
    if not box:
      return False
    gold, pred = parse_box(problem.reference), parse_box(box)
    if not gold or not pred:
      return " ".join(box.split()) == " ".join(problem.reference.split())
    return bool(_math_verify().verify(gold, pred, timeout_seconds=_timeout()))
