"""config.json contents of full-size models users bring, for random-init
benchmarks and memory planning without downloading anything.

Each entry is the architecture-relevant subset of the published config.json;
`PUBLISHED_PARAMS` are the parameter counts the model cards / HF report, and
tests check that our shapes reproduce them exactly.
"""

from __future__ import annotations

from typing import Any

from maft_jax import hf
from maft_jax.model import ModelConfig

PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001),
    "mistral-7b-v0.2": dict(
        architectures=["MistralForCausalLM"], vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None,
        max_position_embeddings=32768, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2),
    "phi-3-mini-4k": dict(
        architectures=["Phi3ForCausalLM"], vocab_size=32064, hidden_size=3072,
        intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        sliding_window=2047, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000),
    "qwen2.5-0.5b": dict(
        architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=151643,
        eos_token_id=151643),
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151643),
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, tie_word_embeddings=True, attention_bias=False,
        bos_token_id=151643, eos_token_id=151645),
    "gemma-2b": dict(
        architectures=["GemmaForCausalLM"], vocab_size=256000, hidden_size=2048,
        intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        hidden_act="gelu", max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=1, pad_token_id=0),
}

# Llama-3.1-8B is Llama-3-8B with llama3 rope scaling to a 128k context.
PRESETS["llama-3.1-8b"] = dict(
    PRESETS["llama-3-8b"], max_position_embeddings=131072,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    eos_token_id=[128001, 128008, 128009])
# Qwen2-0.5B (the benchmark reference) has exactly Qwen2.5-0.5B's architecture.
PRESETS["qwen2-0.5b"] = PRESETS["qwen2.5-0.5b"]

PUBLISHED_PARAMS = {
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b-v0.2": 7_241_732_096,
    "phi-3-mini-4k": 3_821_079_552,
    "qwen2-0.5b": 494_032_768,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "gemma-2b": 2_506_172_416,
}


def hf_config(name: str) -> dict[str, Any]:
  if name not in PRESETS:
    raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
  return dict(PRESETS[name])


def model_config(name: str, **runtime) -> ModelConfig:
  """ModelConfig of a preset; `runtime` sets dtype / param_dtype / remat."""
  return hf.config_from_hf(hf_config(name), where=f"preset {name}", **runtime)
