"""maft_jax.tasks.humaneval: canonical solutions pass in the sandbox and a wrong
completion fails."""

import pytest

from maft_jax import tasks


def test_humaneval_canonical_passes_and_wrong_fails():
  from maft_jax.tasks import sandbox
  try:
    task = tasks.load("humaneval", limits=sandbox.Limits(wall_seconds=20))
  except sandbox.SandboxUnavailable as e:
    pytest.skip(str(e))
  problems = task.problems()
  assert len(problems) == 164
  chosen = problems[:6]
  # Base-model style (continue the prompt) and chat style (a fenced whole function).
  texts = [p.reference for p in chosen]
  p0 = chosen[0]
  fenced = f"Here you go:\n```python\n{p0.question}{p0.reference}\n```\nDone."
  wrong = "    return None\n"
  verdicts = task.verdicts(texts + [fenced, wrong], chosen + [p0, p0])
  assert [v.passed for v in verdicts] == [True] * 7 + [False]
  assert verdicts[-1].status == "failed"
  assert task.is_correct_many([wrong, p0.reference], [p0, p0]) == [False, True]
  assert task.extract_answer("x = 1  # comment\n\n") == "x = 1"
