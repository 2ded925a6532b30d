"""Multiple-choice questions (MMLU-style) from local files.

Accepted files: JSONL with `question`, `choices` (list of strings) and
`answer` (a letter, or a 0-based index); or MMLU's header-less CSV rows
`question,A,B,C,D,answer`. The answer key is the choice letter.
"""

from __future__ import annotations

import csv
import hashlib
import re
import string

from maft_jax.tasks import answers
from maft_jax.tasks.base import Problem, Task, TaskError, read_jsonl, require

LETTERS = string.ascii_uppercase


def _letter(answer, n: int, where: str) -> str:
  if isinstance(answer, int) and not isinstance(answer, bool):
    letter = LETTERS[answer] if 0 <= answer < n else None
  elif isinstance(answer, str) and len(answer.strip()) == 1:
    letter = answer.strip().upper()
  else:
    letter = None
  if letter is None or letter not in LETTERS[:n]:
    raise TaskError(f"{where}: field 'answer'={answer!r} is not one of {LETTERS[:n]} "
                    f"or 0..{n - 1}")
  return letter


class MultipleChoice(Task):
  name = "multiple_choice"

  def __init__(self, *, path: str | None = None, on_bad_record: str = "error", **kw):
    super().__init__(**kw)
    if not path:
      raise TaskError("multiple_choice: option path=FILE.jsonl|FILE.csv is required")
    self.path, self.on_bad_record = path, on_bad_record

  def _records(self):
    if self.path.endswith(".csv"):
      with open(self.path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
          if len(row) < 4:
            raise TaskError(f"{self.path}:{lineno}: expected question, >= 2 choices, answer; "
                            f"got {len(row)} columns")
          yield lineno, {"question": row[0], "choices": row[1:-1], "answer": row[-1]}
    else:
      yield from read_jsonl(self.path, on_bad_record=self.on_bad_record)

  def _all_problems(self):
    out, self.skipped = [], 0
    records = self._records()
    while True:
      try:
        lineno, rec = next(records)
      except StopIteration:
        break
      except TaskError:
        if self.on_bad_record == "skip" and self.path.endswith(".csv"):
          self.skipped += 1
          continue
        raise
      where = f"{self.path}:{lineno}"
      try:
        question = require(rec, "question", where)
        choices = require(rec, "choices", where, list)
        if not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
          raise TaskError(f"{where}: field 'choices' must be 2..26 strings")
        letter = _letter(require(rec, "answer", where, (str, int)), len(choices), where)
      except TaskError:
        if self.on_bad_record == "skip":
          self.skipped += 1
          continue
        raise
      text = question + "\n" + "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
      pid = str(rec.get("id") or "mc-" + hashlib.sha256(text.encode()).hexdigest()[:16])
      out.append(Problem(id=pid, question=text, reference=letter,
                         fields={"choices": tuple(choices)}))
    if not out:
      raise TaskError(f"{self.path}: no problems")
    self._n_choices = max(len(p.fields["choices"]) for p in out)
    return out

  @property
  def answer_format(self) -> str:
    return "the letter of the correct choice"

  def extract_answer(self, text: str) -> str | None:
    """The letter in the last box, else the last '(X)' / 'answer is X'."""
    box = answers.last_boxed(text)
    if box is not None:
      m = re.fullmatch(r"\s*(?:\\text\{)?\(?([A-Za-z])\)?\}?\s*(?:[).:].*)?", box, re.S)
      return m.group(1).upper() if m else None
    found = re.findall(r"(?:answer is|answer:)\s*\(?([A-Z])\b|\(([A-Z])\)", text)
    if not found:
      return None
    a, b = found[-1]
    return a or b
