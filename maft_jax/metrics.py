"""Evaluation metrics of a debate on held-out problems.

    evaluate(debate, task, problems, key) -> dict of floats and per-agent lists

- round1_accuracy[n]: slot n's round-1 answers verified against references
- final_accuracy[n]:  slot n's last-round answers
- debate_accuracy:    the majority vote of the last round (seeded ties) is right
- majority_accuracy:  the majority vote of round 1 is right (the "majority
                      vote" baseline: N samples, no debate)
- best_of_n_accuracy: some round-1 answer is right (best-of-N with a verifier)
- consensus_rate:     mean fraction of slots that agree with that majority
- distinct_answers:   mean number of distinct answer keys per problem, round 1
- ngram_overlap:      mean pairwise Jaccard similarity of word 3-gram sets
                      between different agents' round-1 responses to a problem
                      (lower = more diverse reasoning)

The cross-agent NLL matrix (`scoring.cross_nll`) needs the model and is
computed by the loop beside these.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import numpy as np

from maft_jax import scoring
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


def distinct_answers(keys_NxB: Sequence[Sequence[str | None]]) -> float:
  """Mean number of distinct non-empty answer keys per problem."""
  return float(np.mean([len({k[b] for k in keys_NxB if k[b] is not None})
                        for b in range(len(keys_NxB[0]))]))


def evaluate(debate, task: Task, problems: Sequence[Problem], key: jax.Array) -> dict:
  """Metrics of one debate (see the module docstring)."""
  N, B = len(debate.texts[0]), len(problems)
  flat = list(problems) * N

  def correct(round_index: int) -> np.ndarray:
    texts = [t for slot in debate.texts[round_index] for t in slot]
    return np.asarray(task.is_correct_many(texts, flat), bool).reshape(N, B)

  first, last = correct(0), correct(-1)

  def vote(keys, ok, vote_key):
    """(majority right bool[B], votes for the majority [B])."""
    ids, _ = scoring.answer_ids(keys)
    majority, votes = (np.asarray(x) for x in scoring.consensus(ids, vote_key))
    # The majority answer is right when an agent holding it was verified right.
    right = np.array([bool(majority[b] >= 0 and any(ok[n, b] for n in range(N)
                                                    if ids[n, b] == majority[b]))
                      for b in range(B)])
    return right, votes

  debate_right, votes = vote(debate.keys[-1], last, key)
  first_right, _ = vote(debate.keys[0], first, jax.random.fold_in(key, 1))
  return {
      "round1_accuracy": first.mean(axis=1).tolist(),
      "final_accuracy": last.mean(axis=1).tolist(),
      "debate_accuracy": float(debate_right.mean()),
      "majority_accuracy": float(first_right.mean()),
      "best_of_n_accuracy": float(first.any(axis=0).mean()),
      "consensus_rate": float((votes / N).mean()),
      "distinct_answers": distinct_answers(debate.keys[0]),
      "ngram_overlap": ngram_overlap(debate.texts[0]),
  }
