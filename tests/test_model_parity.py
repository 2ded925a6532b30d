"""Logit parity with transformers (torch, CPU, float32) for every family."""

import numpy as np
import pytest

from tests import hf_fixtures


def _batch(seed=0, B=3, T=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, hf_fixtures.VOCAB, (B, T))
  mask = np.ones((B, T), bool)
  mask[1, :4] = False   # left-padded row
  mask[2, -3:] = False  # right-padded row
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return tokens, mask, positions


def hf_logits(hf_dir, tokens, mask, positions):
  import torch
  import transformers as tf

  m = tf.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                              dtype=torch.float32)
  with torch.no_grad():
    return m(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
             position_ids=torch.tensor(positions)).logits.numpy()


def our_logits(hf_dir, tokens, mask, positions, dtype="float32"):
  """Logits (float32) of maft_jax's model; `dtype` is the compute dtype."""
  import jax
  import jax.numpy as jnp
  from maft_jax import hf, model

  m = hf.load(hf_dir, dtype=dtype)
  logits, _ = jax.jit(model.forward, static_argnames=("cfg",))(m.params, jnp.asarray(tokens), cfg=m.cfg,
                            positions_BxT=jnp.asarray(positions),
                            segment_ids_BxT=jnp.asarray(mask.astype(np.int32)))
  return np.asarray(logits, np.float32)


@pytest.mark.parametrize("family", hf_fixtures.FAMILIES)
def test_logits_match_transformers(family, hf_models):
  tokens, mask, positions = _batch()
  ref = hf_logits(hf_models(family), tokens, mask, positions)
  ours = our_logits(hf_models(family), tokens, mask, positions)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref)[mask].max() <= 1e-4


def test_sliding_window_is_applied(hf_models):
  """Mistral's window (5) must change the logits of late tokens: a model that
  ignored it would still match at early positions but not here."""
  import dataclasses
  import jax.numpy as jnp
  from maft_jax import hf, model

  tokens, mask, positions = _batch()
  m = hf.load(hf_models("mistral"), dtype="float32")
  full = dataclasses.replace(m.cfg, sliding_window=None)
  windowed, _ = model.forward(m.params, jnp.asarray(tokens), cfg=m.cfg)
  unwindowed, _ = model.forward(m.params, jnp.asarray(tokens), cfg=full)
  diff = np.abs(np.asarray(windowed) - np.asarray(unwindowed))
  assert diff[:, :5].max() < 1e-5 and diff[:, 6:].max() > 1e-3


def test_llama3_rope_scaling_changes_frequencies():
  from maft_jax import presets
  from maft_jax.model import rope_inv_freq
  import dataclasses

  cfg = presets.model_config("llama-3.1-8b")
  scaled = rope_inv_freq(cfg)
  plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
  assert np.allclose(scaled[:10], plain[:10])          # high frequencies kept
  assert np.allclose(scaled[-5:], plain[-5:] / 8.0)    # low frequencies / factor
