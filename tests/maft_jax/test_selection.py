"""The method's rules, recomputed independently on hand-built and random
debates: the consensus is the last round's majority alone, and D^G, D^C-,
D^C+ follow from it (`selection.select`); evaluation decides the same way
(`metrics.evaluate`). `expected_selection` is the rule written out in plain
Python; the end-to-end test applies it to the records a run wrote."""

import collections
import dataclasses
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from maft_jax import config, metrics, records, scoring, selection, tasks
from maft_jax.debate import Debate
from maft_jax.tasks import prompts

N, B = 3, 6


class _Tok:
  chat_template = None


def debate_of(task, problems, answers_RxNxB):
  """A debate whose slot n answers problem b in round r with
  `\\boxed{answers[r][n][b]}` (None: no answer; "R": the reference)."""
  def text(v, b):
    v = problems[b].reference if v == "R" else v
    return f"so \\boxed{{{v}}}" if v is not None else "no idea"
  texts = [[[text(v, b) for b, v in enumerate(slot)] for slot in per_round]
           for per_round in answers_RxNxB]
  n_slots = len(texts[0])
  msgs = [[[prompts.round1(p) for p in problems] for _ in range(n_slots)]]
  for r in range(1, len(texts)):
    msgs.append([[prompts.debate_round(p, own=texts[r - 1][n][b],
                                       others=[texts[r - 1][o][b] for o in range(n_slots)
                                               if o != n])
                  for b, p in enumerate(problems)] for n in range(n_slots)])
  keys = [[[task.extract_answer(t) for t in slot] for slot in r] for r in texts]
  finishes = [[["stop"] * len(problems) for _ in range(n_slots)] for _ in texts]
  return Debate(texts=texts, keys=keys, messages=msgs, finishes=finishes)


def majority_keys(final_keys_NxB):
  """Per problem: the set of answer keys with the most final-round votes
  (empty when nobody answered), and that count."""
  out = []
  for b in range(len(final_keys_NxB[0])):
    counts = collections.Counter(k[b] for k in final_keys_NxB if k[b] is not None)
    top = max(counts.values(), default=0)
    out.append(({k for k, c in counts.items() if c == top}, top))
  return out


def expected_selection(keys_RxNxB, consensus_B, critic_weight):
  """The paper's sets from the answer keys and the chosen consensus, as
  sets of problem indices per slot: (D^G, D^C-, D^C+, how many D^C+ a
  critic keeps). Answers are the same when their keys are equal."""
  first, last = keys_RxNxB[0], keys_RxNxB[-1]
  n_slots, n_problems = len(first), len(first[0])

  def agrees(key, b):
    return consensus_B[b] is not None and key == consensus_B[b]

  d_g = [{b for b in range(n_problems) if agrees(first[n][b], b)} for n in range(n_slots)]
  d_minus = [{b for b in range(n_problems) if not agrees(first[n][b], b) and agrees(last[n][b], b)}
             for n in range(n_slots)]
  d_plus = [{b for b in range(n_problems) if agrees(first[n][b], b) and agrees(last[n][b], b)}
            for n in range(n_slots)]
  w = critic_weight
  kept = [min(len(p), math.ceil(round(len(m) * (1 - w) / w, 6)) if m else
              math.ceil(round(len(p) * (1 - w), 6)))
          for m, p in zip(d_minus, d_plus)]
  return d_g, d_minus, d_plus, kept


def rows_problems(rows, problems):
  """Problem index of every row, per agent."""
  return [[next(b for b, p in enumerate(problems) if p.question in r["prompt"]) for r in agent]
          for agent in rows]


def check_selection(keys_RxNxB, got, summary, decided, critic_weight):
  """What select wrote follows from the transcript's keys: its consensus is
  a majority of the last round, and the rows are the rule's sets. `got`:
  the problem index of every row, per agent."""
  majorities = majority_keys(keys_RxNxB[-1])
  consensus = decided["consensus"]
  for b, (tops, top) in enumerate(majorities):
    assert (consensus[b] in tops) if tops else consensus[b] is None, (b, consensus[b], tops)
    assert decided["votes"][b] == top
  d_g, d_minus, d_plus, kept = expected_selection(keys_RxNxB, consensus, critic_weight)
  n_slots = len(keys_RxNxB[0])
  assert [set(g) for g in got[:n_slots]] == d_g
  assert [len(g) for g in got[:n_slots]] == [len(s) for s in d_g]   # one row per problem
  assert summary.d_g == [len(s) for s in d_g]
  assert summary.d_c_minus == [len(s) for s in d_minus]
  assert summary.d_c_plus == [len(s) for s in d_plus]
  assert summary.d_c_kept == kept
  for n, critic in enumerate(got[n_slots:]):
    assert d_minus[n] <= set(critic) <= d_minus[n] | d_plus[n]
    assert len(critic) == len(d_minus[n]) + kept[n] == len(set(critic))


@pytest.fixture(scope="module")
def arith():
  task = tasks.load("arithmetic", size=B, seed=0)
  return task, task.problems()[:B]


def _select(task, problems, d, seed=0, w=0.5, mode="paper"):
  return selection.select(d, problems, task, selection.Settings(mode=mode, critic_weight=w),
                          critics=True, tokenizer=_Tok(), key=jax.random.key(seed))


def test_new_final_answers_form_the_consensus(arith):
  task, problems = arith
  ref = [int(p.reference) for p in problems[:2]]
  A, Bv, C, D = 1000, 1001, 1002, ref[0]
  # Problem 0: round 1 A, B, C; final D, D, A -> D (the reference) with 2 votes,
  # not A with 1. Problem 1: a unanimous new final answer D' -> it, 3 votes.
  D1 = ref[1]
  answers = [[[A, A], [Bv, Bv], [C, C]],                 # round 1 [slot][problem]
             [[D, D1], [D, D1], [A, D1]]]                # final
  d = debate_of(task, problems[:2], answers)
  rows, summary, decided = _select(task, problems[:2], d)
  assert decided["consensus"] == [str(D), str(D1)] and decided["votes"] == [2, 3]
  assert decided["right"] == [True, True] and summary.consensus_accuracy == 1.0
  # No generator agreed in round 1; critics 0 and 1 corrected problem 0, all three problem 1.
  assert summary.d_g == [0, 0, 0]
  assert summary.d_c_minus == [2, 2, 1] and summary.d_c_plus == [0, 0, 0]
  m = metrics.evaluate(d, task, problems[:2], jax.random.key(0))
  assert m["debate_accuracy"] == 1.0 and m["consensus_rate"] == pytest.approx((2 + 3) / 6)
  assert m["majority_accuracy"] == 0.0 and m["best_of_n_accuracy"] == 0.0


answer = st.one_of(st.none(), st.just("R"), st.integers(1000, 1002))
wrong = st.one_of(st.none(), st.integers(1000, 1002))
new_answer = st.one_of(st.none(), st.just("R"), st.integers(2000, 2001))


@st.composite
def debates(draw):
  """answers[r][n][b]; in half of them the last round gives only answers
  that no earlier round gave (the case where critics changed their minds)."""
  rounds = draw(st.integers(2, 3))
  fresh = draw(st.booleans())
  grid = lambda s: [[draw(s) for _ in range(B)] for _ in range(N)]  # noqa: E731
  early, late = (wrong, new_answer) if fresh else (answer, answer)
  return [grid(early) for _ in range(rounds - 1)] + [grid(late)]


@given(answers=debates(), seed=st.integers(0, 2**16), w=st.sampled_from([0.5, 0.25, 0.8]))
@settings(max_examples=60, deadline=None)
def test_selection_follows_from_the_last_round_majority(arith, answers, seed, w):
  task, problems = arith
  d = debate_of(task, problems, answers)
  rows, summary, decided = _select(task, problems, d, seed=seed, w=w)
  check_selection(d.keys, rows_problems(rows, problems), summary, decided, w)
  for agent in rows[N:]:                 # a critic's rows are its last-round responses
    assert all("These are the solutions" in r["prompt"] for r in agent)
  # Evaluation decides by the same rule: without ties, the same majority is right.
  m = metrics.evaluate(d, task, problems, jax.random.key(seed))
  majorities = majority_keys(d.keys[-1])
  if all(len(tops) <= 1 for tops, _ in majorities):
    right = [bool(tops) and next(iter(tops)) == p.reference
             for (tops, _), p in zip(majorities, problems)]
    assert m["debate_accuracy"] == pytest.approx(np.mean(right))
    assert summary.consensus_accuracy == pytest.approx(np.mean(right))
    assert decided["right"] == right


def test_ties_are_seeded_and_every_tied_answer_can_win(arith):
  task, problems = arith
  answers = [[[1] * B, [2] * B, [3] * B], [[7] * B, [8] * B, [None] * B]]
  d = debate_of(task, problems, answers)
  winners = set()
  for seed in range(12):
    _, _, decided = _select(task, problems, d, seed=seed)
    assert set(decided["consensus"]) <= {"7", "8"}
    winners |= set(decided["consensus"])
    again = _select(task, problems, d, seed=seed)[2]
    assert again == decided
  assert winners == {"7", "8"}


# --- the three selection modes on one hand-built debate ------------------------

@pytest.fixture
def hand_built():
  task = tasks.load("arithmetic", size=4, seed=0)
  problems = task.problems()[:4]
  ref = [int(p.reference) for p in problems]
  # 3 slots x 4 problems. Final round: problem 0 -> 2 of 3 say ref; problem 1 ->
  # all wrong (same wrong answer); problem 2 -> slot 2 alone is right, 0 and 1 agree on
  # a wrong answer; problem 3 -> everyone right.
  round1 = [[ref[0], ref[1] + 1, ref[2] + 1, ref[3]],
            [ref[0] + 1, ref[1] + 1, ref[2] + 1, ref[3]],
            [ref[0] + 2, None, ref[2], ref[3]]]
  final = [[ref[0], ref[1] + 1, ref[2] + 1, ref[3]],
           [ref[0], ref[1] + 1, ref[2] + 1, ref[3]],
           [ref[0] + 2, ref[1] + 1, ref[2], ref[3]]]
  return task, problems, debate_of(task, problems, [round1, final])


def _settings(mode, **kw):
  return selection.Settings(mode=mode, **kw)


def test_paper_selection_rows(hand_built):
  task, problems, d = hand_built
  rows, summary, _ = selection.select(d, problems, task, _settings("paper", critic_weight=0.5),
                                      critics=True, tokenizer=_Tok(), key=jax.random.key(0))
  # Consensus (final round): p0 ref, p1 ref+1 (wrong), p2 ref+1 (wrong), p3 ref.
  assert summary.consensus_accuracy == 0.5
  # Generators keep their own round-1 answers that agree with consensus.
  assert rows_problems(rows[:3], problems) == [[0, 1, 2, 3], [1, 2, 3], [3]]
  # Critic n: D^C- = round-1 slot n disagreed, final agrees; D^C+ kept by weight.
  # Critic 1 corrected p0, critic 2 p1 (no round-1 answer -> the consensus).
  assert summary.d_c_minus == [0, 1, 1] and summary.d_c_plus == [4, 3, 1]
  # With corrections, |D^C-|(1-w)/w = 1 D^C+ transcript joins; without, half of D^C+.
  assert summary.d_c_kept == [2, 1, 1] and summary.selected == [4, 3, 1, 2, 2, 2]
  # A critic's rows are its own final-round responses to its own transcript.
  for r in rows[3]:
    assert "These are the solutions" in r["prompt"] and r["completion"].startswith("so \\boxed")
    assert r["add_special_tokens"] and r["append_eos"]


def test_ground_truth_selection_rows(hand_built):
  task, problems, d = hand_built
  rows, summary, _ = selection.select(d, problems, task, _settings("ground_truth"),
                                      critics=True, tokenizer=_Tok(), key=jax.random.key(0))
  assert rows_problems(rows[:3], problems) == [[0, 3], [3], [2, 3]]
  assert summary.d_c_minus == [0, 1, 0] and summary.d_c_plus == [2, 1, 2]


def test_cross_agent_selection_copies_follow_the_weights(hand_built):
  task, problems, d = hand_built
  N, B = 3, len(problems)
  rng = np.random.default_rng(0)
  nll = rng.uniform(0.5, 3.0, size=(2 * N, N, B))  # [scorer, author, problem]

  def score(texts):
    assert len(texts) == N and len(texts[0]) == B
    return nll, np.ones_like(nll, dtype=np.int32)

  rows, summary, _ = selection.select(d, problems, task, _settings("cross_agent"), critics=True,
                                      tokenizer=_Tok(), key=jax.random.key(3), score=score)
  correct = np.array([[task.is_correct(t, p) for t, p in zip(slot, problems)]
                      for slot in d.texts[0]])
  w = np.asarray(scoring.cross_agent_weights(correct, nll[:N]))
  for a in range(N):
    got = {}
    for r in rows[a]:
      got[(r["prompt"], r["completion"])] = got.get((r["prompt"], r["completion"]), 0) + 1
    # Every response an agent trains on is verified; copies are floor(w) or ceil(w).
    for src in range(N):
      for b in range(B):
        text = d.texts[0][src][b]
        n = sum(c for (p, t), c in got.items() if t == text and problems[b].question in p)
        same = [s for s in range(N) if d.texts[0][s][b] == text]
        lo = sum(int(np.floor(w[a, s, b])) for s in same)
        hi = sum(int(np.ceil(w[a, s, b])) for s in same)
        assert lo <= n <= hi, (a, src, b, n, lo, hi)
  # An agent's own verified responses are always kept.
  for a in range(N):
    for b in range(B):
      if correct[a, b]:
        assert any(r["completion"] == d.texts[0][a][b] for r in rows[a])
  assert summary.selected[:N] == [len(r) for r in rows[:N]]


def check_stage_records(workdir, iteration, critic_weight, tokenizer=None):
  """The select stage's files of `iteration` follow from the debate stage's
  transcript: each row is one slot's own response as the transcript holds
  it (round 1 for generators, the last round for critics), and the rows,
  the counts and the consensus obey `check_selection`."""
  import json
  import os
  it = os.path.join(workdir, f"iter_{iteration:02d}")
  with open(os.path.join(it, "debate", "debate.json")) as f:
    d = json.load(f)
  with open(os.path.join(it, "select", "consensus.json")) as f:
    decided = json.load(f)
  summary = records.read_summary(os.path.join(it, "select", "summary.json"), iteration,
                                 "select").data
  assert decided["problem_ids"] == d["problem_ids"]
  n_slots, last = len(d["texts"][0]), len(d["texts"]) - 1
  got = []
  for a in range(2 * n_slots):
    r = 0 if a < n_slots else last
    n = a % n_slots
    with open(os.path.join(it, "select", f"agent_{a}.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    where = {(prompts.to_text(m, tokenizer)[0], d["texts"][r][n][b]): b
             for b, m in enumerate(d["messages"][r][n])}
    got.append([where[(row["prompt"], row["completion"])] for row in rows])
  check_selection(d["keys"], got, summary, decided, critic_weight)



def test_star_trains_on_verified_rationales_without_the_hint(arith):
  task, problems = arith
  # One agent: right on problems 0, 1; wrong on 2, 3 (rationalised: right on 2
  # with the hint, still wrong on 3); no answer on 4, 5 (rationalised: right on 4).
  answers = [[["R", "R", 1000, 1001, None, None]]]
  d = debate_of(task, problems, answers)
  hinted = {2: "R", 3: 1002, 4: "R"}
  texts = [[None] * B]
  messages = [[None] * B]
  for b, v in hinted.items():
    texts[0][b] = f"so \\boxed{{{problems[b].reference if v == 'R' else v}}}"
    messages[0][b] = prompts.with_hint(problems[b])
  d = dataclasses.replace(d, rationales={
      "texts": texts, "messages": messages, "keys": [[None] * B],
      "finishes": [["stop" if t else None for t in texts[0]]]})
  (rows,), summary, _ = selection.select(d, problems, task, _settings("star"), critics=False,
                                         tokenizer=_Tok(), key=jax.random.key(0))
  assert sorted(rows_problems([rows], problems)[0]) == [0, 1, 2, 4]
  for row in rows:
    assert "Hint" not in row["prompt"] and row["prompt"].startswith("Can you solve")
    b = rows_problems([[row]], problems)[0][0]
    assert task.is_correct(row["completion"], problems[b])
  assert summary.d_g == [2] and summary.rationalized == [3]
  assert summary.rationales_kept == [2]
  # STaR restarts from the base and has no critics; the config says so.
  with pytest.raises(config.ConfigError, match="finetune.init='base'"):
    config.validate({"model": {"source": "demo"}, "agents": {"generators": 1, "critics": False},
                   "selection": {"mode": "star"}})


def test_the_voting_round_founds_its_own_classes(arith):
  """With a relation that is not transitive (here: numbers at most 1 apart),
  another round's answer must not merge two answers of the voting round:
  round 1 says 5, the last round 4, 6, None -> a tie of two classes with a
  vote each, not one class of 2 votes founded by round 1's 5."""
  from maft_jax import verdict

  class Near(type(arith[0])):
    def same_answer(self, a, b):
      return abs(int(a) - int(b)) <= 1

  task, problems = Near(size=B), arith[1][:1]
  d = debate_of(task, problems, [[[5], [5], [5]], [[4], [6], [None]]])
  v = verdict.judge(d, task, problems)
  vote = v.vote(-1, jax.random.key(0))
  assert vote.votes_B.tolist() == [1] and vote.keys_B[0] in ("4", "6")
  assert vote.agree_RxNxB[-1, :, 0].sum() == 1               # only the winner itself
  # Round 1's 5 joins the first class it is near (4's): it agrees iff 4 won.
  assert vote.agree_RxNxB[0, :, 0].tolist() == [vote.keys_B[0] == "4"] * 3
  assert {v.vote(-1, jax.random.key(s)).keys_B[0] for s in range(8)} == {"4", "6"}
