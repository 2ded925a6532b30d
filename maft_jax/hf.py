"""Hugging Face interchange: config.json, safetensors weights, tokenizer files.

Only safetensors weights are read: pickled `.bin`/`.pt` files can execute code
when loaded and are refused. Nothing here imports transformers or torch, and
`trust_remote_code` has no equivalent: only the architectures below load.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from maft_jax import model, safetensors_io
from maft_jax.model import ModelConfig, RopeScaling

# architectures[0] in config.json -> family name.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma",
}

# Tokenizer and generation files copied verbatim between HF dirs and checkpoints.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}


class HFError(ValueError):
  """A Hugging Face directory or config that maft_jax cannot use."""


# ----------------------------------------------------------------------------
# config.json -> ModelConfig


def read_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise HFError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise HFError(f"{path}: not valid JSON: {e}") from None


def architecture(hf_config: Mapping[str, Any], where: str = "config.json") -> str:
  archs = hf_config.get("architectures") or []
  arch = archs[0] if archs else None
  if arch not in SUPPORTED_ARCHITECTURES:
    raise HFError(f"{where}: architectures={archs!r} is not supported; supported: "
                  f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  return arch


def _rope(hf: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from transformers>=5 `rope_parameters` or older keys."""
  rp = hf.get("rope_parameters")
  if isinstance(rp, dict):
    params = rp
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
  else:
    params = hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", 10000.0)
  kind = params.get("rope_type", params.get("type", "default"))
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise HFError(f"{where}: partial_rotary_factor={partial} is not supported (only 1.0)")
  if kind == "default":
    return float(theta), None
  if kind == "linear":
    return float(theta), RopeScaling(kind="linear", factor=float(params["factor"]))
  if kind == "llama3":
    return float(theta), RopeScaling(
        kind="llama3", factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]))
  raise HFError(f"{where}: rope type {kind!r} is not supported; supported: default, linear, llama3")


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "bfloat16", param_dtype: str = "float32",
                   remat: str = "none", where: str = "config.json") -> ModelConfig:
  """Translate a config.json dict; fails naming the field it cannot honour."""
  arch = architecture(hf, where)
  family = SUPPORTED_ARCHITECTURES[arch]
  try:
    D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or D // H
    theta, scaling = _rope(hf, where)
    if hf.get("mlp_bias"):
      raise HFError(f"{where}: mlp_bias=true is not supported")
    attention_bias = bool(hf.get("attention_bias", False))
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
      raise HFError(f"{where}: use_sliding_window=true (per-layer windows) is not supported")
    sliding = hf.get("sliding_window") if family in ("mistral", "phi3") else None
    act = hf.get("hidden_act", "silu")
    if family == "gemma":
      # transformers maps Gemma's legacy "gelu" to the tanh approximation.
      act = hf.get("hidden_activation") or act
      act = "gelu_pytorch_tanh" if act == "gelu" else act
    activation = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "gelu": "gelu"}.get(act)
    if activation is None:
      raise HFError(f"{where}: hidden_act={act!r} is not supported")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=D,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=H,
        num_kv_heads=int(hf.get("num_key_value_heads") or H),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        qkv_bias=family == "qwen2" or (family in ("llama", "qwen3", "gemma") and attention_bias),
        o_bias=family in ("llama", "qwen3", "gemma") and attention_bias,
        qk_norm=family == "qwen3",
        activation=activation,
        norm_plus_one=family == "gemma",
        scale_embeddings=family == "gemma",
        tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma")),
        sliding_window=int(sliding) if sliding else None,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        dtype=dtype, param_dtype=param_dtype, remat=remat,
    )
  except KeyError as e:
    raise HFError(f"{where}: missing field {e.args[0]!r}") from None


# ----------------------------------------------------------------------------
# Weight files.


def weight_files(hf_dir: str) -> list[str]:
  """The safetensors files of a HF dir (sharded or not); refuses pickles."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise HFError(f"{index}: not a valid safetensors index ({e!r})") from None
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.isfile(os.path.join(hf_dir, name)):
        raise HFError(f"{index} lists {name}, which is missing from {hf_dir}")
    return [os.path.join(hf_dir, n) for n in files]
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  found = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if found:
    return found
  pickles = [n for n in sorted(os.listdir(hf_dir)) if n.endswith(PICKLE_SUFFIXES)]
  if pickles:
    raise HFError(
        f"{hf_dir}: only pickled weights ({', '.join(pickles)}) were found. maft_jax refuses "
        "pickled .bin/.pt checkpoints because loading them can execute arbitrary code; "
        "convert them to safetensors first (e.g. transformers' save_pretrained(..., "
        "safe_serialization=True) in a trusted environment).")
  raise HFError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or "
                "*.safetensors weights found")


def read_tensors(hf_dir: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """name -> memory-mapped array, and name -> file it came from."""
  tensors, origin = {}, {}
  for path in weight_files(hf_dir):
    for name, arr in safetensors_io.read(path).items():
      tensors[name], origin[name] = arr, path
  return tensors, origin


# ----------------------------------------------------------------------------
# Name and layout mapping. HF Linear weights are [out, in]; ours are [in, ...].
# Phi-3 stores q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`; we
# unfuse on import and fuse on export, both exact row slices.


def _layer_converters(cfg: ModelConfig):
  """our key -> (HF suffix in a layer, HF -> ours, ours -> HF)."""
  D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def proj_in(n):
    return (lambda w: w.T.reshape(D, n, Dh), lambda x: x.reshape(D, n * Dh).T)

  def heads(n):
    return (lambda w: w.reshape(n, Dh), lambda x: x.reshape(n * Dh))

  same = (lambda w: w, lambda x: x)
  transpose = (lambda w: w.T, lambda x: x.T)
  conv = {
      "attn_norm": ("input_layernorm.weight", *same),
      "mlp_norm": ("post_attention_layernorm.weight", *same),
      "wq": ("self_attn.q_proj.weight", *proj_in(H)),
      "wk": ("self_attn.k_proj.weight", *proj_in(K)),
      "wv": ("self_attn.v_proj.weight", *proj_in(K)),
      "wo": ("self_attn.o_proj.weight", lambda w: w.T.reshape(H, Dh, D),
             lambda x: x.reshape(H * Dh, D).T),
      "w_gate": ("mlp.gate_proj.weight", *transpose),
      "w_up": ("mlp.up_proj.weight", *transpose),
      "w_down": ("mlp.down_proj.weight", *transpose),
  }
  if cfg.qkv_bias:
    conv["bq"] = ("self_attn.q_proj.bias", *heads(H))
    conv["bk"] = ("self_attn.k_proj.bias", *heads(K))
    conv["bv"] = ("self_attn.v_proj.bias", *heads(K))
  if cfg.o_bias:
    conv["bo"] = ("self_attn.o_proj.bias", *same)
  if cfg.qk_norm:
    conv["q_norm"] = ("self_attn.q_norm.weight", *same)
    conv["k_norm"] = ("self_attn.k_norm.weight", *same)
  return conv


def _fusions(arch: str, cfg: ModelConfig) -> dict[str, list[tuple[str, int]]]:
  """Fused HF suffix -> [(unfused suffix, rows)] in row order."""
  if arch != "Phi3ForCausalLM":
    return {}
  q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
  return {
      "self_attn.qkv_proj.weight": [("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv),
                                    ("self_attn.v_proj.weight", kv)],
      "mlp.gate_up_proj.weight": [("mlp.gate_proj.weight", f), ("mlp.up_proj.weight", f)],
  }


def _unfused_getter(arch: str, cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                    origin: Mapping[str, str], where: str) -> tuple[Callable[[str], np.ndarray], set]:
  """A getter by unfused HF name, and the set of HF names it consumed."""
  parts = {}
  for fused, pieces in _fusions(arch, cfg).items():
    start, total = 0, sum(rows for _, rows in pieces)
    for name, rows in pieces:
      parts[name] = (fused, start, start + rows, total)
      start += rows
  used = set()

  def get(name: str) -> np.ndarray:
    prefix, _, rest = name.rpartition("layers.")
    layer, _, suffix = rest.partition(".")
    source = name
    if prefix and suffix in parts:
      source = f"{prefix}layers.{layer}.{parts[suffix][0]}"
    if source not in tensors:
      raise HFError(f"{where}: tensor {source!r} is missing from the weight files")
    used.add(source)
    w = tensors[source]
    if source != name:
      _, a, b, total = parts[suffix]
      if w.shape[0] != total:
        raise HFError(f"{origin[source]}: tensor {source!r} has shape {w.shape}; config.json "
                      f"implies {total} rows")
      w = w[a:b]
    return w
  return get, used


def params_from_tensors(tensors: Mapping[str, np.ndarray], origin: Mapping[str, str],
                        hf_config: Mapping[str, Any], cfg: ModelConfig,
                        where: str = "") -> dict[str, Any]:
  """One agent's params (numpy, cfg.param_dtype) from HF-named tensors."""
  arch = architecture(hf_config, where or "config.json")
  dt = np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(cfg.param_dtype)
  get, used = _unfused_getter(arch, cfg, tensors, origin, where)
  expected = {n: s.shape for n, s in _flatten(model.param_shapes(cfg)).items()}

  def convert(hf_name, to_ours):
    w = get(hf_name)
    try:
      return np.asarray(to_ours(w)).astype(dt)
    except ValueError:
      raise HFError(f"{origin[hf_name] if hf_name in origin else where}: tensor {hf_name!r} has "
                    f"shape {w.shape}, which does not match config.json") from None

  flat = {"embed": convert("model.embed_tokens.weight", lambda w: w),
          "final_norm": convert("model.norm.weight", lambda w: w)}
  if not cfg.tie_embeddings:
    flat["lm_head"] = convert("lm_head.weight", lambda w: w.T)
  for key, (suffix, to_ours, _) in _layer_converters(cfg).items():
    flat[f"layers/{key}"] = np.stack(
        [convert(f"model.layers.{i}.{suffix}", to_ours) for i in range(cfg.num_layers)])
  for name, arr in flat.items():
    if arr.shape != expected[name]:
      raise HFError(f"{where}: weights for {name!r} have shape {arr.shape} after conversion; "
                    f"config.json implies {expected[name]}")

  unexpected = [n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES)
                and not (cfg.tie_embeddings and n == "lm_head.weight")]
  if unexpected:
    raise HFError(f"{where}: {len(unexpected)} tensor(s) this {arch} config does not use, e.g. "
                  f"{sorted(unexpected)[:5]} (in {origin[unexpected[0]]})")
  return model._nest(flat)


def params_to_tensors(params: Mapping[str, Any], hf_config: Mapping[str, Any], cfg: ModelConfig,
                      dtype: str) -> dict[str, np.ndarray]:
  """HF-named tensors of one agent, cast to `dtype`."""
  arch = architecture(hf_config)
  dt = DTYPES[dtype]
  flat = {k: np.asarray(v) for k, v in _flatten(params).items()}
  out = {"model.embed_tokens.weight": flat["embed"], "model.norm.weight": flat["final_norm"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = flat["lm_head"].T
  for key, (suffix, _, to_hf) in _layer_converters(cfg).items():
    for i in range(cfg.num_layers):
      out[f"model.layers.{i}.{suffix}"] = to_hf(flat[f"layers/{key}"][i])
  for fused, pieces in _fusions(arch, cfg).items():
    for i in range(cfg.num_layers):
      out[f"model.layers.{i}.{fused}"] = np.concatenate(
          [out.pop(f"model.layers.{i}.{name}") for name, _ in pieces], axis=0)
  return {k: np.ascontiguousarray(v).astype(dt) for k, v in out.items()}


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, name + "/"))
    else:
      out[name] = v
  return out


def tensors_dtype(tensors: Mapping[str, np.ndarray]) -> str:
  """The floating dtype name most of a checkpoint's tensors are stored in."""
  counts: dict[str, int] = {}
  for a in tensors.values():
    for name, dt in DTYPES.items():
      if a.dtype == dt:
        counts[name] = counts.get(name, 0) + a.size
  return max(counts, key=counts.get) if counts else "float32"


# ----------------------------------------------------------------------------
# Whole directories.


@dataclasses.dataclass(frozen=True)
class HFModel:
  """One model read from a HF directory: numpy params of a single agent."""
  params: dict[str, Any]
  cfg: ModelConfig
  hf_config: dict[str, Any]
  source_dtype: str


def load(hf_dir: str, *, dtype: str = "bfloat16", param_dtype: str = "float32",
         remat: str = "none") -> HFModel:
  hf_config = read_config(hf_dir)
  where = os.path.join(hf_dir, "config.json")
  cfg = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, remat=remat, where=where)
  tensors, origin = read_tensors(hf_dir)
  params = params_from_tensors(tensors, origin, hf_config, cfg, where=hf_dir)
  return HFModel(params=params, cfg=cfg, hf_config=hf_config, source_dtype=tensors_dtype(tensors))


# Our LoRA targets -> the HF Linear each adapts (`lora.TARGETS`).
PEFT_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
                "w_down": "mlp.down_proj"}


def save_peft(out_dir: str, adapters: Mapping[str, Any], lora: Mapping[str, Any],
              cfg: ModelConfig, hf_config: Mapping[str, Any], *, base_dir: str) -> None:
  """One agent's adapters ({target: {"a": [L, in, r], "b": [L, r, out]}})
  as a PEFT LoRA directory over the HF model in `base_dir`, which
  `peft.PeftModel.from_pretrained(base, out_dir)` loads. A Linear's input
  and output dims are flattened as the weight converters flatten them, so
  lora_A.weight = a[l].T [r, in] and lora_B.weight = b[l].T [out, r]; PEFT
  scales by lora_alpha / r as we do."""
  arch = architecture(hf_config)
  fused = {m.rsplit(".", 1)[0] for fused in _fusions(arch, cfg).values() for m, _ in fused}
  if any(PEFT_MODULES[t] in fused for t in adapters):
    raise HFError(f"{arch} fuses {sorted(fused)} into one Linear, so separate adapters on them "
                  "have no PEFT form; export the merged agents instead")
  tensors = {}
  for t, ab in adapters.items():
    for i in range(cfg.num_layers):
      name = f"base_model.model.model.layers.{i}.{PEFT_MODULES[t]}"
      tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"][i]).T)
      tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"][i]).T)
  os.makedirs(out_dir, exist_ok=True)
  safetensors_io.write(os.path.join(out_dir, "adapter_model.safetensors"),
                       {k: v.astype(np.float32) for k, v in tensors.items()})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora["rank"]),
            "lora_alpha": float(lora["alpha"]), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True,
            "target_modules": sorted(PEFT_MODULES[t].rsplit(".", 1)[1] for t in adapters),
            "base_model_name_or_path": os.path.abspath(base_dir)}
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
  os.makedirs(dst_dir, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    path = os.path.join(src_dir, name)
    if os.path.isfile(path):
      shutil.copyfile(path, os.path.join(dst_dir, name))
      copied.append(name)
  return copied


def save(out_dir: str, params: Mapping[str, Any], cfg: ModelConfig, hf_config: Mapping[str, Any],
         *, dtype: str, tokenizer_dir: str | None = None, max_shard_bytes: int = 5 * 2**30):
  """Write a HF directory transformers loads: config.json, safetensors
  (sharded with an index above `max_shard_bytes`), tokenizer files."""
  if dtype not in DTYPES:
    raise HFError(f"export dtype {dtype!r} is not supported; supported: {', '.join(DTYPES)}")
  os.makedirs(out_dir, exist_ok=True)
  tensors = params_to_tensors(params, hf_config, cfg, dtype)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += tensors[name].nbytes
  if len(shards) == 1:
    safetensors_io.write(os.path.join(out_dir, "model.safetensors"), shards[0])
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      safetensors_io.write(os.path.join(out_dir, fname), shard)
      weight_map.update({n: fname for n in shard})
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": weight_map}, f, indent=2)
  config = dict(hf_config)
  for key in ("dtype", "torch_dtype"):
    if key in config or key == "dtype":
      config[key] = dtype
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if tokenizer_dir is not None:
    copy_tokenizer_files(tokenizer_dir, out_dir)
