"""Population SFT: vmapped step = per-agent steps, exact accumulation, packing,
memorisation, no update without data, non-finite loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maft_jax import data, finetune, model, population

CFG = model.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")
H = finetune.Hyper(learning_rate=1e-3, warmup_frac=0.0, ce_chunk=5)


def _examples(seed, n=6):
  rng = np.random.default_rng(seed)
  return [{"prompt_ids": rng.integers(1, 64, rng.integers(2, 6)).tolist(),
           "completion_ids": rng.integers(1, 64, rng.integers(2, 7)).tolist()} for _ in range(n)]


def _batches(examples, *, b=2, T=16, pack=True, seed=0):
  return list(data.sft_batches(examples, batch_size=b, seq_len=T, seed=seed, pad_id=0, pack=pack))


def _stack_agents(per_agent, k=1):
  """[A][batches] -> one dict of [A, k, b, T] arrays per step (k microbatches);
  an agent out of batches gets empty ones (no loss tokens)."""
  empty = jax.tree.map(np.zeros_like, next(b for b in per_agent if b)[0])
  n = max(len(b) for b in per_agent)
  steps = []
  for s in range(0, n, k):
    per = []
    for b in per_agent:
      micro = [b[i] if i < len(b) else empty for i in range(s, s + k)]
      per.append({key: np.stack([m[key] for m in micro]) for key in empty})
    steps.append({key: np.stack([p[key] for p in per]) for key in empty})
  return steps


def _run(pop, steps, h=H, total=10):
  # train_step donates the state: give it a copy so `pop` stays usable.
  state = finetune.init_state(jax.tree.map(jnp.copy, pop), h, total)
  metrics = []
  for batch in steps:
    state, m = finetune.train_step(state, batch, cfg=CFG, h=h)
    metrics.append(m)
  return state, metrics


def test_vmapped_step_equals_per_agent_steps():
  pop = population.init(CFG, jax.random.key(0), 3)
  per_agent = [_batches(_examples(s)) for s in range(3)]
  state, _ = _run(pop, _stack_agents(per_agent))
  for a in range(3):
    alone, _ = _run(population.stack([population.select(pop, a)]),
                    _stack_agents([per_agent[a]]))
    # Reductions run in another order vmapped, and Adam divides by sqrt(v): a
    # 3.6e-6 difference was seen on a fresh 2-core machine (2026-12-01). A real
    # mismatch moves weights by about the learning rate, 1e-3.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x[a], y[0], atol=1e-5, rtol=1e-4),
                 state["params"], alone["params"])


def test_accumulated_microbatches_equal_one_large_batch():
  pop = population.init(CFG, jax.random.key(1), 2)
  small = [_batches(_examples(s, n=8), b=2) for s in (5, 6)]
  two_micro = _stack_agents(small, k=2)
  one_big = [jax.tree.map(lambda x: x.reshape(x.shape[0], 1, -1, x.shape[-1]), b)
             for b in two_micro]
  s1, m1 = _run(pop, two_micro)
  s2, m2 = _run(pop, one_big)
  np.testing.assert_allclose(m1[0]["loss"], m2[0]["loss"], rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-6, rtol=1e-5),
               s1["params"], s2["params"])


def test_loss_tokens_packing_and_chunking():
  params = model.init_params(CFG, jax.random.key(2))
  ex = _examples(7, n=5)
  nll = jax.jit(finetune.token_nll, static_argnums=(2, 3))

  def total(batches, chunk=H.ce_chunk):
    s = n = 0
    for b in batches:
      si, ni = nll(params, b, CFG, chunk)
      s, n = s + float(si), n + int(ni)
    return s, n
  packed, unpacked = total(_batches(ex, pack=True)), total(_batches(ex, pack=False))
  assert packed[1] == unpacked[1] == sum(len(e["completion_ids"]) for e in ex)
  assert packed[0] == pytest.approx(unpacked[0], rel=1e-5)
  assert total(_batches(ex), chunk=1000) == pytest.approx(packed, rel=1e-6)
  # Changing prompt tokens changes the loss values but not which tokens count.
  other = [{**e, "prompt_ids": [(t * 7) % 63 + 1 for t in e["prompt_ids"]]} for e in ex]
  b_other, b_ex = _batches(other, pack=False), _batches(ex, pack=False)
  for x, y in zip(b_other, b_ex):
    np.testing.assert_array_equal(x["loss_mask_BxT"], y["loss_mask_BxT"])
  assert total(b_other)[1] == unpacked[1]


def test_memorises_a_handful_of_examples():
  """With bf16 compute and fp32 master parameters (the training default)."""
  cfg = dataclasses.replace(CFG, dtype="bfloat16")
  pop = population.init(cfg, jax.random.key(3), 2)
  ex = [_examples(8, n=4), _examples(9, n=4)]
  batch = _stack_agents([_batches(e, b=4, T=16, pack=False) for e in ex])[0]
  h = finetune.Hyper(learning_rate=3e-3, warmup_frac=0.1, clip_norm=1.0)
  state = finetune.init_state(pop, h, 80)
  losses = []
  for _ in range(80):
    state, m = finetune.train_step(state, batch, cfg=cfg, h=h)
    losses.append(np.asarray(m["loss"]))
  assert np.all(losses[-1] < 0.1 * losses[0]), (losses[0], losses[-1])
  assert state["params"]["embed"].dtype == jnp.float32


def test_agent_without_data_is_bit_identical():
  pop = population.init(CFG, jax.random.key(4), 3)
  per_agent = [_batches(_examples(1)), _batches(_examples(2, n=2)), []]
  empty = jax.tree.map(np.zeros_like, per_agent[0][0])
  per_agent[2] = [empty]
  steps = _stack_agents(per_agent)
  before = jax.tree.map(np.asarray, finetune.init_state(pop, H, 10))
  state, metrics = _run(pop, steps)
  for leaf_before, leaf_after in zip(jax.tree.leaves(before), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(leaf_after)[2], leaf_before[2])
  assert [bool(m["updated"][2]) for m in metrics] == [False] * len(steps)
  # Agent 1 ran out of data after its batches and stopped updating there.
  assert int(state["step"][0]) == len(per_agent[0]) and int(state["step"][1]) == 1
  assert not np.array_equal(np.asarray(state["params"]["embed"][0]), before["params"]["embed"][0])


def test_non_finite_loss_is_reported():
  pop = population.init(CFG, jax.random.key(5), 2)
  pop = dict(pop, embed=pop["embed"].at[1].set(jnp.nan))
  steps = _stack_agents([_batches(_examples(1)), _batches(_examples(2))])
  state = finetune.init_state(pop, H, 10)
  state, metrics = finetune.train_step(state, steps[0], cfg=CFG, h=H)
  with pytest.raises(finetune.NonFiniteLoss, match=r"step 3 for agent\(s\) \[1\]"):
    finetune.check_finite(metrics, 3)


def test_schedule_warmup_and_cosine():
  h = finetune.Hyper(learning_rate=1.0, warmup_frac=0.1)
  lrs = [float(finetune.learning_rate(s, 100, h)) for s in range(100)]
  assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
  assert lrs[10] == pytest.approx(1.0) and lrs[99] < 0.01
  assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_checkpoint_resume_on_another_mesh_gives_identical_next_step(tmp_path):
  from maft_jax import checkpoint, sharding
  pop = population.init(CFG, jax.random.key(7), 2)
  it = [data.sft_batches(_examples(s, n=12), batch_size=2, seq_len=16, seed=s, pad_id=0)
        for s in (1, 2)]

  def next_step():
    return {k: np.stack([b[k] for b in batch])[:, None]
            for batch in [[next(i) for i in it]] for k in batch[0]}

  state = finetune.init_state(jax.tree.map(jnp.copy, pop), H, 10)
  for _ in range(2):
    state, _ = finetune.train_step(state, next_step(), cfg=CFG, h=H)
  ckpts = checkpoint.TrainCheckpoints(str(tmp_path / "train"), max_to_keep=2)
  ckpts.save(2, state, {"data": [i.get_state() for i in it], "seed": 7})
  ckpts.wait()
  expected, m_expected = finetune.train_step(state, next_step(), cfg=CFG, h=H)

  # Rebuild everything: pipelines restored from their saved states, the train
  # state onto an 8-device mesh (agents x fsdp x tensor) instead of one device.
  mesh = sharding.make_mesh((2, 1, 2, 2))
  abstract = jax.eval_shape(lambda p: finetune.init_state(p, H, 10), pop)
  shards = sharding.state_shardings(abstract, population.axes(CFG), mesh)
  assert shards["params"]["layers"]["wq"].spec == sharding.PartitionSpec(
      "agent", None, "fsdp", "tensor", None)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract, shards)
  restored, extra = checkpoint.TrainCheckpoints(str(tmp_path / "train")).restore(target)
  assert extra["seed"] == 7
  it = [data.sft_batches(_examples(s, n=12), batch_size=2, seq_len=16, seed=s, pad_id=0)
        for s in (1, 2)]
  for i, st in zip(it, extra["data"]):
    i.set_state(st)
  with sharding.use_mesh(mesh):
    got, m_got = finetune.train_step(restored, next_step(), cfg=CFG, h=H)
  np.testing.assert_allclose(m_got["loss"], m_expected["loss"], rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5),
               got["params"], expected["params"])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5),
               got["opt"], expected["opt"])


def test_bf16_trainable_parameters_are_refused():
  cfg = dataclasses.replace(CFG, param_dtype="bfloat16")
  pop = population.init(cfg, jax.random.key(8), 2)
  with pytest.raises(ValueError, match="bfloat16.*float32 master parameters"):
    finetune.init_state(pop, H, 10)
