"""Builders for tiny Hugging Face models and tokenizers (tests only: torch)."""

from __future__ import annotations

import json
import os
import shutil

FAMILIES = ("llama", "llama31", "mistral", "qwen2", "qwen3", "phi3", "gemma")
VOCAB = 160  # model vocabulary; the tokenizer has fewer tokens

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Alice has 3 apples and Bob has 5; together they have 8 apples.",
    "What is 12 + 7 * 3? Let's think step by step. The answer is \\boxed{33}.",
    "Multiagent finetuning keeps a population of diverse reasoning agents.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) { } [ ]",
]


def hf_config(family: str, **overrides):
  import transformers as tf

  c = dict(_COMMON)
  if family == "llama":
    cfg = tf.LlamaConfig(**c, tie_word_embeddings=False)
  elif family == "llama31":
    cfg = tf.LlamaConfig(**c, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})
  elif family == "mistral":
    cfg = tf.MistralConfig(**c, sliding_window=5, head_dim=16)
  elif family == "qwen2":
    cfg = tf.Qwen2Config(**c, tie_word_embeddings=True)
  elif family == "qwen3":
    cfg = tf.Qwen3Config(**c, head_dim=24, tie_word_embeddings=False)
  elif family == "phi3":
    cfg = tf.Phi3Config(**c)
  elif family == "gemma":
    c.update(num_key_value_heads=1)
    cfg = tf.GemmaConfig(**c, head_dim=32)
  else:
    raise ValueError(family)
  for k, v in overrides.items():
    setattr(cfg, k, v)
  cfg.architectures = [{"llama31": "LlamaForCausalLM"}.get(family, type(cfg).__name__.replace(
      "Config", "ForCausalLM"))]
  return cfg


def make_model(family: str, out_dir: str, tokenizer_dir: str | None, *, dtype: str = "float32",
               seed: int = 0, **overrides) -> str:
  """Save a tiny random model of `family` (every weight perturbed, so norms and
  biases are not the trivial 1/0) plus the tokenizer files."""
  import torch
  import transformers as tf

  torch.manual_seed(seed)
  cfg = hf_config(family, **overrides)
  model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model = model.to(getattr(torch, dtype))
  model.save_pretrained(out_dir, safe_serialization=True)
  if tokenizer_dir is not None:
    for name in os.listdir(tokenizer_dir):
      shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
  return out_dir


def make_tokenizer(out_dir: str) -> str:
  """A byte-level BPE with <pad>=0, <s>=1 (prepended), </s>=2 and a chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  import transformers as tf

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=140, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:100])
  tok.train_from_iterator(CORPUS * 20, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
  fast = tf.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n"
                        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
  fast.save_pretrained(out_dir)
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f)
  return out_dir
