"""The task interface: problems, answer keys, verification, prompts.

`Task.problems()` returns `Problem`s with stable ids, in the source's order.
`Task.split(train_size, test_size)` shuffles them with a seed (`split_seed`,
a task option) and takes exactly `test_size` held-out problems, then exactly
`train_size` training problems, whenever the source holds that many, as the
paper samples 500 + 500 problems. The shuffle orders problems by a hash of
(seed, id), so the split is disjoint by problem id and identical across
runs, processes and machines, whatever the order of the file: we never
evaluate on a training problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from maft_jax import files


class TaskError(ValueError):
  """Bad task data or options; the message names the file, line or field."""


@dataclasses.dataclass(frozen=True)
class Problem:
  id: str
  question: str
  reference: str           # the reference answer key (canonical) or reference text
  fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def shuffled(problems: Sequence[Problem], seed: int) -> list[Problem]:
  """`problems` in the seeded order of the split: by sha256 of (seed, id)."""
  ids = [p.id for p in problems]
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise TaskError(f"problem id {dup!r} occurs more than once")
  rank = lambda p: hashlib.sha256(f"{seed}:{p.id}".encode()).digest()  # noqa: E731
  return sorted(problems, key=rank)


@dataclasses.dataclass(frozen=True)
class Split:
  train: list[Problem]
  test: list[Problem]


def split_problems(problems: Sequence[Problem], train_size: int, test_size: int,
                   seed: int) -> Split:
  """Held-out problems first, then training problems, from the seeded order.
  A source smaller than train_size + test_size is divided in that ratio
  (at least one problem each), with a warning."""
  if train_size < 1 or test_size < 1:
    raise TaskError(f"train_size={train_size}, test_size={test_size}: both must be >= 1")
  order = shuffled(problems, seed)
  n = len(order)
  if n < 2:
    raise TaskError(f"{n} problem(s): a training and a held-out split need at least 2")
  k = test_size
  if n < train_size + test_size:
    k = min(max(1, round(n * test_size / (train_size + test_size))), n - 1)
    logging.warning("the task has %d problems, fewer than train_size=%d + test_size=%d: "
                    "%d held out, %d for training", n, train_size, test_size, k, n - k)
  return Split(train=order[k:k + train_size], test=order[:k])


class Task:
  """Base class. Subclasses set `name` and implement `_all_problems` and
  `extract_answer`, and may widen `same_answer` or replace `is_correct`.

  The answer relation. `same_answer(a, b)` on two answer keys is the one
  equivalence a task has: votes (`answer_classes`), selection and grading
  (`is_correct`: the response's key is the same answer as the reference)
  all use it. By default it is equality of keys, which suits tasks whose
  keys are canonical (exact numbers, letters); MATH widens it to
  math-verify's equivalence. Tasks graded by something other than an answer
  (HumanEval's tests, reasoning-gym's scorers) replace `is_correct` and vote
  by equal keys."""

  name = "task"
  answer_format = "a single number"

  def __init__(self, *, split_seed: int = 0):
    if not isinstance(split_seed, int) or isinstance(split_seed, bool):
      raise TaskError(f"split_seed={split_seed!r} must be an integer")
    self.split_seed = split_seed
    self._cache: list[Problem] | None = None

  def _all_problems(self) -> list[Problem]:
    raise NotImplementedError

  def problems(self) -> list[Problem]:
    """Every problem of the source, in its order."""
    if self._cache is None:
      self._cache = self._all_problems()
    return list(self._cache)

  def split(self, train_size: int, test_size: int) -> Split:
    """Exactly `train_size` training and `test_size` held-out problems (see
    the module docstring)."""
    return split_problems(self.problems(), train_size, test_size, self.split_seed)

  def extract_answer(self, text: str) -> str | None:
    raise NotImplementedError

  def same_answer(self, a: str, b: str) -> bool:
    """Do answer keys `a` and `b` give the same answer? (`a` plays the
    reference when the relation is not symmetric.)"""
    return a == b

  def answer_classes(self, keys: Sequence[str | None]) -> list[int]:
    """Class ids 0, 1, ... of the answers to one problem, in order of first
    appearance; None (no answer) -> -1. An answer joins the first class whose
    first member is `same_answer` as it (that first member is the class's
    representative), so a relation wider than equality votes together the
    answers it equates."""
    representatives: list[str] = []
    out = []
    for k in keys:
      if k is None:
        out.append(-1)
        continue
      for i, r in enumerate(representatives):
        if k == r or self.same_answer(r, k):
          out.append(i)
          break
      else:
        representatives.append(k)
        out.append(len(representatives) - 1)
    return out

  def is_correct(self, text: str, problem: Problem) -> bool:
    key = self.extract_answer(text)
    return key is not None and self.same_answer(problem.reference, key)

  def is_correct_many(self, texts: list[str], problems: list[Problem]) -> list[bool]:
    """Verify many responses; tasks with costly checks (code) run them in parallel."""
    if len(texts) != len(problems):
      raise ValueError(f"{len(texts)} responses for {len(problems)} problems")
    return [self.is_correct(t, p) for t, p in zip(texts, problems)]


def read_jsonl(path: str, *, on_bad_record: str = "error") -> Iterator[tuple[int, dict]]:
  """`files.read_jsonl` with the tasks' error (`TaskError`)."""
  return files.read_jsonl(path, on_bad_record=on_bad_record, error=TaskError)


def read_records(path: str, *, on_bad_record: str = "error") -> Iterator[tuple[str, dict]]:
  """(location, record) from a JSONL file ("FILE:LINE") or a Parquet file
  ("FILE: row N", via pyarrow, imported only for Parquet)."""
  if not path.endswith(".parquet"):
    for lineno, record in read_jsonl(path, on_bad_record=on_bad_record):
      yield f"{path}:{lineno}", record
    return
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise TaskError(f"{path}: reading Parquet needs pyarrow: pip install -r "
                    "requirements-tasks.txt") from None
  if not os.path.isfile(path):
    raise TaskError(f"{path}: no such file")
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow's errors are many and unexported
    raise TaskError(f"{path}: not a readable Parquet file ({e})") from None
  for i, record in enumerate(table.to_pylist(), 1):
    yield f"{path}: row {i}", record


def require(record: Mapping[str, Any], field: str, where: str, kind=str):
  if field not in record:
    raise TaskError(f"{where}: missing field {field!r} (fields: {sorted(record)})")
  value = record[field]
  if not isinstance(value, kind):
    raise TaskError(f"{where}: field {field!r} must be {kind.__name__}, got "
                    f"{type(value).__name__}")
  return value
