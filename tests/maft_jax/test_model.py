"""Logit parity with transformers (torch, CPU, float32) for every family."""

import numpy as np
import pytest

from tests import hf_fixtures
from tests.reference import hf_logits, our_logits, padded_batch


@pytest.mark.parametrize("family", hf_fixtures.FAMILIES)
def test_logits_match_transformers(family, hf_models):
  tokens, mask, positions = padded_batch()
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

  tokens, mask, positions = padded_batch()
  m = hf.load(hf_models("mistral"), dtype="float32")
  full = dataclasses.replace(m.cfg, sliding_window=None)
  windowed, _ = model.forward(m.params, jnp.asarray(tokens), cfg=m.cfg)
  unwindowed, _ = model.forward(m.params, jnp.asarray(tokens), cfg=full)
  diff = np.abs(np.asarray(windowed) - np.asarray(unwindowed))
  assert diff[:, :5].max() < 1e-5 and diff[:, 6:].max() > 1e-3


def test_llama3_rope_scaling_changes_frequencies():
  import dataclasses

  from maft_jax import presets
  from maft_jax.model import rope_inv_freq

  cfg = presets.model_config("llama-3.1-8b")
  scaled = rope_inv_freq(cfg)
  plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
  assert np.allclose(scaled[:10], plain[:10])          # high frequencies kept
  assert np.allclose(scaled[-5:], plain[-5:] / 8.0)    # low frequencies / factor
