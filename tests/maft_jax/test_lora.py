"""LoRA: zero-init adapters reproduce the base; merged weights equal the adapter forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from maft_jax import lora, model

CFG = model.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
fwd = jax.jit(model.forward, static_argnames=("cfg", "lora_scale"))


def _tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)


def test_zero_init_adapters_reproduce_base_exactly():
  base = model.init_params(CFG, jax.random.key(0))
  adapters = jax.tree.map(lambda x: x[0], lora.init(CFG, LCFG, jax.random.key(1), 1))
  plain, _ = fwd(base, _tokens(), cfg=CFG)
  with_lora, _ = fwd(base, _tokens(), cfg=CFG, lora=adapters, lora_scale=LCFG.scale)
  np.testing.assert_array_equal(plain, with_lora)


def test_merged_weights_equal_adapter_forward():
  base = model.init_params(CFG, jax.random.key(0))
  adapters = jax.tree.map(lambda x: x[0], lora.init(CFG, LCFG, jax.random.key(1), 1))
  # Non-zero B so the adapters matter.
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape),
                          adapters)
  merged = lora.merge(base, adapters, LCFG.scale)
  via_adapters, _ = fwd(base, _tokens(), cfg=CFG, lora=adapters, lora_scale=LCFG.scale)
  via_merged, _ = fwd(merged, _tokens(), cfg=CFG)
  plain, _ = fwd(base, _tokens(), cfg=CFG)
  np.testing.assert_allclose(via_adapters, via_merged, atol=2e-5, rtol=1e-5)
  assert np.abs(np.asarray(via_adapters) - np.asarray(plain)).max() > 1e-3


def test_shapes_and_targets():
  shapes = lora.adapter_shapes(CFG, LCFG)
  assert shapes["wq"] == {"a": (2, 32, 4), "b": (2, 4, 32)}
  assert shapes["wo"] == {"a": (2, 32, 4), "b": (2, 4, 32)}
  assert shapes["w_down"] == {"a": (2, 64, 4), "b": (2, 4, 32)}
  import pytest
  with pytest.raises(ValueError, match="targets"):
    lora.LoraConfig(targets=("nope",))


def test_lora_training_updates_adapters_only_and_learns():
  from maft_jax import finetune
  from tests.maft_jax.test_finetune import _batches, _examples, _stack_agents
  # A frozen head of std 0.02 cannot express confident logits whatever the
  # adapters do; a larger init gives the adapters something to steer.
  base = model.init_params(CFG, jax.random.key(3), init_std=0.3)
  base_before = jax.tree.map(np.asarray, base)
  adapters = lora.init(CFG, LCFG, jax.random.key(4), 2)
  batch = _stack_agents([_batches(_examples(s, n=4), b=4, pack=False) for s in (1, 2)])[0]
  h = finetune.Hyper(learning_rate=3e-2, warmup_frac=0.0)
  state = finetune.init_state(adapters, h, 60)
  losses = []
  for _ in range(60):
    state, m = finetune.train_step(state, batch, base, cfg=CFG, h=h, lora_scale=LCFG.scale)
    losses.append(np.asarray(m["loss"]))
  assert np.all(losses[-1] < 0.5 * losses[0]), (losses[0], losses[-1])
  jax.tree.map(np.testing.assert_array_equal, base, base_before)  # frozen, not donated
  # The trained adapters, merged, give the same logits as the adapter forward.
  one = jax.tree.map(lambda x: x[1], state["params"])
  merged = lora.merge(base, one, LCFG.scale)
  a, _ = fwd(base, _tokens(), cfg=CFG, lora=one, lora_scale=LCFG.scale)
  b, _ = fwd(merged, _tokens(), cfg=CFG)
  np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


def test_sft_trains_an_adapted_population_on_and_a_full_one_from_fresh_adapters():
  """sft.run on base + adapters keeps them apart (the result is Adapted, the
  base untouched); on a full population of copies it trains fresh adapters
  and merges them. From the same fresh adapters both give the same agents."""
  from maft_jax import finetune, population, seeds, sft
  from tests.maft_jax.test_finetune import _examples
  base = model.init_params(CFG, jax.random.key(3), init_std=0.3)
  examples = [_examples(1, n=4), [], _examples(2, n=4)]  # agent 1 has no data
  s = sft.Settings(hyper=finetune.Hyper(learning_rate=1e-2, warmup_frac=0.0), epochs=1,
                   batch_size=2, seq_len=16, lora=LCFG)
  kw = dict(cfg=CFG, settings=s, pad_id=0, progress=False)
  full = sft.run(population.replicate(base, 3), examples, **kw)
  fresh = population.Adapted(base=base, adapters=lora.init(CFG, LCFG, seeds.key(s.seed, 1), 3),
                             scale=LCFG.scale)
  adapted = sft.run(fresh, examples, **kw)
  assert isinstance(adapted.params, population.Adapted) and adapted.steps == full.steps == [2, 0, 2]
  assert adapted.params.base is base
  merged = population.merged(adapted.params, CFG)
  jax.tree.map(np.testing.assert_array_equal, merged, full.params)
  # Trained on (from adapters that are not fresh ones): the agents with data
  # move on from their adapters, the one without keeps them bit for bit.
  start = jax.tree.map(lambda x: x + 0.01, adapted.params.adapters)
  before = jax.tree.map(np.asarray, start)
  on = sft.run(dataclasses.replace(adapted.params, adapters=start), examples, **kw).params.adapters
  for a, moved in enumerate([True, False, True]):
    same = [np.array_equal(x[a], y[a]) for x, y in zip(jax.tree.leaves(before),
                                                       jax.tree.leaves(on))]
    assert not all(same) if moved else all(same), a
  # Adapters that are not the settings' are refused, naming both.
  import pytest
  with pytest.raises(ValueError, match="not those of LoraConfig"):
    other = lora.LoraConfig(rank=2, alpha=4.0)
    sft.run(population.Adapted(base=base, adapters=lora.init(CFG, other, jax.random.key(0), 3),
                               scale=other.scale), examples, **kw)
  with pytest.raises(ValueError, match="give settings.lora"):
    sft.run(fresh, examples, **dict(kw, settings=dataclasses.replace(s, lora=None)))
