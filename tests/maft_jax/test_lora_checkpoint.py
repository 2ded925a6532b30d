"""LoRA population checkpoints: the base stored once or referenced (hash
checked, found again when the tree moves), and exports that transformers and
peft load with the adapter forward's logits."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from maft_jax import checkpoint, hf, lora, population, source
from maft_jax.tokenizer import Tokenizer

from tests import hf_fixtures
from tests.reference import hf_logits, padded_batch

A = 2
LCFG = lora.LoraConfig(rank=2, alpha=6.0, targets=("wq", "wo", "w_up", "w_down"))


def _adapted(hf_dir) -> tuple[population.Adapted, source.Source]:
  """The HF model as a base with random (B != 0) adapters for A agents."""
  src = source.describe("hf", hf_dir, dtype="float32")
  adapters = lora.init(src.cfg, LCFG, jax.random.key(3), A)
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape),
                          adapters)
  return population.Adapted(base=source.load_base(src), adapters=adapters,
                            scale=LCFG.scale), src


def _save(pop, src, path, base_ref=None):
  return checkpoint.save_population(path, pop, cfg=src.cfg, hf_config=src.hf_config,
                                    source_dtype=src.source_dtype, tokenizer_from=src.path,
                                    base_ref=base_ref)


def _same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_base_stored_once_or_referenced_by_hash(hf_models, tmp_path):
  tree = tmp_path / "tree"
  model_dir = str(tree / "model")
  shutil.copytree(hf_models("llama"), model_dir)
  pop, src = _adapted(model_dir)
  base_bytes = sum(os.path.getsize(f) for f in hf.weight_files(model_dir))
  size = lambda d: sum(os.path.getsize(os.path.join(r, n))  # noqa: E731
                       for r, _, ns in os.walk(d) for n in ns)

  # Stored: base/ holds the one base (no agent axis), params/ the adapters.
  stored = _save(pop, src, str(tmp_path / "stored"))
  meta = checkpoint.read_meta(stored)
  assert meta.lora == {"rank": 2, "alpha": 6.0, "targets": sorted(LCFG.targets)}
  assert meta.num_agents == A and meta.base_ref is None
  back, _ = checkpoint.load_population(stored)
  assert isinstance(back, population.Adapted) and back.scale == LCFG.scale
  _same(back.base, pop.base)
  _same(back.adapters, pop.adapters)
  assert size(os.path.join(stored, "base")) < 1.5 * base_bytes  # once, not A times

  # Referenced: no base/ at all; the base is read from the reference.
  ref = checkpoint.BaseRef.of("hf", model_dir)
  referenced = _save(pop, src, str(tree / "ckpt"), base_ref=ref)
  assert not os.path.exists(os.path.join(referenced, "base"))
  assert size(referenced) < base_bytes / 4
  back, meta = checkpoint.load_population(referenced)
  assert meta.base_ref == ref
  _same(back.base, pop.base)
  _same(back.adapters, pop.adapters)
  # It also loads as a source: the adapters in its own form, and its one base.
  ck = source.describe("checkpoint", referenced, dtype="float32")
  assert ck.one_base and ck.agents == A
  _same(source.load(ck).adapters, pop.adapters)
  _same(source.load_base(ck), pop.base)

  # The tree moved whole: the base is found again by its relative path.
  moved = tmp_path / "moved"
  shutil.move(str(tree), str(moved))
  back, meta = checkpoint.load_population(str(moved / "ckpt"))
  assert meta.base_ref.path == str(moved / "model")
  _same(back.base, pop.base)

  # A changed base is named, as is a missing one.
  weights = os.path.join(str(moved / "model"), "model.safetensors")
  data = bytearray(open(weights, "rb").read())
  data[-1] ^= 1  # the last byte of the last tensor
  open(weights, "wb").write(bytes(data))
  with pytest.raises(checkpoint.CheckpointError, match="model has changed since it was trained"):
    checkpoint.load_population(str(moved / "ckpt"))
  shutil.rmtree(moved / "model")
  with pytest.raises(checkpoint.CheckpointError, match=r"its base .*model \(hf\) is missing"):
    checkpoint.load_population(str(moved / "ckpt"))

  # A full population cannot reference a base; a full many-agent one has no one base.
  full = population.merged(pop, src.cfg)
  with pytest.raises(checkpoint.CheckpointError, match="base reference is for a LoRA"):
    _save(full, src, str(tmp_path / "x"), base_ref=ref)
  many = _save(full, src, str(tmp_path / "full"))
  with pytest.raises(source.SourceError, match="holds 2 full agents, not one base"):
    source.load_base(source.describe("checkpoint", many, dtype="float32"))


def test_exports_load_in_transformers_and_peft_with_the_adapter_logits(hf_models, tmp_path):
  """Merged agents reload in transformers, and the PEFT adapters over the
  exported base load with peft, each with the logits of the adapter forward."""
  import peft
  import torch
  import transformers as tf

  pop, src = _adapted(hf_models("llama"))
  ckpt = _save(pop, src, str(tmp_path / "ckpt"))
  tokens, mask, positions = padded_batch()
  want = np.asarray(population.forward(pop, tokens, cfg=src.cfg, positions=positions,
                                       segment_ids=mask.astype(np.int32)))
  valid = mask[None, :, :, None]

  merged = checkpoint.export_hf(ckpt, str(tmp_path / "hf"))
  assert merged == [str(tmp_path / "hf" / f"agent_{a}") for a in range(A)]
  for a, d in enumerate(merged):
    got = hf_logits(d, tokens, mask, positions)
    np.testing.assert_allclose(np.where(valid[0], got, 0), np.where(valid[0], want[a], 0),
                               atol=2e-4, rtol=1e-4, err_msg=f"agent {a}")
  assert Tokenizer(merged[0]).encode("hello") == Tokenizer(src.path).encode("hello")

  out = tmp_path / "peft"
  dirs = checkpoint.export_peft(ckpt, str(out))
  assert dirs == [str(out / f"agent_{a}") for a in range(A)]
  config = json.loads((out / "agent_0" / "adapter_config.json").read_text())
  assert config["r"] == 2 and config["lora_alpha"] == 6.0
  assert sorted(config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "up_proj"]
  for a, d in enumerate(dirs):
    base = tf.AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32,
                                                   attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, d)
    with torch.no_grad():
      got = model(input_ids=torch.tensor(tokens),
                  attention_mask=torch.tensor(mask.astype(np.int64)),
                  position_ids=torch.tensor(positions)).logits.numpy()
    np.testing.assert_allclose(np.where(valid[0], got, 0), np.where(valid[0], want[a], 0),
                               atol=2e-4, rtol=1e-4, err_msg=f"peft agent {a}")

  # A full population has no adapters; a fused architecture has no PEFT form.
  full = _save(population.merged(pop, src.cfg), src, str(tmp_path / "full"))
  with pytest.raises(checkpoint.CheckpointError, match="no adapters to write"):
    checkpoint.export_peft(full, str(tmp_path / "p2"))
  phi3 = hf_fixtures.hf_config("phi3").to_dict()
  with pytest.raises(hf.HFError, match="Phi3ForCausalLM fuses"):
    hf.save_peft(str(tmp_path / "p3"), {"wq": {}}, {"rank": 2, "alpha": 4.0},
                 hf.config_from_hf(phi3), phi3, base_dir=str(tmp_path))
