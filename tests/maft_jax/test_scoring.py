"""Selection semantics on hand-built answer matrices; cross-agent NLL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maft_jax import finetune, lora, model, population, scoring, tasks
from maft_jax.tasks import prompts


def test_answer_classes_number_equal_answers_per_problem():
  task = tasks.load("arithmetic", size=2)
  assert task.answer_classes(["7", None, "8", "7", "1/2", "8"]) == [0, -1, 1, 0, 2, 1]
  assert task.answer_classes([None, None]) == [-1, -1]


def test_consensus_counts_ids_beyond_the_number_of_agents():
  # Classes numbered over two rounds reach 2N - 1: the final round's new
  # answers 4 (two votes) and 5 must win, not be dropped.
  ids = jnp.asarray([[4, 5, 0], [4, 5, 3], [0, 5, 3]], jnp.int32)
  c, votes = scoring.consensus(ids, jax.random.key(0))
  assert np.asarray(c).tolist() == [4, 5, 3] and np.asarray(votes).tolist() == [2, 3, 2]


def test_consensus_majority_ties_and_no_answer():
  ids = jnp.asarray([[0, 0, 1, -1, 0],
                     [0, 1, 1, -1, 1],
                     [1, 2, 0, -1, 2]], jnp.int32)
  # problem 0: 0 wins 2-1; 1: three-way tie; 2: 1 wins; 3: nobody; 4: tie of three
  winners = set()
  for seed in range(40):
    c, votes = scoring.consensus(ids, jax.random.key(seed))
    c, votes = np.asarray(c), np.asarray(votes)
    assert c[0] == 0 and c[2] == 1 and c[3] == -1
    assert votes.tolist()[:4] == [2, 1, 2, 0]
    assert c[1] in (0, 1, 2) and c[4] in (0, 1, 2)
    winners.add(int(c[1]))
  assert winners == {0, 1, 2}  # every tied answer can win, by the seed
  again = scoring.consensus(ids, jax.random.key(3))[0]
  np.testing.assert_array_equal(again, scoring.consensus(ids, jax.random.key(3))[0])
  agree = scoring.agreement(ids, jnp.asarray([0, 1, 1, -1, 2]))
  np.testing.assert_array_equal(agree, [[1, 0, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]])


def test_paper_selection_masks():
  gen_ok = jnp.asarray([[1, 0, 1, 1], [0, 0, 1, 0]], bool)
  first = jnp.asarray([[0, 1, 1, 0, 1, 1, 1, 1],
                       [1, 1, 1, 1, 1, 1, 0, 0]], bool)
  final = jnp.asarray([[1, 1, 1, 0, 1, 1, 1, 1],
                       [1, 1, 1, 1, 1, 1, 0, 1]], bool)
  gen_ok = jnp.pad(gen_ok, ((0, 0), (0, 4)))
  d_g, d_minus, d_plus, kept = scoring.paper_selection(gen_ok, first, final, jax.random.key(0),
                                                       critic_weight=0.5)
  np.testing.assert_array_equal(d_g, gen_ok)
  np.testing.assert_array_equal(d_minus, [[1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1]])
  np.testing.assert_array_equal(d_plus, [[0, 1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
  kept = np.asarray(kept)
  assert np.all(kept <= np.asarray(d_plus))
  # w = 0.5: as many kept D^C+ as corrected D^C- (one each).
  assert kept.sum(axis=1).tolist() == [1, 1]
  # w = 0.25: corrected make up a quarter -> three D^C+ per correction.
  *_, kept25 = scoring.paper_selection(gen_ok, first, final, jax.random.key(0),
                                       critic_weight=0.25)
  assert np.asarray(kept25).sum(axis=1).tolist() == [3, 3]
  # No corrections at all: half of D^C+ is kept so critics still train.
  *_, kept0 = scoring.paper_selection(gen_ok, first, first, jax.random.key(1))
  assert np.asarray(kept0).sum(axis=1).tolist() == [3, 3]


def test_cross_agent_weights():
  correct = jnp.asarray([[1, 0], [1, 1], [0, 0]], bool)            # [A, B]
  nll = jnp.asarray(np.random.default_rng(0).uniform(0.5, 3.0, (3, 3, 2)), jnp.float32)
  w = np.asarray(scoring.cross_agent_weights(correct, nll))
  assert np.all(w[:, 2, :] == 0)                 # agent 2 never verified: nobody trains on it
  assert np.all(w[:, 0, 1] == 0)                 # agent 0 failed problem 1
  assert w[0, 0, 0] >= 1 and w[1, 1, 0] >= 1 and w[1, 1, 1] >= 1  # own successes kept
  # Agent 2 failed problem 0: its weights over the verified authors sum to 2,
  # and the author it finds less likely gets more.
  assert w[2, :, 0].sum() == pytest.approx(2.0, abs=1e-5)
  hi, lo = (0, 1) if nll[2, 0, 0] > nll[2, 1, 0] else (1, 0)
  assert w[2, hi, 0] > w[2, lo, 0]
  assert np.all(w[:, 1, 1] > 0) and w[2, 1, 1] == pytest.approx(2.0)


class _CharTokenizer:
  """Characters as ids 1..60 (BOS 61 with special tokens); no chat template."""
  chat_template = None

  def encode(self, text, add_special_tokens=True):
    return ([61] if add_special_tokens else []) + [ord(c) % 60 + 1 for c in text]


def test_text_nll_in_padded_chunks_equals_each_pair_alone():
  """Every agent's NLL of every author's responses, as `text_nll` computes
  it in fixed-shape chunks (here 2 problems, the last chunk padded), equals
  token_nll of each (prompt, response) row alone, at its own length."""
  cfg = model.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")
  pop = population.init(cfg, jax.random.key(0), 3)
  rng = np.random.default_rng(1)
  words = ["add", "three", "to", "x", "then", "so", "7", "42"]
  rows = [[([{"role": "user", "content": " ".join(rng.choice(words, 3 + b))}],
            " ".join(rng.choice(words, 1 + (a + b) % 4))) for b in range(5)] for a in range(2)]
  tok = _CharTokenizer()
  sums, counts = scoring.text_nll(pop, rows, cfg=cfg, tokenizer=tok, pad_id=0, max_len=64,
                                  chunk=2)
  assert sums.shape == counts.shape == (3, 2, 5)
  nll = jax.jit(finetune.token_nll, static_argnums=(2, 3))
  for a in range(2):
    for b in range(5):
      messages, response = rows[a][b]
      prompt_ids = tok.encode(prompts.to_text(messages)[0])
      completion_ids = tok.encode(response, add_special_tokens=False)
      row = scoring.scoring_rows(prompt_ids, completion_ids,
                                 len(prompt_ids) + len(completion_ids), 0)
      row = {k: jnp.asarray(v)[None] for k, v in row.items()}
      for scorer in range(3):
        s, n = nll(population.select(pop, scorer), row, cfg, 512)
        assert int(counts[scorer, a, b]) == int(n) == len(completion_ids)
        assert sums[scorer, a, b] == pytest.approx(float(s), rel=1e-4)


def test_kept_count_has_no_float_off_by_one():
  # 13 corrections at w = 0.2 want exactly 13 * 4 = 52 kept (float32 gives 52.000004).
  first = jnp.asarray([[False] * 13 + [True] * 60], bool)
  final = jnp.ones_like(first)
  gen_ok = jnp.zeros_like(first)
  *_, kept = scoring.paper_selection(gen_ok, first, final, jax.random.key(0), critic_weight=0.2)
  assert int(np.asarray(kept).sum()) == 52


def test_scoring_rows_layout_and_row_nll_is_every_agents_nll_of_every_row():
  from maft_jax import model, population
  r = scoring.scoring_rows([5, 6, 7, 8], [9, 10], seq_len=5, pad_id=0)
  assert r["tokens_BxT"].tolist() == [6, 7, 8, 9, 10]       # prompt cut from the left
  assert r["loss_mask_BxT"].tolist() == [0, 0, 0, 1, 1]
  r = scoring.scoring_rows([5], [], seq_len=4, pad_id=0)
  assert r["loss_mask_BxT"].sum() == 0 and r["segment_ids_BxT"].tolist() == [1, 0, 0, 0]
  cfg = model.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1, head_dim=8, dtype="float32")
  pop = population.init(cfg, jax.random.key(0), 2)
  rng = np.random.default_rng(0)
  rows = [[scoring.scoring_rows(rng.integers(1, 32, 3).tolist(), rng.integers(1, 32, 4).tolist(),
                                8, 0) for _ in range(3)] for _ in range(2)]
  batch = {k: np.stack([np.stack([x[k] for x in a]) for a in rows]) for k in rows[0][0]}
  sums, counts = scoring.row_nll(pop, batch, cfg=cfg)
  # Reference: each scorer's logits of each row alone, log-softmax by hand.
  for s in range(2):
    params = population.select(pop, s)
    for a in range(2):
      for b in range(3):
        r = rows[a][b]
        logits, _ = model.forward(params, r["tokens_BxT"][None], cfg=cfg)
        logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
        scored = np.flatnonzero(r["loss_mask_BxT"][1:])   # position t predicts token t+1
        nll = -sum(float(logp[t, r["tokens_BxT"][t + 1]]) for t in scored)
        assert int(counts[s, a, b]) == len(scored)
        np.testing.assert_allclose(float(sums[s, a, b]), nll, rtol=1e-4)


def test_row_nll_of_an_adapted_population_is_the_merged_populations():
  """One base + adapters scores every row as the merged full agents do."""
  cfg = model.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1, head_dim=8, dtype="float32")
  lcfg = lora.LoraConfig(rank=2, alpha=4.0)
  adapters = lora.init(cfg, lcfg, jax.random.key(1), 3)
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)   # a nonzero B: the agents differ
  pop = population.Adapted(base=model.init_params(cfg, jax.random.key(0)), adapters=adapters,
                           scale=lcfg.scale)
  merged = population.merged(pop, cfg)
  rng = np.random.default_rng(1)
  rows = [[scoring.scoring_rows(rng.integers(1, 32, 3).tolist(), rng.integers(1, 32, 4).tolist(),
                                8, 0) for _ in range(2)] for _ in range(3)]
  batch = {k: np.stack([np.stack([x[k] for x in a]) for a in rows]) for k in rows[0][0]}
  (sums, counts), (want, want_counts) = (scoring.row_nll(p, batch, cfg=cfg) for p in (pop, merged))
  np.testing.assert_allclose(sums, want, rtol=1e-5)
  np.testing.assert_array_equal(counts, want_counts)
  assert np.abs(np.asarray(sums[0]) - np.asarray(sums[1])).max() > 1e-3  # the scorers differ
