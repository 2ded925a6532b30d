"""Bad input fails early with a message naming the file, field or value."""

import json
import os
import shutil

import pytest

from maft_jax import hf
from maft_jax.tokenizer import TokenizerError
from tests import cli, hf_fixtures


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


def test_tokenizer_larger_than_embedding(tmp_path, tokenizer_dir):
  d = hf_fixtures.make_model("qwen2", str(tmp_path / "small"), tokenizer_dir, vocab_size=64)
  proc = cli.run("import_hf", f"--hf_dir={d}", f"--out={tmp_path}/ck", check=False)
  assert proc.returncode != 0
  assert "tokenizer has" in proc.stderr and "only 64 rows" in proc.stderr
  from maft_jax.tokenizer import Tokenizer, check_fits
  with pytest.raises(TokenizerError, match="only 64 rows"):
    check_fits(Tokenizer(d), 64, d)


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


def test_no_tokenizer_json(model_dir):
  os.remove(os.path.join(model_dir, "tokenizer.json"))
  from maft_jax.tokenizer import Tokenizer
  with pytest.raises(TokenizerError, match="no tokenizer.json"):
    Tokenizer(model_dir)
