"""transformers as the reference, and tensor comparisons: the logits and
greedy ids transformers gives for an HF directory, the logits of ours for the
same directory, and the safetensors of two HF directories compared bit for bit."""

import json
import os

import numpy as np

from maft_jax import safetensors_io

from tests import hf_fixtures


def padded_batch(seed=0, B=3, T=12):
  """Random tokens [B, T] with a full row, a left-padded and a right-padded one."""
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


def hf_greedy(hf_dir, prompts, max_new_tokens, chat=False):
  """transformers' greedy ids per prompt (EOS included); `chat`: each prompt
  as a user message through the chat template."""
  import torch
  import transformers as tf
  tok = tf.AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
  model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                  attn_implementation="eager")
  if chat:
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True) for p in prompts]
  enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
  with torch.no_grad():
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
  rows = []
  for row in out[:, enc["input_ids"].shape[1]:].tolist():
    if tok.eos_token_id in row:
      row = row[:row.index(tok.eos_token_id) + 1]
    rows.append(row)
  return rows


def tensors(hf_dir):
  out = {}
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
           else ["model.safetensors"])
  for name in files:
    out.update(safetensors_io.read(os.path.join(hf_dir, name)))
  return out


def assert_bit_identical(a_dir, b_dir):
  a, b = tensors(a_dir), tensors(b_dir)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    assert a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name


def same_update(x, y, where, lr):
  """Equal parameters after one Adam step, to fp32 reduction order. Adam's
  first step is ~lr * g / (|g| + eps): where a gradient is about eps, a
  last-bit difference in g moves the update by a visible fraction of lr, so
  a few such elements may differ by up to 5% of lr; the rest agree to 1e-6."""
  diff = np.abs(x - y)
  assert diff.max() <= 0.05 * lr, (where, diff.max())
  assert np.mean(diff > 1e-6) < 1e-3, (where, np.mean(diff > 1e-6))
