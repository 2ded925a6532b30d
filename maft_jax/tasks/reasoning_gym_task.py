"""Any `reasoning-gym` dataset, verified by the dataset's own scorer.

    tasks.load("reasoning_gym:basic_arithmetic", size=1000, seed=0)

The answer is the last `\\boxed{}` of a response; its whitespace-normalised
text is the vote key, and a response is correct when the dataset's
`score_answer` gives full marks (>= `min_score`).
"""

from __future__ import annotations

from maft_jax.tasks import answers
from maft_jax.tasks.base import Problem, Task, TaskError


def _rg():
  try:
    import reasoning_gym
  except ImportError:
    raise TaskError("reasoning_gym tasks need the reasoning-gym package: pip install -r "
                    "requirements-tasks.txt") from None
  return reasoning_gym


class ReasoningGym(Task):
  answer_format = "your final answer"

  def __init__(self, *, dataset: str, size: int = 1000, seed: int = 0, min_score: float = 1.0,
               **kw):
    super().__init__(**kw)
    rg = _rg()
    self.name = f"reasoning_gym:{dataset}"
    try:
      self._ds = rg.create_dataset(dataset, size=size, seed=seed)
    except Exception as e:  # reasoning-gym raises plain errors for unknown names/options
      raise TaskError(f"reasoning_gym:{dataset}: cannot create dataset ({e})") from None
    self.dataset, self.size, self.seed, self.min_score = dataset, size, seed, min_score

  def _all_problems(self):
    return [Problem(id=f"rg-{self.dataset}-{self.seed}-{i}", question=e["question"],
                    reference=str(e["answer"]), fields={"entry": e})
            for i, e in enumerate(self._ds)]

  def extract_answer(self, text: str) -> str | None:
    box = answers.last_boxed(text)
    return " ".join(box.split()) if box else None

  def is_correct(self, text: str, problem: Problem) -> bool:
    answer = self.extract_answer(text)
    if answer is None:
      return False
    return float(self._ds.score_answer(answer=answer, entry=problem.fields["entry"])) >= \
        self.min_score
