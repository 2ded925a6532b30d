"""maft_jax.tasks.reasoning_gym_task: grading uses reasoning-gym's own scorer."""

import pytest

from maft_jax import tasks
from maft_jax.tasks.base import TaskError


def test_reasoning_gym_uses_its_scorer():
  task = tasks.load("reasoning_gym:basic_arithmetic", size=20, seed=1)
  problems = task.problems()
  assert len(problems) == 20 and len({p.id for p in problems}) == 20
  p = problems[0]
  assert task.is_correct(f"so \\boxed{{{p.reference}}}", p)
  assert not task.is_correct(r"\boxed{not a number}", p)
  assert not task.is_correct(p.reference, p)  # unboxed: no answer
  with pytest.raises(TaskError, match="reasoning_gym:no_such_dataset"):
    tasks.load("reasoning_gym:no_such_dataset")
