"""Tasks: problem sources, answer keys, verifiers and prompts.

    task = maft_jax.tasks.load("gsm8k", path="train.jsonl")
    task.problems("train"); task.extract_answer(text); task.is_correct(text, problem)

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
  if name.startswith("reasoning_gym:"):
    from maft_jax.tasks.reasoning_gym_task import ReasoningGym
    try:
      return ReasoningGym(dataset=name.split(":", 1)[1], **options)
    except TypeError as e:
      raise TaskError(f"task {name!r}: {e}") from None
  if name not in _REGISTRY:
    raise TaskError(f"unknown task {name!r}; tasks: {', '.join(sorted(_REGISTRY))}, "
                    "reasoning_gym:<dataset>")
  import importlib
  module, cls = _REGISTRY[name]
  try:
    return getattr(importlib.import_module(module), cls)(**options)
  except TypeError as e:  # unknown option
    raise TaskError(f"task {name!r}: {e}") from None


__all__ = ["Problem", "Task", "TaskError", "load"]
