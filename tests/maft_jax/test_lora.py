"""LoRA: zero-init adapters reproduce the base; merged weights equal the adapter forward."""

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
  merged = lora.merge(base, adapters, LCFG)
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
  merged = lora.merge(base, one, LCFG)
  a, _ = fwd(base, _tokens(), cfg=CFG, lora=one, lora_scale=LCFG.scale)
  b, _ = fwd(merged, _tokens(), cfg=CFG)
  np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)
