"""Sampling methods draw from the intended distributions; agents are independent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from maft_jax import lora, model, population, sampling

LOGITS = np.log(np.array([0.35, 0.25, 0.2, 0.1, 0.06, 0.04]))


def _expected(method):
  p = np.exp(LOGITS - LOGITS.max())
  if isinstance(method, sampling.Chain):
    steps = method.steps
  else:
    steps = (method,)
  for step in steps:
    if isinstance(step, sampling.Temperature):
      p = p ** (1.0 / step.temperature)
    elif isinstance(step, sampling.TopK):
      p = np.where(p >= np.sort(p)[::-1][step.k - 1], p, 0.0)
    elif isinstance(step, sampling.TopP):
      q = p / p.sum()
      order = np.argsort(-q)
      before = np.cumsum(q[order]) - q[order]
      keep = np.zeros_like(q, bool)
      keep[order] = before < step.p
      p = np.where(keep, p, 0.0)
    elif isinstance(step, sampling.MinP):
      q = p / p.sum()
      p = np.where(q >= step.p * q.max(), p, 0.0)
  return p / p.sum()


@pytest.mark.parametrize("method", [
    sampling.Temperature(1.0),
    sampling.Temperature(0.5),
    sampling.Chain((sampling.Temperature(1.0), sampling.TopK(3))),
    # Mass before the 3rd token 0.60 < 0.75 <= 0.80 before the 4th: exactly three
    # tokens are kept; an off-by-one in the nucleus keeps 2 or 4.
    sampling.Chain((sampling.Temperature(1.0), sampling.TopP(0.75))),
    sampling.Chain((sampling.Temperature(1.0), sampling.MinP(0.5))),
    sampling.Chain((sampling.Temperature(2.0), sampling.TopK(5), sampling.TopP(0.9))),
    # Steps after the nucleus weight its rejection proposals; they must give
    # what applying them to the nucleus gives.
    sampling.Chain((sampling.TopP(0.85), sampling.Temperature(0.5))),
    sampling.Chain((sampling.TopP(0.85), sampling.MinP(0.3))),
    sampling.Chain((sampling.TopP(0.85), sampling.TopK(2))),
    # Two nuclei: the first by its sort, the second by rejection.
    sampling.Chain((sampling.TopP(0.95), sampling.Temperature(0.5), sampling.TopP(0.8))),
])
def test_empirical_frequencies_match(method):
  n = 40_000
  draw = jax.jit(jax.vmap(lambda k: sampling.draw_rows(method, jnp.asarray(LOGITS)[None],
                                                        k[None])[0]))
  tokens = np.asarray(draw(jax.random.split(jax.random.key(0), n)))
  counts = np.bincount(tokens, minlength=len(LOGITS))
  expected = _expected(method)
  assert np.all(counts[expected == 0] == 0), (counts, expected)
  support = expected > 0
  _, pvalue = stats.chisquare(counts[support], n * expected[support])
  assert pvalue > 1e-3, (counts, n * expected)


@pytest.mark.parametrize("method", [
    sampling.TopP(0.9),
    sampling.Chain((sampling.TopP(0.8), sampling.Temperature(0.7), sampling.MinP(0.05))),
])
def test_nucleus_draw_equals_the_sorted_nucleus_draw(method):
  # 2048 rows of 512-token vocabularies from flat to peaked (the peaked ones
  # take several rounds): the sort-free draw must be, token for token, the
  # Gumbel-max over the nucleus TopP.process computes with a sort, from the
  # same noise, i.e. jax.random.categorical of the sorted chain's logits.
  rows, vocab = 2048, 512
  scale = jnp.geomspace(0.01, 20.0, rows)[:, None]
  logits = jax.random.normal(jax.random.key(3), (rows, vocab)) * scale
  keys = jax.random.split(jax.random.key(4), rows)
  tok = np.asarray(jax.jit(sampling.draw_rows, static_argnums=0)(method, logits, keys))
  reference = np.asarray(jax.vmap(jax.random.categorical)(keys, method.process(logits)))
  np.testing.assert_array_equal(tok, reference)
  # A diverged model's NaN logits must not hang the rounds.
  nan = sampling.draw_rows(method, jnp.full((2, vocab), jnp.nan), keys[:2])
  assert nan.shape == (2,)


def test_nucleus_keeps_every_token_tied_with_its_last_one():
  # Tokens 1-3 tie; the mass strictly above each (0.46) is < 0.5, so all three
  # are kept whatever their index order, by the sort and by the rounds alike.
  logits = jnp.asarray([[2.0, 1.0, 1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
  method = sampling.TopP(0.5)
  kept = np.isfinite(np.asarray(method.process(logits)))
  np.testing.assert_array_equal(kept, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
  keys = jax.random.split(jax.random.key(6), 4000)
  draw = jax.jit(jax.vmap(lambda k: sampling.draw_rows(method, logits, jnp.stack([k, k]))))
  sort = jax.jit(jax.vmap(lambda k: jax.vmap(jax.random.categorical, (None, 0))(
      k, method.process(logits))))
  np.testing.assert_array_equal(draw(keys), sort(keys))


def test_greedy_is_argmax_and_flags():
  assert isinstance(sampling.from_flags(temperature=0), sampling.Greedy)
  tok = sampling.draw_rows(sampling.Greedy(), jnp.asarray(LOGITS)[None], jax.random.key(0)[None])
  assert int(tok[0]) == 0
  m = sampling.from_flags(temperature=0.7, top_k=4, top_p=0.9)
  assert m == sampling.Chain((sampling.Temperature(0.7), sampling.TopK(4), sampling.TopP(0.9)))
  with pytest.raises(ValueError, match=r"top_p=0\.0: must be in \(0, 1\]"):
    sampling.TopP(0.0)


CFG = model.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")


def test_agent_alone_equals_agent_in_population():
  pop = population.init(CFG, jax.random.key(0), 3)
  rng = np.random.default_rng(0)
  tokens, mask = sampling.left_pad([list(rng.integers(1, 64, n)) for n in (5, 3, 7)], pad_id=0)
  method = sampling.Chain((sampling.Temperature(1.0), sampling.TopP(0.95)))
  kw = dict(cfg=CFG, method=method, max_new_tokens=8, stop_ids=(), pad_id=0)
  key = jax.random.key(7)
  both = sampling.sample(pop, tokens, mask, key, **kw)
  assert both.tokens.shape == (3, 3, 8)
  # Different agents draw from different streams.
  assert not np.array_equal(both.tokens[0], both.tokens[1])
  # Agent 2 alone (slot 0 of a 1-agent population) equals agent 2 moved to slot
  # 0 of the 3-agent population: a row depends on its slot's key and weights only.
  solo = sampling.sample(population.stack([population.select(pop, 2)]), tokens, mask, key, **kw)
  moved = sampling.sample(population.stack([population.select(pop, i) for i in (2, 0, 1)]),
                          tokens, mask, key, **kw)
  np.testing.assert_array_equal(solo.tokens[0], moved.tokens[0])
  np.testing.assert_allclose(solo.logprobs[0], moved.logprobs[0], atol=1e-5)


def test_greedy_sample_equals_stepwise_argmax_of_full_forward():
  params = model.init_params(CFG, jax.random.key(1))
  prompt = [5, 9, 2, 17]
  tokens, mask = sampling.left_pad([prompt], pad_id=0)
  out = sampling.sample(population.stack([params]), tokens, mask, jax.random.key(0), cfg=CFG,
                        method=sampling.Greedy(), max_new_tokens=6)
  # Attention is causal, so one fixed-length buffer (one compile) serves every
  # step: the logits at position n-1 ignore the zeros after it.
  fwd = jax.jit(lambda t: model.forward(params, t, cfg=CFG)[0])
  seq = list(prompt)
  for _ in range(6):
    logits = fwd(jnp.asarray([seq + [0] * (10 - len(seq))]))
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  assert np.asarray(out.tokens[0, 0]).tolist() == seq[len(prompt):]
  assert int(out.lengths[0, 0]) == 6


def _prompts(n=3, seed=0):
  rng = np.random.default_rng(seed)
  return sampling.left_pad([list(rng.integers(1, 64, k)) for k in (5, 3, 7)[:n]], pad_id=0)


def test_stops_padding_lengths_and_early_exit():
  pop = population.init(CFG, jax.random.key(2), 2)
  tokens, mask = _prompts()
  kw = dict(cfg=CFG, method=sampling.Greedy(), max_new_tokens=10, pad_id=0)
  free = sampling.sample(pop, tokens, mask, jax.random.key(0), **kw)
  assert np.all(np.asarray(free.lengths) == 10) and np.all(np.asarray(free.steps) == 10)
  free_tokens = np.asarray(free.tokens)
  # Stop on whatever each row of agent 0 emits at step 2 (and agent 1 at step 1).
  stop_ids = tuple(sorted(set(free_tokens[0, :, 2]) | set(free_tokens[1, :, 1])))
  out = sampling.sample(pop, tokens, mask, jax.random.key(0), stop_ids=stop_ids, **kw)
  got, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  for a in range(2):
    for r in range(3):
      hits = [i for i, t in enumerate(free_tokens[a, r]) if t in stop_ids]
      n = hits[0] + 1
      assert lengths[a, r] == n
      np.testing.assert_array_equal(got[a, r, :n], free_tokens[a, r, :n])
      assert np.all(got[a, r, n:] == 0)
  # The loop ran only until the last row of any agent stopped.
  np.testing.assert_array_equal(np.asarray(out.steps), [lengths.max()] * 2)
  assert np.asarray(out.steps).max() <= 3


def _transposes_in_loops(jaxpr, inside=False):
  """Operand shapes of every transpose inside a while loop of `jaxpr`."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "transpose" and inside:
      found.append(eqn.invars[0].aval.shape)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found += _transposes_in_loops(sub, inside or eqn.primitive.name == "while")
  return found


def test_decode_step_moves_no_weights_or_cache():
  # A decode step must read each layer's weights and cache where they lie:
  # a vmapped scan moving the agent axis of the layer stack, or a batched
  # cache update, shows up as a transpose of a weight- or cache-sized array
  # inside the loop, on every step, on any backend.
  pop = population.init(CFG, jax.random.key(4), 3)
  tokens, mask = _prompts(n=2)
  state = sampling.prefill(pop, tokens, mask, cfg=CFG, cache_len=tokens.shape[1] + 6)
  method = sampling.Chain((sampling.Temperature(1.0), sampling.TopP(0.9)))
  jaxpr = jax.make_jaxpr(lambda p, s: sampling.decode.__wrapped__(
      p, s, jax.random.key(1), cfg=CFG, method=method, max_new_tokens=6))(pop, state)
  one_layer_cache = np.prod(state.k.shape[1:])  # [A, B, K, S, Dh]
  moved = [shape for shape in _transposes_in_loops(jaxpr.jaxpr)
           if np.prod(shape) >= one_layer_cache]
  assert not moved, moved


def test_per_agent_prompts_equal_each_agent_on_its_own():
  pop = population.init(CFG, jax.random.key(3), 2)
  t0, m0 = _prompts(seed=1)
  t1, m1 = _prompts(seed=2)
  method = sampling.Temperature(1.0)
  kw = dict(cfg=CFG, method=method, max_new_tokens=6)
  both = sampling.sample(pop, np.stack([t0, t1]), np.stack([m0, m1]), jax.random.key(5), **kw)
  for a, (t, m) in enumerate([(t0, m0), (t1, m1)]):
    alone = sampling.sample(pop, t, m, jax.random.key(5), **kw)  # shared prompts, same slot
    np.testing.assert_array_equal(both.tokens[a], alone.tokens[a])


def test_num_samples_shares_prefill_and_samples_independently():
  pop = population.init(CFG, jax.random.key(4), 1)
  tokens, mask = _prompts()
  kw = dict(cfg=CFG, method=sampling.Temperature(1.5), max_new_tokens=8)
  many = sampling.sample(pop, tokens, mask, jax.random.key(9), num_samples=4, **kw)
  assert many.tokens.shape == (1, 12, 8)
  rows = np.asarray(many.tokens[0]).reshape(3, 4, 8)
  for b in range(3):  # four different samples of each prompt
    assert len({tuple(r) for r in rows[b]}) == 4
  # Row r = b * 4 + s equals sampling the prompts repeated explicitly (same row keys).
  repeated = np.repeat(np.asarray(tokens), 4, axis=0), np.repeat(np.asarray(mask), 4, axis=0)
  explicit = sampling.sample(pop, *repeated, jax.random.key(9), **kw)
  np.testing.assert_array_equal(many.tokens, explicit.tokens)
  np.testing.assert_allclose(many.logprobs, explicit.logprobs, atol=1e-5)


def test_decode_goes_on_from_its_own_final_state():
  """The `DecodeState` decode returns is one it can go on from: greedy 3 + 3
  new tokens equal greedy 6 (no stop tokens), and its one cache index has
  moved by the tokens decoded."""
  pop = population.init(CFG, jax.random.key(4), 2)
  tokens, mask = _prompts(n=2)
  T = tokens.shape[1]
  kw = dict(cfg=CFG, method=sampling.Greedy())
  whole, _ = sampling.decode(pop, sampling.prefill(pop, tokens, mask, cfg=CFG, cache_len=T + 6),
                             jax.random.key(0), max_new_tokens=6, **kw)
  state = sampling.prefill(pop, tokens, mask, cfg=CFG, cache_len=T + 6)
  assert state.index.shape == () and int(state.index) == T
  first, state = sampling.decode(pop, state, jax.random.key(0), max_new_tokens=3, **kw)
  assert int(state.index) == T + 3 and state.next_pos.shape == first.lengths.shape
  second, state = sampling.decode(pop, state, jax.random.key(0), max_new_tokens=3, **kw)
  np.testing.assert_array_equal(np.concatenate([first.tokens, second.tokens], -1), whole.tokens)
  np.testing.assert_allclose(np.concatenate([first.logprobs, second.logprobs], -1),
                             whole.logprobs, atol=1e-5)


# A LoRA population: one base without an agent axis, adapters stacked [A, ...].
LCFG = lora.LoraConfig(rank=4, alpha=8.0)


def _adapted(seed: int, A: int, random_b: bool) -> population.Adapted:
  base = model.init_params(CFG, jax.random.key(seed))
  adapters = lora.init(CFG, LCFG, jax.random.key(seed + 1), A)
  if random_b:  # lora.init's B is zero: a fresh adapter changes nothing
    keys = iter(jax.random.split(jax.random.key(seed + 2), len(adapters)))
    adapters = {t: {"a": ab["a"], "b": 0.1 * jax.random.normal(next(keys), ab["b"].shape)}
                for t, ab in adapters.items()}
  return population.Adapted(base=base, adapters=adapters, scale=LCFG.scale)


SEEDED = sampling.Chain((sampling.Temperature(1.0), sampling.TopP(0.9)))


@pytest.mark.parametrize("method", [sampling.Greedy(), SEEDED])
def test_fresh_adapters_sample_like_copies_of_their_base(method):
  pop = _adapted(0, 3, random_b=False)
  copies = population.replicate(pop.base, 3)
  tokens, mask = _prompts()
  kw = dict(cfg=CFG, method=method, max_new_tokens=8)
  ours, ref = (sampling.sample(p, tokens, mask, jax.random.key(3), **kw) for p in (pop, copies))
  np.testing.assert_array_equal(ours.tokens, ref.tokens)
  np.testing.assert_array_equal(ours.lengths, ref.lengths)
  np.testing.assert_allclose(ours.logprobs, ref.logprobs, atol=1e-5)


def test_adapters_give_the_merged_populations_logits_and_samples():
  pop = _adapted(1, 3, random_b=True)
  merged = population.merged(pop, CFG)
  tokens, mask = _prompts()
  kw = dict(cfg=CFG, positions=model.positions_from_mask(mask), segment_ids=mask)
  logits, ref = (np.asarray(population.forward(p, tokens, **kw)) for p in (pop, merged))
  np.testing.assert_allclose(logits, ref, atol=1e-5)
  assert np.abs(logits[0] - logits[1]).max() > 1e-2  # the agents' adapters differ
  for method in (sampling.Greedy(), SEEDED):
    kw = dict(cfg=CFG, method=method, max_new_tokens=8)
    ours, want = (sampling.sample(p, tokens, mask, jax.random.key(4), **kw) for p in (pop, merged))
    np.testing.assert_array_equal(ours.tokens, want.tokens)
    np.testing.assert_allclose(ours.logprobs, want.logprobs, atol=1e-4)


def _per_agent_base_copies(jaxpr, base, A):
  """Shapes of arrays in `jaxpr` (any depth) that hold a base weight per
  agent: [A, ...] or layer-major [L, A, ...] of a base leaf's shape."""
  per_layer = {w.shape[1:] for w in jax.tree.leaves(base["layers"])}
  L = CFG.num_layers
  wanted = ({(A, L) + s for s in per_layer} | {(L, A) + s for s in per_layer}
            | {(A,) + w.shape for k, w in base.items() if k != "layers"})
  found = []
  for eqn in jaxpr.eqns:
    found += [v.aval.shape for v in eqn.outvars if getattr(v.aval, "shape", None) in wanted]
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found += _per_agent_base_copies(sub, base, A)
  return found


def test_adapted_decode_reads_one_copy_of_the_base():
  """The decode program of an Adapted population makes no per-agent copy of
  any base weight (no merge, no broadcast): every agent's step reads the one
  base. The same check finds the layer-major copies of a full population."""
  pop = _adapted(2, 3, random_b=True)
  tokens, mask = _prompts(n=2)

  def decode_jaxpr(p):
    state = sampling.prefill(p, tokens, mask, cfg=CFG, cache_len=tokens.shape[1] + 6)
    return jax.make_jaxpr(lambda p, s: sampling.decode.__wrapped__(
        p, s, jax.random.key(1), cfg=CFG, method=SEEDED, max_new_tokens=6))(p, state).jaxpr

  assert _per_agent_base_copies(decode_jaxpr(pop), pop.base, 3) == []
  full = population.merged(pop, CFG)
  assert _per_agent_base_copies(decode_jaxpr(full), pop.base, 3)
