"""maft_jax.tasks.prompts: the debate's messages."""

from maft_jax.tasks import arithmetic, prompts


def test_prompts(tokenizer_dir):
  from maft_jax.tokenizer import Tokenizer
  p = arithmetic.make_problem(0, 0)
  r1 = prompts.round1(p)
  assert p.question in r1[0]["content"] and "\\boxed{answer}" in r1[0]["content"]
  r2 = prompts.debate_round(p, own="I think 3", others=["agent says 4", "agent says 5"])
  assert r2[1] == {"role": "assistant", "content": "I think 3"}
  assert r2[2]["content"].count("One agent solution:") == 2
  text, special = prompts.to_text(r2, Tokenizer(tokenizer_dir))
  assert not special and text.endswith("assistant:") and "agent says 5" in text
  plain, special = prompts.to_text(r1)
  assert special and plain.startswith("Can you solve")
