"""Debate prompts in the paper's style, as chat messages or plain text.

Round 1 asks for step-by-step reasoning and a final `\\boxed{}` answer; later
rounds show the other agents' solutions, then the agent's own, and ask for an
updated answer using them as additional advice.
"""

from __future__ import annotations

from collections.abc import Sequence

from maft_jax.tasks.base import Problem


def round1(problem: Problem, answer_format: str = "a single number") -> list[dict[str, str]]:
  return [{"role": "user", "content": (
      f"Can you solve the following problem? {problem.question} Explain your reasoning step "
      f"by step. Your final answer should be {answer_format}, in the form \\boxed{{answer}}, "
      "at the end of your response.")}]


def with_hint(problem: Problem, answer_format: str = "a single number") -> list[dict[str, str]]:
  """STaR's rationalisation prompt: round 1's question with the reference
  answer as a hint. A rationale sampled from it trains under `round1`'s
  prompt, without the hint."""
  (message,) = round1(problem, answer_format)
  return [{"role": "user", "content": message["content"] + (
      f" (Hint: the correct answer is {problem.reference}. Explain the reasoning that leads "
      "to it without mentioning the hint.)")}]


def advice(others: Sequence[str]) -> str:
  """The other agents' solutions, as a debate round (and a summary request) quotes them."""
  return "".join(f"\n\nOne agent solution: ```{o}```" for o in others)


def debate_round(problem: Problem, own: str, others: Sequence[str],
                 answer_format: str = "a single number") -> list[dict[str, str]]:
  """The critic's prompt: round-1 question, its own answer, then the advice."""
  return round1(problem, answer_format) + [
      {"role": "assistant", "content": own},
      {"role": "user", "content": (
          f"These are the solutions to the problem from other agents:{advice(others)}\n\n"
          "Using the reasoning from other agents as additional advice, can you give an updated "
          "answer? Examine your solution and that of the other agents step by step. Your final "
          f"answer should be {answer_format}, in the form \\boxed{{answer}}, at the end of your "
          "response.")}]


def to_text(messages: Sequence[dict[str, str]], tokenizer=None) -> tuple[str, bool]:
  """(text, add_special_tokens): through the chat template when the tokenizer
  has one (its special tokens are then in the text), else plain text."""
  if tokenizer is not None and tokenizer.chat_template:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True), False
  parts = []
  for m in messages:
    parts.append(m["content"] if m["role"] == "user" else f"Answer: {m['content']}")
  return "\n\n".join(parts) + "\n\nAnswer:", True
