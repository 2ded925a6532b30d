"""maft_jax.tasks.math: math-verify equivalence, one relation for votes and
grades, keys, levels and worker threads, bad records."""

import dataclasses
import json

import pytest

from maft_jax import tasks
from maft_jax.tasks import answers
from maft_jax.tasks.base import TaskError


MATH_RECORDS = [
    {"problem": "Compute 1/2.", "solution": r"It is $\boxed{\frac{1}{2}}$.", "level": "Level 1",
     "type": "Algebra"},
    {"problem": "Simplify sqrt(8).", "solution": r"$\sqrt{8} = \boxed{2\sqrt{2}}$",
     "level": "Level 3", "type": "Algebra"},
    {"problem": "Solve x+1=3.", "solution": r"So $x = \boxed{2}$.", "level": "Level 5",
     "type": "Algebra"},
    {"problem": "Interval?", "solution": r"$\boxed{\left(1, 2\right)}$", "level": "Level ?",
     "type": "Algebra"},
]


@pytest.fixture
def math_task(tmp_path):
  path = tmp_path / "math.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in MATH_RECORDS))
  return tasks.load("math", path=str(path))


@pytest.mark.parametrize("index,response,correct", [
    (0, r"... \boxed{0.5}", True),
    (0, r"... \boxed{\dfrac{1}{2}}", True),
    (0, r"... \boxed{\frac{2}{4}}", True),
    (0, r"\boxed{\frac{1}{2}} no wait \boxed{\frac{1}{3}}", False),  # last box wins
    (1, r"\boxed{\sqrt{8}}", True),
    (1, r"\boxed{2 \sqrt 2}", True),
    (1, r"\boxed{3\sqrt{2}}", False),
    (2, "x equals 2 but I never boxed it", False),
    (3, r"\boxed{(1,2)}", True),
])
def test_math_equivalence(math_task, index, response, correct):
  problem = math_task.problems()[index]
  assert math_task.is_correct(response, problem) is correct


@pytest.mark.parametrize("a,b,same", [
    ("3x", "3", False), ("3i", "3", False), ("x=5", "5", True), ("2(x+1)", "2x+2", True),
    (r"\frac{1}{2}", "0.5", True), (r"\dfrac12", "1/2", True), ("1,000", "1000", True),
    (r"2\sqrt{2}", r"3\sqrt{2}", False), (r"2\sqrt{2}", r"\sqrt{8}", True),
])
def test_math_votes_and_grades_in_one_relation(math_task, a, b, same):
  """Two boxed answers vote together exactly when grading calls them the same."""
  key = math_task.extract_answer
  ka, kb = key(rf"so \boxed{{{a}}}"), key(rf"\boxed {{{b}}}.")
  assert (math_task.answer_classes([ka, kb]) == [0, 0]) is same
  problem = dataclasses.replace(math_task.problems()[0], reference=a)
  assert math_task.is_correct(rf"\boxed{{{b}}}", problem) is same


def test_math_keys_levels_and_threads(math_task, tmp_path):
  key = math_task.extract_answer
  assert key("nothing boxed") is None and key(r"\boxed{}") is None
  assert key(r"\boxed {5}") == "5"
  # A last box that never closes is no answer, even after a closed one.
  assert key(r"\boxed{4} no, it is \boxed{\frac{5}{") is None
  assert answers.numeric_answer(r"\boxed{4} no, it is \boxed{5") is None
  path = tmp_path / "m.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in MATH_RECORDS))
  assert [p.fields["level"] for p in tasks.load("math", path=str(path), levels="1,5")
          .problems()] == [1, 5]
  # math-verify's default timeout uses signals: it must work off the main thread.
  from concurrent.futures import ThreadPoolExecutor
  problems = math_task.problems()
  with ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda p: math_task.is_correct(r"\boxed{0.5}", p), problems))
  assert results == [True, False, False, False]


def test_math_bad_records(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"problem": "p", "solution": "no box", "level": "Level 1"}) + "\n")
  with pytest.raises(TaskError, match=r"bad.jsonl:1: field 'solution' has no \\boxed"):
    tasks.load("math", path=str(path)).problems()
  with pytest.raises(TaskError, match="levels are 1..5"):
    tasks.load("math", path=str(path), levels="7")
