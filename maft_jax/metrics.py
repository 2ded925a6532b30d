"""Evaluation metrics of a debate on held-out problems.

    evaluate(debate, task, problems, key) -> dict of floats and per-agent lists

- round1_accuracy[n]: slot n's round-1 answers verified against references
- final_accuracy[n]:  slot n's last-round answers
- debate_accuracy:    the majority vote of the last round (seeded ties) is right
- majority_accuracy:  the majority vote of round 1 is right (the "majority
                      vote" baseline: N samples, no debate)
- best_of_n_accuracy: some round-1 answer is right (best-of-N with a verifier)
- consensus_rate:     mean fraction of slots that agree with that majority
- distinct_answers:   mean number of distinct answers per problem, round 1
                      (in the task's answer relation)
- ngram_overlap:      mean pairwise Jaccard similarity of word 3-gram sets
                      between different agents' round-1 responses to a problem
                      (lower = more diverse reasoning)

Votes and grades come from `verdict` (the task's one answer relation). Every
accuracy X has X_se beside it: the binomial standard error sqrt(p(1-p)/n)
over the n problems scored (per agent for the per-agent lists).
round1_mean_accuracy (the generators' mean) has the standard error of a mean
over problems of their per-problem mean correctness (`mean_with_error`).

The cross-agent NLL matrix (`scoring.text_nll`) needs the model and is
computed by the eval stage beside these (`stages.eval_debate`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import numpy as np

from maft_jax import verdict
from maft_jax.tasks.base import Problem, Task


def ngrams(text: str, n: int = 3) -> set[tuple[str, ...]]:
  words = text.split()
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def ngram_overlap(texts_NxB: Sequence[Sequence[str]], n: int = 3) -> float:
  """Mean over problems and agent pairs of |A ∩ B| / |A ∪ B| of n-gram sets
  (pairs where both responses are shorter than n words are skipped)."""
  scores = []
  for b in range(len(texts_NxB[0])):
    grams = [ngrams(texts_NxB[a][b], n) for a in range(len(texts_NxB))]
    for x, y in itertools.combinations(grams, 2):
      if x or y:
        scores.append(len(x & y) / len(x | y))
  return float(np.mean(scores)) if scores else 0.0


def distinct_answers(classes_NxB: np.ndarray) -> float:
  """Mean number of distinct answers per problem (answer classes, -1 = none)."""
  classes_NxB = np.asarray(classes_NxB)
  return float(np.mean([len({c for c in classes_NxB[:, b] if c >= 0})
                        for b in range(classes_NxB.shape[1])]))


ACCURACIES = ("round1_accuracy", "final_accuracy", "debate_accuracy", "majority_accuracy",
              "best_of_n_accuracy")


def binomial_se(p: float, n: int) -> float:
  """sqrt(p (1 - p) / n): the standard error of an accuracy p over n problems."""
  return math.sqrt(p * (1 - p) / n)


def with_errors(result: dict, n: int) -> dict:
  """`result` plus `<field>_se`, the binomial standard error sqrt(p(1-p)/n),
  for every accuracy field (a number or a per-agent list) measured on `n`
  problems."""
  out = dict(result)
  for field in ACCURACIES:
    if field in result:
      v = result[field]
      out[field + "_se"] = [binomial_se(x, n) for x in v] if isinstance(v, list) else \
          binomial_se(v, n)
  return out


def mean_with_error(correct_NxB: np.ndarray) -> tuple[float, float]:
  """The mean accuracy of N agents over B problems, and its standard error
  over problems: the standard deviation of the per-problem mean correctness
  over sqrt(B). The agents answer the same problems, so their answers are
  not N x B independent trials."""
  per_problem = np.asarray(correct_NxB, np.float64).mean(axis=0)
  B = per_problem.size
  se = float(per_problem.std(ddof=1) / np.sqrt(B)) if B > 1 else 0.0
  return float(per_problem.mean()), se


def evaluate(debate, task: Task, problems: Sequence[Problem], key: jax.Array) -> dict:
  """Metrics of one debate (see the module docstring)."""
  N = len(debate.texts[0])
  v = verdict.judge(debate, task, problems)
  final = v.vote(-1, key)
  majority = v.vote(0, jax.random.fold_in(key, 1))
  first, last = v.correct_RxNxB[0], v.correct_RxNxB[-1]
  mean, mean_se = mean_with_error(first)
  return with_errors({
      "round1_mean_accuracy": mean, "round1_mean_accuracy_se": mean_se,
      "round1_accuracy": first.mean(axis=1).tolist(),
      "final_accuracy": last.mean(axis=1).tolist(),
      "debate_accuracy": float(final.right_B.mean()),
      "majority_accuracy": float(majority.right_B.mean()),
      "best_of_n_accuracy": float(first.any(axis=0).mean()),
      "consensus_rate": float((final.votes_B / N).mean()),
      "distinct_answers": distinct_answers(v.classes(0)[0]),
      "ngram_overlap": ngram_overlap(debate.texts[0]),
  }, len(problems))
