"""maft_jax.tasks (base and the registry): splits are exact, disjoint, seeded and
the same in another process; unknown tasks and options are refused."""

import json
import subprocess
import sys

import pytest

from maft_jax import tasks
from maft_jax.tasks import base
from maft_jax.tasks.base import TaskError


def test_split_sizes_are_exact_disjoint_seeded_and_the_same_in_another_process():
  task = tasks.load("arithmetic", size=1200, seed=3)
  split = task.split(train_size=500, test_size=500)
  train, test = [p.id for p in split.train], [p.id for p in split.test]
  assert len(train) == 500 and len(test) == 500 and not set(train) & set(test)
  code = ("from maft_jax import tasks; import json; s = tasks.load('arithmetic', size=1200, "
          "seed=3).split(500, 500); print(json.dumps([[p.id for p in s.train], "
          "[p.id for p in s.test]]))")
  other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert json.loads(other.stdout) == [train, test]
  assert task.split(500, 500) == split                     # a second run
  # A shuffle, not the file order; its seed is a task option.
  assert test != [p.id for p in task.problems()[:500]]
  reseeded = tasks.load("arithmetic", size=1200, seed=3, split_seed=1).split(500, 500)
  assert [p.id for p in reseeded.test] != test
  # The file's order does not matter: the order is a hash of (seed, id).
  reversed_split = base.split_problems(task.problems()[::-1], 500, 500, seed=0)
  assert reversed_split == split
  # A source smaller than both: divided in the ratio, at least one each.
  small = tasks.load("arithmetic", size=10).split(train_size=500, test_size=500)
  assert (len(small.train), len(small.test)) == (5, 5)
  small = tasks.load("arithmetic", size=10).split(train_size=8, test_size=1)
  assert (len(small.train), len(small.test)) == (8, 1)


def test_unknown_task_and_option():
  with pytest.raises(TaskError, match="unknown task 'nope'; tasks: arithmetic, gsm8k, humaneval, math"):
    tasks.load("nope")
  with pytest.raises(TaskError, match="task 'arithmetic' has no option colour; its options: "
                     "max_value, seed, size, split_seed"):
    tasks.load("arithmetic", colour=1)
