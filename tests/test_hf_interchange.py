"""HF -> import -> export -> HF: bit-identical tensors, same logits, tokenizer."""

import json
import os

import numpy as np
import pytest

from maft_jax import safetensors_io
from tests import cli, hf_fixtures
from tests.test_model_parity import _batch, hf_logits


def _tensors(hf_dir):
  out = {}
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
           else ["model.safetensors"])
  for name in files:
    out.update(safetensors_io.read(os.path.join(hf_dir, name)))
  return out


def _assert_bit_identical(a_dir, b_dir):
  a, b = _tensors(a_dir), _tensors(b_dir)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    assert a[name].shape == b[name].shape, name
    assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("family,dtype", [("phi3", "float32"), ("qwen2", "bfloat16"),
                                          ("gemma", "float32"), ("llama31", "bfloat16")])
def test_round_trip(family, dtype, tmp_path, tokenizer_dir):
  src = hf_fixtures.make_model(family, str(tmp_path / "src"), tokenizer_dir, dtype=dtype)
  ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
  cli.run("import_hf", f"--hf_dir={src}", f"--out={ckpt}", "--agents=2")
  cli.run("export_hf", f"--checkpoint={ckpt}", "--agent=all", f"--out={out}")
  for agent in ("agent_0", "agent_1"):
    _assert_bit_identical(src, os.path.join(out, agent))
  # The export reloads in transformers with identical logits.
  batch = _batch()
  np.testing.assert_array_equal(hf_logits(os.path.join(out, "agent_1"), *batch),
                                hf_logits(src, *batch))
  # ... and its tokenizer round-trips.
  import transformers as tf
  texts = hf_fixtures.CORPUS + ["unseen wørds 123"]
  a = tf.AutoTokenizer.from_pretrained(src)
  b = tf.AutoTokenizer.from_pretrained(os.path.join(out, "agent_0"))
  assert [a.encode(t) for t in texts] == [b.encode(t) for t in texts]
  assert a.eos_token_id == b.eos_token_id and a.pad_token_id == b.pad_token_id


def test_sharded_safetensors_and_single_agent_export(tmp_path, tokenizer_dir):
  src = str(tmp_path / "src")
  hf_fixtures.make_model("llama", src, tokenizer_dir)
  import transformers as tf
  import torch
  sharded = str(tmp_path / "sharded")
  tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(
      sharded, max_shard_size="40KB")
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  for name in os.listdir(tokenizer_dir):
    if not os.path.exists(os.path.join(sharded, name)):
      os.link(os.path.join(tokenizer_dir, name), os.path.join(sharded, name))
  ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
  cli.run("import_hf", f"--hf_dir={sharded}", f"--out={ckpt}", "--agents=1")
  cli.run("export_hf", f"--checkpoint={ckpt}", "--agent=0", f"--out={out}",
          "--max_shard_gb=0.00004")
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  _assert_bit_identical(src, out)
  tf.AutoModelForCausalLM.from_pretrained(out)


def test_our_tokenizer_matches_transformers(tokenizer_dir):
  import transformers as tf
  from maft_jax.tokenizer import Tokenizer

  ours, ref = Tokenizer(tokenizer_dir), tf.AutoTokenizer.from_pretrained(tokenizer_dir)
  for text in hf_fixtures.CORPUS + ["", "  spaces  and\nnewlines"]:
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
  assert (ours.bos_id, ours.pad_id, ours.eos_ids) == (ref.bos_token_id, ref.pad_token_id, (2,))
  assert ours.eos_id == ref.eos_token_id
  messages = [{"role": "user", "content": "What is 2+2?"}]
  assert ours.apply_chat_template(messages) == ref.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True)
