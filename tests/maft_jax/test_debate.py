"""Debate rounds: who sees what, summaries, no-critic ablation, selected SFT rows."""

import dataclasses

import jax
import numpy as np
import pytest

from maft_jax import debate, generation, model, population, sampling, tasks
from maft_jax.tokenizer import Tokenizer
from tests import hf_fixtures

CFG = model.ModelConfig(vocab_size=hf_fixtures.VOCAB, hidden_size=32, intermediate_size=48,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")


@pytest.fixture(scope="module")
def setup(tokenizer_dir):
  tok = Tokenizer(tokenizer_dir)
  pop = population.stack([model.init_params(CFG, jax.random.key(i), init_std=0.5)
                          for i in range(4)])
  gens = jax.tree.map(lambda x: x[:2], pop)
  critics = jax.tree.map(lambda x: x[2:], pop)
  task = tasks.load("arithmetic", size=3, seed=0)
  gen = generation.Generator(CFG, tok, progress=False)
  opts = generation.Options(max_new_tokens=4, method=sampling.Temperature(1.0))
  return tok, gens, critics, task, gen, opts


def test_rounds_and_who_sees_what(setup):
  tok, gens, critics, task, gen, opts = setup
  problems = task.problems()
  d = debate.run(gen, task, problems, generators=gens, critics=critics, rounds=2, options=opts,
                 key=jax.random.key(1))
  assert d.num_rounds == 2 and len(d.texts[0]) == 2 and len(d.texts[0][0]) == 3
  for m in (1,):
    for n in range(2):
      for b in range(3):
        msgs = d.messages[m][n][b]
        assert msgs[0]["content"] == d.messages[0][n][b][0]["content"]  # the question
        assert msgs[1] == {"role": "assistant", "content": d.texts[m - 1][n][b]}  # its own
        assert f"```{d.texts[m - 1][1 - n][b]}```" in msgs[2]["content"]          # the other's
  assert d.keys == [[[task.extract_answer(t) for t in slot] for slot in rnd] for rnd in d.texts]
  # Critics answer rounds 2..M: without critics, the generators do, so the text changes.
  solo = debate.run(gen, task, problems, generators=gens, critics=None, rounds=2, options=opts,
                    key=jax.random.key(1))
  assert solo.texts[0] == d.texts[0] and solo.texts[1] != d.texts[1]


def test_summarize_and_selected_rows(setup):
  tok, gens, critics, task, gen, opts = setup
  problems = task.problems()
  d = debate.run(gen, task, problems, generators=gens, critics=critics, rounds=2, options=opts,
                 key=jax.random.key(2), summarize=True)
  for n in range(2):
    for b in range(3):
      advice = d.messages[1][n][b][2]["content"]
      assert advice.count("One agent solution:") == 1   # one summary instead of the answers
  mask = np.array([[1, 0, 1], [0, 0, 1]], bool)
  rows = debate.sft_rows(d, 1, mask, tok)
  assert [len(r) for r in rows] == [2, 1]
  assert rows[0][1]["completion"] == d.texts[1][0][2]
  assert rows[1][0]["prompt"].endswith("assistant:")  # rendered with the chat template
  # ... which holds its BOS already, so finetuning must not add another one.
  assert rows[1][0]["add_special_tokens"] is False
  assert rows[0][0]["append_eos"] == (d.finishes[1][0][0] != "length")
  with pytest.raises(ValueError, match="num_samples=1"):
    debate.run(gen, task, problems, generators=gens, critics=critics, rounds=2,
               key=jax.random.key(0),
               options=generation.Options(max_new_tokens=2, num_samples=2))


def test_rationalize_asks_only_failures_with_the_hint(setup):
  tok, gens, _, task, gen, opts = setup
  problems = task.problems()
  d = debate.run(gen, task, problems, generators=gens, critics=None, rounds=1, options=opts,
                 key=jax.random.key(3))
  failed = np.array([[True, False, True], [False, False, True]])
  r = debate.rationalize(gen, task, problems, d, generators=gens, failed_NxB=failed,
                         options=opts, key=jax.random.key(3)).rationales
  for n in range(2):
    for b in range(3):
      if failed[n, b]:
        hint = f"Hint: the correct answer is {problems[b].reference}."
        assert hint in r["messages"][n][b][0]["content"]
        assert r["keys"][n][b] == task.extract_answer(r["texts"][n][b])
      else:
        assert r["texts"][n][b] is None and r["messages"][n][b] is None
  # Rows of verified rationales train under the round-1 prompt: no hint.
  rows = debate.rationale_rows(dataclasses.replace(d, rationales=r), failed, tok)
  assert [len(x) for x in rows] == [2, 1]
  for n, slot in enumerate(rows):
    for row in slot:
      assert "Hint" not in row["prompt"] and row["completion"] in r["texts"][n]
