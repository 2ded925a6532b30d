"""Multi-round debate over a population, and the per-agent SFT data it selects.

Slots. A debate has N slots. Round 1 is answered by the N generation agents
(slot n = generator n); rounds 2..M by the N critic agents (slot n = critic
n), each of which sees its slot's previous answer as its own and the other
slots' previous answers as advice, concatenated or summarised by the critic
itself (`summarize`). Without critics (the paper's ablation) the generation
agents answer every round. Every round is one population generation call
(per-agent prompts `[A][P]`), so all slots sample in one jitted program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from maft_jax import generation, population
from maft_jax.model import Params
from maft_jax.tasks import prompts
from maft_jax.tasks.base import Problem, Task

SUMMARY_INSTRUCTION = (
    "Here are solutions to the problem from other agents:{advice}\n\nSummarize these solutions "
    "concisely: their reasoning and the final answers they reach.")


@dataclasses.dataclass(frozen=True)
class Debate:
  """texts[m][n][b], keys[m][n][b] (answer keys, None = no answer), the chat
  messages each slot answered, messages[m][n][b], and how each completion
  ended, finishes[m][n][b] ("stop", "stop_string" or "length").

  `rationales` (STaR only, see `rationalize`): the same four fields for one
  hinted round, [n][b], None where slot n was not asked problem b."""
  texts: list[list[list[str]]]
  keys: list[list[list[str | None]]]
  messages: list[list[list[list[dict[str, str]]]]]
  finishes: list[list[list[str]]]
  rationales: dict | None = None

  @property
  def num_rounds(self) -> int:
    return len(self.texts)


def run(gen: generation.Generator, task: Task, problems: Sequence[Problem], *,
        generators: Params, critics: Params | None, rounds: int, options: generation.Options,
        key: jax.Array, summarize: bool = False) -> Debate:
  """Debate `problems` for `rounds` rounds (see the module docstring).

  `generators` / `critics`: populations of N agents each (critics None for
  the no-critic ablation). Completions must be single samples per prompt.
  """
  if rounds < 1:
    raise ValueError(f"rounds={rounds} must be >= 1")
  if options.num_samples != 1:
    raise ValueError("a debate takes one sample per prompt and slot (num_samples=1)")
  tok = gen.tok
  fmt = task.answer_format

  round_key, summary_key = jax.random.split(key)

  def ask(pop: Params, msgs, key: jax.Array, opts: generation.Options = options):
    texts = [[prompts.to_text(m, tok)[0] for m in per_slot] for per_slot in msgs]
    special = not (tok is not None and tok.chat_template)
    out = gen.generate(pop, texts, options=opts, key=key, add_special_tokens=special)
    return ([[c[0].text for c in per_slot] for per_slot in out],
            [[c[0].finish for c in per_slot] for per_slot in out])

  # Summaries quote the other agents' final answers: the answer stop rules
  # (e.g. stop after the first \boxed{}) would cut them short.
  summary_options = dataclasses.replace(options, stop_after_boxed=False, stop_strings=())

  first = [prompts.round1(p, fmt) for p in problems]
  n_slots = population.num_agents(generators)
  msgs = [[first] * n_slots]
  texts, finishes = ask(generators, msgs[0], jax.random.fold_in(round_key, 0))
  texts, finishes = [texts], [finishes]
  speakers = critics if critics is not None else generators
  for m in range(1, rounds):
    prev = texts[-1]
    others = [[[prev[o][b] for o in range(n_slots) if o != n] for b in range(len(problems))]
              for n in range(n_slots)]
    if summarize:
      summary_msgs = [[[{"role": "user", "content": SUMMARY_INSTRUCTION.format(
          advice=prompts.advice(others[n][b]))}] for b in range(len(problems))] for n in range(n_slots)]
      summaries, _ = ask(speakers, summary_msgs, jax.random.fold_in(summary_key, m),
                         summary_options)
      advice = [[[summaries[n][b]] for b in range(len(problems))] for n in range(n_slots)]
    else:
      advice = others
    round_msgs = [[prompts.debate_round(problems[b], own=prev[n][b], others=advice[n][b],
                                        answer_format=fmt)
                   for b in range(len(problems))] for n in range(n_slots)]
    msgs.append(round_msgs)
    round_texts, round_finishes = ask(speakers, round_msgs, jax.random.fold_in(round_key, m))
    texts.append(round_texts)
    finishes.append(round_finishes)
  keys = [[[task.extract_answer(t) for t in per_slot] for per_slot in per_round]
          for per_round in texts]
  return Debate(texts=texts, keys=keys, messages=msgs, finishes=finishes)


def rationalize(gen: generation.Generator, task: Task, problems: Sequence[Problem],
                d: Debate, *, generators: Params, failed_NxB, options: generation.Options,
                key: jax.Array) -> Debate:
  """STaR's rationalisation (Zelikman et al. 2022): every slot is asked again
  each problem some slot failed in round 1, with the reference answer as a
  hint (`prompts.with_hint`); a slot's answers are kept for its own failures
  only. Returns `d` with `rationales` set."""
  N, B = len(failed_NxB), len(problems)
  asked = [b for b in range(B) if any(failed_NxB[n][b] for n in range(N))]
  tok = gen.tok
  special = not (tok is not None and tok.chat_template)
  hinted = [prompts.with_hint(problems[b], task.answer_format) for b in asked]
  empty = {"texts": [[None] * B for _ in range(N)], "keys": [[None] * B for _ in range(N)],
           "messages": [[None] * B for _ in range(N)], "finishes": [[None] * B for _ in range(N)]}
  if asked:
    out = gen.generate(generators, [prompts.to_text(m, tok)[0] for m in hinted], options=options,
                       key=key, add_special_tokens=special)
    for n in range(N):
      for i, b in enumerate(asked):
        if failed_NxB[n][b]:
          c = out[n][i][0]
          empty["texts"][n][b], empty["finishes"][n][b] = c.text, c.finish
          empty["keys"][n][b], empty["messages"][n][b] = task.extract_answer(c.text), hinted[i]
  return dataclasses.replace(d, rationales=empty)


def rationale_rows(d: Debate, correct_NxB, tokenizer) -> list[list[dict]]:
  """Per slot, its verified rationales as SFT rows under the round-1 prompt
  it failed (the hint removed): `sft_rows` of round 1 with the rationales in
  place of the round-1 responses."""
  r = d.rationales
  asked = [[t is not None for t in slot] for slot in r["texts"]]
  hinted = dataclasses.replace(d, texts=[r["texts"]], finishes=[r["finishes"]],
                               messages=[d.messages[0]])
  mask = [[a and bool(c) for a, c in zip(*pair)] for pair in zip(asked, correct_NxB)]
  return sft_rows(hinted, 0, mask, tokenizer)


def sft_rows(debate: Debate, round_index: int, mask_NxB, tokenizer) -> list[list[dict]]:
  """Per slot, the rows selected by `mask_NxB` from round `round_index`: the
  prompt that slot answered, rendered and tokenised exactly as it was sampled
  (`add_special_tokens`), and its own response, which gets EOS appended only
  if it ended by itself (`append_eos`; not when cut at the length limit)."""
  rows = []
  for n, per_problem in enumerate(debate.messages[round_index]):
    slot_rows = []
    for b, msgs in enumerate(per_problem):
      if bool(mask_NxB[n][b]):
        text, special = prompts.to_text(msgs, tokenizer)
        slot_rows.append({"prompt": text, "completion": debate.texts[round_index][n][b],
                          "add_special_tokens": special,
                          "append_eos": debate.finishes[round_index][n][b] != "length"})
    rows.append(slot_rows)
  return rows
