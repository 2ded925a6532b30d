"""What a debate decided, in its task's answer relation.

    v = verdict.judge(debate, task, problems)   # host: answer classes and grades
    vote = v.vote(round_index, key)              # the majority of one round alone

`judge` grades every answer against its reference (`Task.is_correct_many`).
`vote(round, key)` takes the majority of one round's answers alone: it
numbers each problem's answers of every round in one id space with the
task's relation (`Task.answer_classes`, the voting round's answers first, so
they found their classes themselves), takes the seeded majority of the
voting round (`scoring.consensus`), and marks the answers of every round in
the majority's class: so an answer that first appears in the last round has
a class of its own, and round-1 answers are compared with it in the relation
grading uses. Selection (`selection.select`) and evaluation (`metrics.evaluate`)
both decide through this module, so what a debate is said to have concluded
is the same in training and in the records.

The majority's class is graded by its representative (the voting round's
first answer in it): for a relation that is equality this is every member's
grade.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from maft_jax import scoring
from maft_jax.tasks.base import Problem, Task


@dataclasses.dataclass(frozen=True)
class Vote:
  """The majority of one round: per problem its class (-1: nobody answered),
  its votes, its representative key, whether it is right, and which answers
  of every round agree with it."""
  consensus_B: np.ndarray          # i32
  votes_B: np.ndarray              # i32
  keys_B: list[str | None]
  right_B: np.ndarray              # bool
  agree_RxNxB: np.ndarray          # bool


@dataclasses.dataclass(frozen=True)
class Verdict:
  task: Task
  keys_RxNxB: list[list[list[str | None]]]
  correct_RxNxB: np.ndarray        # bool: each answer verified against the reference

  def classes(self, round_index: int) -> np.ndarray:
    """i32[R, N, B]: per problem, the answers of every round numbered in one
    id space (-1: no answer), the answers of `round_index` first, so that
    its classes are founded by its own answers alone (a relation that is not
    transitive cannot merge two of them through another round's answer) and
    the other rounds' answers join them, or classes of their own."""
    R, N, B = len(self.keys_RxNxB), len(self.keys_RxNxB[0]), len(self.keys_RxNxB[0][0])
    order = [round_index % R] + [r for r in range(R) if r != round_index % R]
    out = np.full((R, N, B), scoring.NO_ANSWER, np.int32)
    for b in range(B):
      ids = self.task.answer_classes([self.keys_RxNxB[r][n][b] for r in order for n in range(N)])
      out[order, :, b] = np.asarray(ids, np.int32).reshape(R, N)
    return out

  def vote(self, round_index: int, key: jax.Array) -> Vote:
    classes = self.classes(round_index)
    consensus, votes = (np.asarray(x) for x in scoring.consensus(classes[round_index], key))
    agree = np.asarray(scoring.agreement(classes, consensus))
    N, B = classes.shape[1:]
    # The representative: the first slot of the voting round in the class.
    first = np.argmax(classes[round_index] == consensus[None, :], axis=0)
    has = consensus >= 0
    right = has & self.correct_RxNxB[round_index][first, np.arange(B)]
    keys = [self.keys_RxNxB[round_index][first[b]][b] if has[b] else None for b in range(B)]
    return Vote(consensus_B=consensus, votes_B=votes, keys_B=keys, right_B=right,
                agree_RxNxB=agree)


def judge(debate, task: Task, problems: Sequence[Problem]) -> Verdict:
  """Grades of every answer of `debate`, and its keys for the votes (see the
  module docstring). Keys are the debate's own (`Debate.keys`, as its
  transcript records them)."""
  R, N, B = debate.num_rounds, len(debate.texts[0]), len(problems)
  texts = [t for per_round in debate.texts for slot in per_round for t in slot]
  correct = np.asarray(task.is_correct_many(texts, list(problems) * (R * N)), bool)
  return Verdict(task=task, keys_RxNxB=debate.keys, correct_RxNxB=correct.reshape(R, N, B))
