"""Selection: each agent's finetuning rows from a training debate.

    sel = selection.select(debate, problems, task, settings, critics=True,
                           tokenizer=tok, key=key)
    sel.rows[a]      # agent a's SFT rows ({"prompt_ids", "completion_ids", ...})
    sel.summary      # sizes of the sets (the select stage's record, `records.Select`)
    sel.decided      # per problem: the consensus key, its votes, whether it is right

What the debate decided comes from `verdict` (the task's answer relation),
the same module evaluation decides through. Slots follow `debate.run`:
generator n answers round 1, critic n (generator n without critics) the
later rounds; with critics, the returned rows are the generators' then the
critics'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from maft_jax import checks, debate, records, scoring, verdict
from maft_jax.tasks.base import Problem, Task

MODES = ("paper", "ground_truth", "cross_agent", "star")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  mode: str = "paper"                  # one of MODES (see `select`)
  critic_weight: float = 0.5           # w: share of corrected transcripts in a critic's data
  cross_temperature: float = 1.0       # cross_agent: softmax temperature over NLLs

  def __post_init__(self):
    checks.check(self.mode in MODES, "mode", self.mode, f"must be one of {', '.join(MODES)}")
    checks.check(0 < self.critic_weight < 1, "critic_weight", self.critic_weight,
                 "must be in (0, 1)")
    checks.check(self.cross_temperature > 0, "cross_temperature", self.cross_temperature,
                 "must be > 0")


class Selection(NamedTuple):
  rows: list[list[dict]]               # per trained agent, its SFT rows
  summary: records.Select
  decided: dict                        # consensus.json


def select(d: debate.Debate, problems: Sequence[Problem], task: Task, settings: Settings, *,
           critics: bool, tokenizer, key: jax.Array, score: Callable | None = None
           ) -> Selection:
  """Each agent's SFT rows from a training debate, a summary of the sets, and
  what the debate decided per problem (`consensus.json`: the majority's
  representative answer key, its votes, whether it is right).

  Slot n's round-1 answer (generator n) and last-round answer (critic n, or
  generator n without critics) are compared with a target: the consensus of
  the last round's answers alone (`paper`; `verdict`: the task's answer
  relation, seeded ties) or the reference (`ground_truth`, `cross_agent`).

  - paper / ground_truth: generator n trains on its own agreeing round-1
    responses (D^G_n); critic n on its corrected transcripts D^C-_n plus a
    seeded subset of D^C+_n so corrected ones make up `critic_weight`
    (`scoring.paper_selection`).
  - star: STaR (Zelikman et al. 2022): generator n trains on its own verified
    round-1 responses and on its verified rationalisations of the problems it
    failed (`debate.rationalize`, sampled with the answer as a hint in the
    debate stage), each under the round-1 prompt without the hint.
  - cross_agent: within each role (generators: round 1; critics: last round),
    agent a trains on every verified response b of every agent a' with weight
    w[a, a', b] from `scoring.cross_agent_weights` (own successes weigh >= 1;
    weight doubles on problems a failed; softmax over a's NLL of the verified
    responses, so unlikely ones weigh more). A weight becomes a number of
    copies by seeded stochastic rounding: floor(w), plus one with probability
    w - floor(w).

  `critics`: the last round's slots are critic agents, which train too
  (False for the no-critic ablation and STaR). `score(rows)`: cross_agent's
  NLL of every agent on rows[author][b] = (messages, response), as sums and
  token counts [A, authors, b] (`scoring.text_nll`).
  """
  N, B, M = len(d.texts[0]), len(problems), d.num_rounds
  last = M - 1
  k_vote, k_sel, k_round = jax.random.split(key, 3)
  v = verdict.judge(d, task, problems)
  vote = v.vote(last, k_vote)                  # the last round's majority, alone
  first_true, last_true = v.correct_RxNxB[0], v.correct_RxNxB[last]
  if settings.mode == "paper":
    first_ok, last_ok = vote.agree_RxNxB[0], vote.agree_RxNxB[last]
  else:
    first_ok, last_ok = first_true, last_true
  summary = {"mode": settings.mode, "problems": B,
             "consensus_accuracy": float(vote.right_B.mean()),
             "consensus_rate": float((vote.votes_B / N).mean())}
  decided = {"problem_ids": [p.id for p in problems], "consensus": vote.keys_B,
             "votes": vote.votes_B.tolist(), "right": vote.right_B.tolist()}
  if settings.mode == "star":
    # Own verified round-1 rationales, and verified rationalisations of the
    # failures under the prompt without the hint.
    r = d.rationales
    asked = [(n, b) for n in range(N) for b in range(B) if r["texts"][n][b] is not None]
    ok = task.is_correct_many([r["texts"][n][b] for n, b in asked], [problems[b] for _, b in asked])
    rationale_ok = np.zeros((N, B), bool)
    for (n, b), good in zip(asked, ok):
      rationale_ok[n, b] = good
    own, hinted = debate.sft_rows(d, 0, first_true, tokenizer), debate.rationale_rows(
        d, rationale_ok, tokenizer)
    rows = [a + h for a, h in zip(own, hinted)]
    summary.update({"d_g": first_true.sum(1).tolist(),
                    "rationalized": [sum(1 for m, _ in asked if m == n) for n in range(N)],
                    "rationales_kept": rationale_ok.sum(1).tolist()})
  elif settings.mode in ("paper", "ground_truth"):
    d_g, d_minus, d_plus, kept = (np.asarray(x) for x in scoring.paper_selection(
        first_ok, first_ok, last_ok, k_sel, critic_weight=settings.critic_weight))
    rows = debate.sft_rows(d, 0, d_g, tokenizer)
    if critics:
      rows += debate.sft_rows(d, last, d_minus | kept, tokenizer)
    summary.update({"d_g": d_g.sum(1).tolist(), "d_c_minus": d_minus.sum(1).tolist(),
                    "d_c_plus": d_plus.sum(1).tolist(), "d_c_kept": kept.sum(1).tolist()})
  else:
    rows, copies = [], []
    roles = [(0, first_true)] + ([(last, last_true)] if critics else [])
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_round)).tolist())
    for round_index, ok in roles:
      texts = [[(d.messages[round_index][n][b], d.texts[round_index][n][b]) for b in range(B)]
               for n in range(N)]
      sums, counts = score(texts)                      # [A_scorer(all agents), N, B]
      offset = 0 if round_index == 0 else N
      nll = sums[offset:offset + N] / np.maximum(counts[offset:offset + N], 1)
      w = np.asarray(scoring.cross_agent_weights(ok, nll, temperature=settings.cross_temperature))
      n_copies = np.floor(w).astype(int) + (rng.random(w.shape) < w - np.floor(w))
      copies.append(n_copies.sum(axis=(1, 2)).tolist())
      all_rows = [debate.sft_rows(d, round_index, np.ones((N, B), bool), tokenizer)[n]
                  for n in range(N)]
      for a in range(N):
        rows.append([all_rows[src][b] for src in range(N) for b in range(B)
                     for _ in range(int(n_copies[a, src, b]))])
    summary["d_g"] = first_true.sum(1).tolist()
    summary["cross_copies"] = copies
  summary["selected"] = [len(r) for r in rows]
  return Selection(rows, records.Select(**summary), decided)
