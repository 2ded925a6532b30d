"""Tasks: problem sources, answer keys, verifiers and prompts.

    task = maft_jax.tasks.load("gsm8k", path="train.jsonl")
    split = task.split(train_size=500, test_size=500)   # seeded, exact, disjoint by id
    task.extract_answer(text); task.same_answer(a, b); task.is_correct(text, problem)

Task-specific packages are imported where a task is built, never here.
"""

from __future__ import annotations

from maft_jax.tasks.base import Problem, Task, TaskError

_REGISTRY = {
    "arithmetic": ("maft_jax.tasks.arithmetic", "Arithmetic"),
    "gsm8k": ("maft_jax.tasks.gsm8k", "GSM8K"),
    "math": ("maft_jax.tasks.math", "MATH"),
    "multiple_choice": ("maft_jax.tasks.multiple_choice", "MultipleChoice"),
    "humaneval": ("maft_jax.tasks.humaneval", "HumanEval"),
}


def load(name: str, **options) -> Task:
  """A task by name; `reasoning_gym:<dataset>` selects any reasoning-gym dataset."""
  import importlib
  if name.startswith("reasoning_gym:"):
    module, cls, fixed = "maft_jax.tasks.reasoning_gym_task", "ReasoningGym", {
        "dataset": name.split(":", 1)[1]}
  elif name in _REGISTRY:
    (module, cls), fixed = _REGISTRY[name], {}
  else:
    raise TaskError(f"unknown task {name!r}; tasks: {', '.join(sorted(_REGISTRY))}, "
                    "reasoning_gym:<dataset>")
  task_class = getattr(importlib.import_module(module), cls)
  known = option_names(task_class) - set(fixed)
  unknown = sorted(set(options) - known)
  if unknown:
    raise TaskError(f"task {name!r} has no option {', '.join(unknown)}; its options: "
                    f"{', '.join(sorted(known))}")
  try:
    return task_class(**fixed, **options)
  except (TypeError, ValueError) as e:  # an option of the wrong type
    raise TaskError(f"task {name!r}: {e}") from None


def option_names(task_class) -> set[str]:
  """The keyword options a task class accepts (its own and its bases')."""
  import inspect
  names = set()
  for klass in task_class.__mro__:
    if "__init__" in vars(klass) and issubclass(klass, Task):
      names |= {p.name for p in inspect.signature(klass.__init__).parameters.values()
                if p.kind == p.KEYWORD_ONLY}
  return names


__all__ = ["Problem", "Task", "TaskError", "load"]
