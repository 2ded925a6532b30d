"""Evaluation metrics on a hand-built debate."""

import jax
import numpy as np
import pytest

from maft_jax import metrics, tasks
from maft_jax.debate import Debate


def _debate(task, problems, round1, final):
  def keys(r):
    return [[task.extract_answer(t) for t in slot] for slot in r]
  n, b = len(round1), len(problems)
  msgs = [[[[]] * b] * n] * 2
  finishes = [[["stop"] * b] * n] * 2
  return Debate(texts=[round1, final], keys=[keys(round1), keys(final)], messages=msgs,
                finishes=finishes)


def test_metrics_on_hand_built_debate():
  task = tasks.load("arithmetic", size=2, seed=0)
  p0, p1 = task.problems()
  r0, r1 = int(p0.reference), int(p1.reference)
  box = lambda v, words="so the answer is": f"{words} \\boxed{{{v}}}"  # noqa: E731
  round1 = [[box(r0), box(r1 + 1)],
            [box(r0 + 1, "we get the value"), box(r1 + 1)],
            [box(r0), "no idea"]]
  final = [[box(r0), box(r1)],
           [box(r0), box(r1 + 1)],
           [box(r0 + 5), box(r1)]]
  m = metrics.evaluate(_debate(task, [p0, p1], round1, final), task, [p0, p1],
                       jax.random.key(0))
  assert m["round1_accuracy"] == [0.5, 0.0, 0.5]
  assert m["final_accuracy"] == [1.0, 0.5, 0.5]
  assert m["debate_accuracy"] == 1.0                 # majorities: r0 (2 of 3), r1 (2 of 3)
  assert m["consensus_rate"] == pytest.approx(2 / 3)
  assert m["majority_accuracy"] == 0.5               # round 1: r0 wins, r1+1 wins
  assert m["best_of_n_accuracy"] == 0.5              # nobody had r1 in round 1
  assert m["distinct_answers"] == pytest.approx((2 + 1) / 2)
  # Every accuracy carries its binomial standard error over the 2 problems.
  for field in metrics.ACCURACIES:
    p = np.asarray(m[field])
    np.testing.assert_allclose(m[field + "_se"], np.sqrt(p * (1 - p) / 2))
  assert m["round1_accuracy_se"][1] == 0.0 and m["final_accuracy_se"][0] == 0.0
  # The generators' mean: its error is over problems (per-problem means 2/3 and 0).
  assert m["round1_mean_accuracy"] == pytest.approx(1 / 3)
  assert m["round1_mean_accuracy_se"] == pytest.approx(np.std([2 / 3, 0], ddof=1) / np.sqrt(2))
  # Problem 0: slots 0,2 share all 3-grams (1.0), slot 1 differs; problem 1: slots 0,1 identical.
  assert 0 < m["ngram_overlap"] < 1


def test_ngram_overlap_and_distinct():
  assert metrics.ngram_overlap([["a b c d"], ["a b c d"]]) == 1.0
  assert metrics.ngram_overlap([["a b c d"], ["w x y z"]]) == 0.0
  assert metrics.ngram_overlap([["a b c d"], ["a b c e"]]) == pytest.approx(1 / 3)
  assert metrics.distinct_answers(np.array([[0, -1], [1, -1], [0, 0]])) == 1.5
