"""Population = one stacked pytree; vmapped forward; KV cache; sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maft_jax import model, population, sharding

CFG = model.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32",
                        qkv_bias=True, sliding_window=6)


# Jitted once per config: eager op-by-op dispatch is far slower on CPU.
fwd = jax.jit(model.forward, static_argnames=("cfg",))
pop_fwd = jax.jit(population.forward, static_argnames=("cfg", "placement"))


def _tokens(B=4, T=10, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T)), jnp.int32)
  mask = np.ones((B, T), bool)
  mask[1, :3] = False
  mask[3, :6] = False
  return tokens, jnp.asarray(mask)


def test_vmapped_forward_equals_each_agent():
  pop = population.init(CFG, jax.random.key(0), 3)
  tokens, mask = _tokens()
  seg = mask.astype(jnp.int32)
  all_logits = pop_fwd(pop, tokens, cfg=CFG, segment_ids=seg)
  assert all_logits.shape == (3, 4, 10, CFG.vocab_size)
  for i in range(3):
    alone, _ = fwd(population.select(pop, i), tokens, cfg=CFG, segment_ids_BxT=seg)
    np.testing.assert_allclose(all_logits[i], alone, atol=1e-5, rtol=0)
  # Independent inits really differ, and agent i is reproducible alone.
  assert not np.allclose(all_logits[0], all_logits[1])
  one = model.init_params(CFG, jax.random.fold_in(jax.random.key(0), 2))
  np.testing.assert_array_equal(one["embed"], pop["embed"][2])


def test_per_agent_prompts():
  pop = population.init(CFG, jax.random.key(1), 2)
  t0, _ = _tokens(seed=1)
  t1, _ = _tokens(seed=2)
  out = pop_fwd(pop, jnp.stack([t0, t1]), cfg=CFG)
  for i, t in enumerate([t0, t1]):
    alone, _ = fwd(population.select(pop, i), t, cfg=CFG)
    np.testing.assert_allclose(out[i], alone, atol=1e-5, rtol=0)


def test_replicate_stack_unstack():
  params = model.init_params(CFG, jax.random.key(2))
  pop = population.replicate(params, 3)
  assert population.num_agents(pop) == 3
  back = population.unstack(population.stack(population.unstack(pop)))
  for agent in back:
    jax.tree.map(np.testing.assert_array_equal, agent, params)
  # An index out of range is an error, not a clamped slice of the last agent.
  with pytest.raises(IndexError, match="agent 3 of a population of 3"):
    population.select(pop, 3)
  # An Adapted population counts its agents by its adapters, and has no full agent to select.
  adapted = population.Adapted(base=params, adapters={"wq": {"a": jnp.zeros((5, 2, 32, 1))}},
                               scale=1.0)
  assert population.num_agents(adapted) == 5
  some = population.take(adapted, 1, 3)
  assert population.num_agents(some) == 2 and some.base is adapted.base
  with pytest.raises(TypeError, match="full population"):
    population.select(adapted, 0)


def test_kv_cache_decoding_equals_full_forward():
  """Prefill part of a left-padded batch, then feed tokens one at a time."""
  params = model.init_params(CFG, jax.random.key(3))
  tokens, mask = _tokens(T=12)
  positions = model.positions_from_mask(mask)
  full, _ = fwd(params, tokens, cfg=CFG, positions_BxT=positions,
                          segment_ids_BxT=mask.astype(jnp.int32))
  P = 7  # prefill length: every row has >= 1 real token in it
  cache = model.init_cache(CFG, tokens.shape[0], 12)
  logits, cache = fwd(params, tokens[:, :P], cfg=CFG, positions_BxT=positions[:, :P],
                                segment_ids_BxT=mask[:, :P].astype(jnp.int32), cache=cache)
  steps = [logits]
  step = jax.jit(lambda p, t, pos, c: model.forward(p, t, cfg=CFG, positions_BxT=pos, cache=c))
  for t in range(P, 12):
    logits, cache = step(params, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
    steps.append(logits)
  cached = jnp.concatenate(steps, axis=1)
  np.testing.assert_allclose(np.asarray(cached)[np.asarray(mask)],
                             np.asarray(full)[np.asarray(mask)], atol=1e-5, rtol=0)


def test_remat_and_dtypes_keep_results():
  params = model.init_params(CFG, jax.random.key(4))
  tokens, _ = _tokens()
  base, _ = fwd(params, tokens, cfg=CFG)
  for remat in ("full", "dots", "dots_no_batch"):
    cfg = dataclasses.replace(CFG, remat=remat)
    loss = lambda p: model.forward(p, tokens, cfg=cfg)[0].sum()  # noqa: E731
    ref = lambda p: model.forward(p, tokens, cfg=CFG)[0].sum()  # noqa: E731
    g, g_ref = jax.jit(jax.grad(loss))(params), jax.jit(jax.grad(ref))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g, g_ref)
  bf16, _ = fwd(params, tokens, cfg=dataclasses.replace(CFG, dtype="bfloat16"))
  assert bf16.dtype == jnp.float32
  assert np.abs(np.asarray(bf16) - np.asarray(base)).max() < 0.05
  assert params["embed"].dtype == jnp.float32  # param dtype is separate


def test_sharded_forward_on_8_devices_matches_single_device():
  assert jax.device_count() == 8
  pop = population.init(CFG, jax.random.key(5), 2)
  tokens, mask = _tokens()
  seg = mask.astype(jnp.int32)
  expected = pop_fwd(pop, tokens, cfg=CFG, segment_ids=seg)
  for sizes in [(2, 1, 2, 2), (1, 2, 4, 1), (2, 2, 1, 2)]:
    mesh = sharding.make_mesh(sizes)
    shards = sharding.shardings(population.axes(CFG), pop, mesh)
    placed = jax.device_put(pop, shards)
    batch = sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"),
                                                                  tokens.shape, mesh))
    placement = sharding.Placement(mesh)
    fn = jax.jit(lambda p, t, s: population.forward(p, t, cfg=CFG, segment_ids=s,
                                                    placement=placement))
    with placement.context():
      out = fn(placed, jax.device_put(tokens, batch), jax.device_put(seg, batch))
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
  # The rule table decides placement: agents on 'agent', D on 'fsdp', heads on 'tensor'.
  mesh = sharding.make_mesh((2, 1, 2, 2))
  shards = sharding.shardings(population.axes(CFG), pop, mesh)
  assert shards["layers"]["wq"].spec == sharding.PartitionSpec("agent", None, "fsdp", "tensor", None)
  assert shards["embed"].spec == sharding.PartitionSpec("agent", "tensor", "fsdp")
  assert shards["final_norm"].spec == sharding.PartitionSpec("agent", None)


def test_indivisible_dims_are_replicated_not_errors():
  mesh = sharding.make_mesh((1, 1, 1, 8))
  spec = sharding.logical_to_spec(("agent", "kv_heads", "head_dim"), (3, 2, 8), mesh)
  assert spec == sharding.PartitionSpec(None, None, None)


@pytest.mark.parametrize("sizes,match", [((3, 1, 1, 1), "multiply to 3"),
                                         ((-1, -1, 1, 1), "at most one"),
                                         ({"model": 8}, "unknown mesh axes")])
def test_bad_mesh_sizes(sizes, match):
  with pytest.raises(sharding.MeshError, match=match):
    sharding.make_mesh(sizes)


def test_make_mesh_fills_minus_one():
  mesh = sharding.make_mesh({"agent": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"agent": 2, "data": 1, "fsdp": 4, "tensor": 1}


def test_default_positions_restart_per_packed_segment():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]], jnp.int32)
  np.testing.assert_array_equal(model.positions_from_segments(seg),
                                [[0, 1, 2, 0, 1, 0, 0, 0], [0, 0, 0, 1, 2, 3, 4, 5]])
  params = model.init_params(CFG, jax.random.key(6))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)
  implicit, _ = fwd(params, tokens, cfg=CFG, segment_ids_BxT=seg)
  explicit, _ = fwd(params, tokens, cfg=CFG, segment_ids_BxT=seg,
                    positions_BxT=model.positions_from_segments(seg))
  np.testing.assert_array_equal(implicit, explicit)
  # A packed segment gives the same logits as that example alone.
  alone, _ = fwd(params, tokens[:1, 3:5], cfg=CFG)
  np.testing.assert_allclose(implicit[0, 3:5], alone[0], atol=1e-5, rtol=0)
