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
}


def load(name: str, **options) -> Task:
  if name not in _REGISTRY:
    raise TaskError(f"unknown task {name!r}; tasks: {', '.join(sorted(_REGISTRY))}")
  import importlib
  module, cls = _REGISTRY[name]
  try:
    return getattr(importlib.import_module(module), cls)(**options)
  except TypeError as e:  # unknown option
    raise TaskError(f"task {name!r}: {e}") from None


__all__ = ["Problem", "Task", "TaskError", "load"]
