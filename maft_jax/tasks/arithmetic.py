"""The paper's arithmetic task: `a+b*c+d-e*f` with values 0..30, seeded."""

from __future__ import annotations

import numpy as np

from maft_jax.tasks import answers
from maft_jax.tasks.base import Problem, Task, TaskError


def make_problem(seed: int, index: int, max_value: int = 30) -> Problem:
  """Problem `index` of stream `seed`: independent of how many are generated."""
  rng = np.random.default_rng([seed, index])
  a, b, c, d, e, f = (int(x) for x in rng.integers(0, max_value + 1, 6))
  value = a + b * c + d - e * f
  return Problem(id=f"arithmetic-{seed}-{index}",
                 question=f"What is the result of {a}+{b}*{c}+{d}-{e}*{f}?",
                 reference=str(value), fields={"operands": (a, b, c, d, e, f)})


class Arithmetic(Task):
  name = "arithmetic"

  def __init__(self, *, size: int = 1000, seed: int = 0, max_value: int = 30, **kw):
    super().__init__(**kw)
    if size < 1:
      raise TaskError(f"arithmetic: size={size} must be >= 1")
    self.size, self.seed, self.max_value = size, seed, max_value

  def _all_problems(self):
    return [make_problem(self.seed, i, self.max_value) for i in range(self.size)]

  def extract_answer(self, text: str) -> str | None:
    return answers.numeric_answer(text)
