"""Full-size configs: shapes from jax.eval_shape reproduce published counts."""

import jax
import pytest

from maft_jax import model, population, presets


@pytest.mark.parametrize("name", ["llama-3-8b", "mistral-7b-v0.2", "phi-3-mini-4k",
                                  "qwen2.5-0.5b", "qwen2.5-7b", "gemma-2b", "llama-3.1-8b",
                                  "qwen3-0.6b"])
def test_parameter_counts(name):
  cfg = presets.model_config(name)
  shapes = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0))
  assert model.count_params(shapes) == presets.PUBLISHED_PARAMS[name]
  pop = jax.eval_shape(lambda k: population.init(cfg, k, 6), jax.random.key(0))
  assert model.count_params(pop) == 6 * presets.PUBLISHED_PARAMS[name]


def test_family_features():
  assert presets.model_config("qwen2.5-7b").qkv_bias
  assert presets.model_config("qwen3-0.6b").qk_norm
  g = presets.model_config("gemma-2b")
  assert g.norm_plus_one and g.scale_embeddings and g.tie_embeddings
  assert g.activation == "gelu_tanh"  # legacy hidden_act="gelu" means tanh GeGLU
  assert presets.model_config("llama-3.1-8b").rope_scaling.kind == "llama3"
  assert presets.model_config("phi-3-mini-4k").sliding_window == 2047
