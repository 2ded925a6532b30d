"""GSM8K from a local JSONL or Parquet file (`question`, `answer` ending in `#### N`)."""

from __future__ import annotations

import hashlib

from maft_jax.tasks import answers
from maft_jax.tasks.base import Problem, Task, TaskError, read_records, require


class GSM8K(Task):
  name = "gsm8k"

  def __init__(self, *, path: str | None = None, on_bad_record: str = "error", **kw):
    super().__init__(**kw)
    if not path:
      raise TaskError("gsm8k: option path=FILE.jsonl|FILE.parquet is required (records with 'question' and "
                      "'answer' ending in '#### N')")
    self.path, self.on_bad_record = path, on_bad_record

  def _all_problems(self):
    out, skipped = [], 0
    for where, rec in read_records(self.path, on_bad_record=self.on_bad_record):
      try:
        question = require(rec, "question", where)
        solution = require(rec, "answer", where)
        if "####" not in solution:
          raise TaskError(f"{where}: field 'answer' does not end in '#### <number>'")
        key = answers.number_key(solution.rsplit("####", 1)[1])
        if key is None:
          raise TaskError(f"{where}: the final answer after '####' is not a number")
      except TaskError:
        if self.on_bad_record == "skip":
          skipped += 1
          continue
        raise
      # Stable id: the record's own id if any, else a hash of the question.
      pid = str(rec.get("id") or "gsm8k-" + hashlib.sha256(question.encode()).hexdigest()[:16])
      out.append(Problem(id=pid, question=question, reference=key, fields={"solution": solution}))
    self.skipped = skipped
    if not out:
      raise TaskError(f"{self.path}: no problems")
    return out

  def extract_answer(self, text: str) -> str | None:
    return answers.numeric_answer(text)
