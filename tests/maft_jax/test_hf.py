"""maft_jax.hf: HF -> import -> export -> HF is bit-identical for every family and
dtype, sharded safetensors in and out, and bad input (architecture, weights,
shards, fields) fails naming the file or field."""

import json
import os
import shutil

import numpy as np
import pytest

from maft_jax import checkpoint, hf

from tests import cli, hf_fixtures
from tests.reference import assert_bit_identical, hf_logits, padded_batch


@pytest.mark.parametrize("family,dtype", [("phi3", "float32"), ("qwen2", "bfloat16"),
                                          ("gemma", "float32"), ("llama31", "bfloat16")])
def test_round_trip(family, dtype, tmp_path, tokenizer_dir):
  src = hf_fixtures.make_model(family, str(tmp_path / "src"), tokenizer_dir, dtype=dtype)
  ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
  # In process: what launch.import_hf and launch.export_hf run (their command
  # lines are the sharded test's).
  checkpoint.import_hf(src, ckpt, agents=2)
  checkpoint.export_hf(ckpt, out)
  for agent in ("agent_0", "agent_1"):
    assert_bit_identical(src, os.path.join(out, agent))
  # The export reloads in transformers with identical logits.
  batch = padded_batch()
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
  import torch
  import transformers as tf
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
  assert_bit_identical(src, out)
  tf.AutoModelForCausalLM.from_pretrained(out)
  # An agent the checkpoint does not hold is named before anything is written.
  with pytest.raises(checkpoint.CheckpointError, match=r"agent 1: .*ckpt has agents 0\.\.0"):
    checkpoint.export_hf(ckpt, str(tmp_path / "none"), agents=[1])
  assert not os.path.exists(tmp_path / "none")


@pytest.fixture
def model_dir(tmp_path, hf_models):
  d = str(tmp_path / "m")
  shutil.copytree(hf_models("llama"), d)
  return d


def test_unsupported_architecture_lists_supported(model_dir):
  path = os.path.join(model_dir, "config.json")
  cfg = json.load(open(path))
  cfg["architectures"] = ["GPT2LMHeadModel"]
  json.dump(cfg, open(path, "w"))
  with pytest.raises(hf.HFError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM.*"
                                       "GemmaForCausalLM"):
    hf.load(model_dir)


def test_missing_weights(model_dir):
  os.remove(os.path.join(model_dir, "model.safetensors"))
  with pytest.raises(hf.HFError, match=f"{model_dir}: no model.safetensors"):
    hf.load(model_dir)


def test_missing_shard_named(model_dir):
  index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002.safetensors"}}
  json.dump(index, open(os.path.join(model_dir, "model.safetensors.index.json"), "w"))
  with pytest.raises(hf.HFError, match="lists model-00002.safetensors, which is missing"):
    hf.load(model_dir)


def test_truncated_safetensors_named(model_dir):
  path = os.path.join(model_dir, "model.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(ValueError, match=f"{path}: truncated safetensors file"):
    hf.load(model_dir)
  with open(path, "r+b") as f:
    f.truncate(5)
  with pytest.raises(ValueError, match=f"{path}: truncated"):
    hf.load(model_dir)


def test_missing_tensor_named(model_dir):
  from maft_jax import safetensors_io
  path = os.path.join(model_dir, "model.safetensors")
  tensors = {k: v.copy() for k, v in safetensors_io.read(path).items()}
  del tensors["model.layers.1.mlp.up_proj.weight"]
  safetensors_io.write(path, tensors)
  with pytest.raises(hf.HFError, match="model.layers.1.mlp.up_proj.weight.*missing"):
    hf.load(model_dir)


def test_pickled_weights_refused(model_dir):
  os.remove(os.path.join(model_dir, "model.safetensors"))
  open(os.path.join(model_dir, "pytorch_model.bin"), "wb").write(b"not loaded")
  with pytest.raises(hf.HFError, match="pytorch_model.bin.*refuses pickled"):
    hf.load(model_dir)
  proc = cli.run("import_hf", f"--hf_dir={model_dir}", f"--out={model_dir}/ck", check=False)
  assert proc.returncode != 0 and "refuses pickled" in proc.stderr


def test_unsupported_rope_and_fields():
  base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8,
              intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
  with pytest.raises(hf.HFError, match="rope type 'yarn' is not supported"):
    hf.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
  with pytest.raises(hf.HFError, match="mlp_bias"):
    hf.config_from_hf({**base, "mlp_bias": True})
  del base["hidden_size"]
  with pytest.raises(hf.HFError, match="missing field 'hidden_size'"):
    hf.config_from_hf(base)
