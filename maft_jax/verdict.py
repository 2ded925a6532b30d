"""What a debate decided, in its task's answer relation.

    v = verdict.judge(debate, task, problems)   # host: answer classes and grades
    vote = v.vote(round_index, key)              # the majority of one round alone

`judge` numbers each problem's answers of every round together with
`Task.answer_classes`, so an answer that first appears in the last round
gets a class of its own and the answers of round 1 are compared with it in
the relation votes use, and grades every answer against its reference
(`Task.is_correct_many`, the same relation). `vote` takes the majority of
one round's answers alone (`scoring.consensus`, seeded ties) and marks the
answers of every round that agree with it. Selection (`loop.select`) and
evaluation (`metrics.evaluate`) both decide through this module, so what a
debate is said to have concluded is the same in training and in the records.

A class is graded by its representative (its first member, in round then
slot order): for a relation that is equality this is every member's grade.
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
  keys_RxNxB: list[list[list[str | None]]]
  classes_RxNxB: np.ndarray        # i32, -1 = no answer; one id space per problem
  correct_RxNxB: np.ndarray        # bool: each answer verified against the reference

  def vote(self, round_index: int, key: jax.Array) -> Vote:
    classes = self.classes_RxNxB
    consensus, votes = (np.asarray(x) for x in scoring.consensus(classes[round_index], key))
    agree = np.asarray(scoring.agreement(classes, consensus))
    R, N, B = classes.shape
    # The representative: the first answer (round-major, then slot) in the class.
    flat = classes.reshape(R * N, B)
    first = np.argmax(flat == consensus[None, :], axis=0)
    has = consensus >= 0
    right = has & self.correct_RxNxB.reshape(R * N, B)[first, np.arange(B)]
    keys = [self.keys_RxNxB[first[b] // N][first[b] % N][b] if has[b] else None
            for b in range(B)]
    return Vote(consensus_B=consensus, votes_B=votes, keys_B=keys, right_B=right,
                agree_RxNxB=agree)


def judge(debate, task: Task, problems: Sequence[Problem]) -> Verdict:
  """Answer classes and grades of every round of `debate` (see the module
  docstring). Keys are the debate's own (`Debate.keys`, as its transcript
  records them)."""
  R, N, B = debate.num_rounds, len(debate.texts[0]), len(problems)
  classes = np.full((R, N, B), scoring.NO_ANSWER, np.int32)
  for b in range(B):
    ids = task.answer_classes([debate.keys[r][n][b] for r in range(R) for n in range(N)])
    classes[:, :, b] = np.asarray(ids, np.int32).reshape(R, N)
  texts = [t for per_round in debate.texts for slot in per_round for t in slot]
  correct = np.asarray(task.is_correct_many(texts, list(problems) * (R * N)), bool)
  return Verdict(keys_RxNxB=debate.keys, classes_RxNxB=classes,
                 correct_RxNxB=correct.reshape(R, N, B))


def standard_error(p, n: int):
  """Binomial standard error sqrt(p (1 - p) / n) of an accuracy `p` (a number
  or an array) measured on `n` problems."""
  p = np.asarray(p, np.float64)
  return np.sqrt(p * (1 - p) / max(n, 1))
