"""Decoder-only transformer for one agent, as pure functions over a param dict.

One `ModelConfig` covers the families MAFT users bring (Llama incl. Llama-3.1
rope scaling, Mistral, Qwen2, Qwen3, Phi-3, Gemma). Functions here are written
for ONE agent; `population.py` lifts them over the agent axis with `jax.vmap`.

Parameter layout (one agent; L = layers, D = model width, H/K = query/kv
heads, Dh = head width, F = MLP width, V = vocabulary):

    embed        [V, D]
    layers/      every leaf has a leading L axis and is scanned over
      attn_norm  [L, D]         mlp_norm [L, D]
      wq [L, D, H, Dh]   wk, wv [L, D, K, Dh]   wo [L, H, Dh, D]
      bq [L, H, Dh]      bk, bv [L, K, Dh]      bo [L, D]       (optional)
      q_norm, k_norm [L, Dh]                                    (Qwen3)
      w_gate, w_up [L, D, F]   w_down [L, F, D]
    final_norm   [D]
    lm_head      [D, V]                                         (untied only)

Padding and packing are both expressed with `segment_ids` (0 = padding): a
token attends to earlier tokens of its own non-zero segment. Positions are
explicit, so left-padded rows use `positions_from_mask` (HF generate's
convention) and packed rows restart at 0 per segment.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maft_jax import sharding

Params = dict[str, Any]

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """RoPE frequency scaling. `kind`: 'linear' or 'llama3' (Llama-3.1)."""

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Architecture plus the runtime numerics (dtypes, remat).

  Hashable, so it is passed to jitted functions as a static argument.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False          # Qwen2 (always), Llama/Qwen3 attention_bias
  o_bias: bool = False            # Llama/Qwen3 attention_bias
  qk_norm: bool = False           # Qwen3: RMSNorm on each q/k head
  activation: str = "silu"        # MLP gate activation: silu=SwiGLU, gelu*=GeGLU
  norm_plus_one: bool = False     # Gemma: RMSNorm scales by (1 + w)
  scale_embeddings: bool = False  # Gemma: embeddings times sqrt(D)
  tie_embeddings: bool = False
  sliding_window: int | None = None
  max_position_embeddings: int = 4096
  dtype: str = "bfloat16"         # compute dtype
  param_dtype: str = "float32"    # storage dtype of the parameters
  remat: str = "none"             # one of REMAT_POLICIES

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"ModelConfig.activation={self.activation!r}; "
                       f"supported: {ACTIVATIONS}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat={self.remat!r}; "
                       f"supported: {REMAT_POLICIES}")
    for field in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, field))
      except TypeError:
        raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r} is "
                         "not a dtype name") from None

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return cls(**d)


# ----------------------------------------------------------------------------
# Parameters: one table gives every leaf its shape, logical axes and init.


def _param_table(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
  """name -> (shape, logical axes, init kind) for one agent."""
  V, D, F = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
  L, H, K, Dh = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  norm_init = "zeros" if cfg.norm_plus_one else "ones"
  t = {
      "embed": ((V, D), ("vocab", "embed"), "normal"),
      "layers/attn_norm": ((L, D), ("layers", "norm"), norm_init),
      "layers/wq": ((L, D, H, Dh), ("layers", "embed", "heads", "head_dim"), "normal"),
      "layers/wk": ((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
      "layers/wv": ((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
      "layers/wo": ((L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), "normal"),
      "layers/mlp_norm": ((L, D), ("layers", "norm"), norm_init),
      "layers/w_gate": ((L, D, F), ("layers", "embed", "mlp"), "normal"),
      "layers/w_up": ((L, D, F), ("layers", "embed", "mlp"), "normal"),
      "layers/w_down": ((L, F, D), ("layers", "mlp", "embed"), "normal"),
      "final_norm": ((D,), ("norm",), norm_init),
  }
  if cfg.qkv_bias:
    t["layers/bq"] = ((L, H, Dh), ("layers", "heads", "head_dim"), "zeros")
    t["layers/bk"] = ((L, K, Dh), ("layers", "kv_heads", "head_dim"), "zeros")
    t["layers/bv"] = ((L, K, Dh), ("layers", "kv_heads", "head_dim"), "zeros")
  if cfg.o_bias:
    t["layers/bo"] = ((L, D), ("layers", "norm"), "zeros")
  if cfg.qk_norm:
    t["layers/q_norm"] = ((L, Dh), ("layers", "head_dim"), norm_init)
    t["layers/k_norm"] = ((L, Dh), ("layers", "head_dim"), norm_init)
  if not cfg.tie_embeddings:
    t["lm_head"] = ((D, V), ("embed", "vocab"), "normal")
  return t


def _nest(flat: dict[str, Any]) -> Params:
  out: Params = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def param_shapes(cfg: ModelConfig) -> Params:
  """Same tree as `init_params`, leaves are `jax.ShapeDtypeStruct`s."""
  dt = jnp.dtype(cfg.param_dtype)
  return _nest({n: jax.ShapeDtypeStruct(s, dt) for n, (s, _, _) in _param_table(cfg).items()})


def param_axes(cfg: ModelConfig) -> Params:
  """Same tree as `init_params`, leaves are tuples of logical axis names."""
  return _nest({n: a for n, (_, a, _) in _param_table(cfg).items()})


@functools.partial(jax.jit, static_argnames=("cfg", "init_std"))
def init_params(cfg: ModelConfig, key: jax.Array, *, init_std: float = 0.02) -> Params:
  """Random init (normal(0, init_std) matrices, as HF's initializer_range)."""
  table = _param_table(cfg)
  dt = jnp.dtype(cfg.param_dtype)
  keys = jax.random.split(key, len(table))
  flat = {}
  for k, (name, (shape, _, kind)) in zip(keys, sorted(table.items())):
    if kind == "normal":
      flat[name] = (init_std * jax.random.normal(k, shape, jnp.float32)).astype(dt)
    elif kind == "ones":
      flat[name] = jnp.ones(shape, dt)
    else:
      flat[name] = jnp.zeros(shape, dt)
  return _nest(flat)


def for_compute(params: Params, cfg: ModelConfig) -> Params:
  """The weights cast to the compute dtype, as the forward casts them on use
  (norm weights stay as stored: the forward casts those itself, Gemma's in
  f32). Forward passes on either give identical results; sampling casts once
  per call with this instead of reading f32 masters on every decode step,
  which would double its memory traffic. Only narrowing casts are made (bf16
  weights with an f32 compute dtype stay as they are), leaf by leaf, each
  keeping its sharding; leaves not cast are the same arrays."""
  dt = cfg.compute_dtype

  def cast(path, a):
    norm = str(getattr(path[-1], "key", "")).endswith("norm")
    return a if norm or a.dtype.itemsize <= dt.itemsize else a.astype(dt)

  return jax.tree_util.tree_map_with_path(cast, params)


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------
# Building blocks.


def rms_norm(x, w, cfg: ModelConfig):
  """RMSNorm in float32; HF Llama casts back before the weight, Gemma after."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
  if cfg.norm_plus_one:
    return (normed * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
  return w.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies f32[Dh/2], computed on the host like HF does."""
  dim = cfg.head_dim
  exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
  rs = cfg.rope_scaling
  if rs is None:
    return inv
  if rs.kind == "linear":
    return (inv / np.float32(rs.factor)).astype(np.float32)
  if rs.kind == "llama3":
    old = rs.original_max_position_embeddings
    low_wavelen = old / rs.low_freq_factor
    high_wavelen = old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"rope scaling kind {rs.kind!r} is not supported; "
                   "supported: linear, llama3")


def apply_rope(x_BxTxNxDh, cos_BxTxDh, sin_BxTxDh):
  """Rotate-half RoPE (the HF layout: first half pairs with second half)."""
  half = x_BxTxNxDh.shape[-1] // 2
  x1, x2 = x_BxTxNxDh[..., :half], x_BxTxNxDh[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_BxTxDh[:, :, None, :], sin_BxTxDh[:, :, None, :]
  return x_BxTxNxDh * cos + rotated * sin


def rope_tables(cfg: ModelConfig, positions_BxT, dtype):
  inv = jnp.asarray(rope_inv_freq(cfg))
  freqs = positions_BxT.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _activation(cfg: ModelConfig, x):
  if cfg.activation == "silu":
    return jax.nn.silu(x)
  return jax.nn.gelu(x, approximate=cfg.activation == "gelu_tanh")


def positions_from_mask(mask_BxT):
  """Positions for left- or right-padded rows: count of real tokens before."""
  mask = mask_BxT.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def positions_from_segments(segment_ids_BxT):
  """Positions restarting at 0 where the segment id changes (packed rows);
  for one segment with padding this equals `positions_from_mask`."""
  seg = segment_ids_BxT.astype(jnp.int32)
  idx = jnp.broadcast_to(jnp.arange(seg.shape[-1]), seg.shape)
  starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return jnp.where(seg != 0, idx - first, 0)


# ----------------------------------------------------------------------------
# KV cache. Slots are shared by all rows: prefill writes slots [0, T) of a
# left-padded batch, each decode step writes one slot. `mask` marks slots that
# hold a real token, `pos` their positions (for sliding windows).


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict[str, jax.Array]:
  dtype = cfg.compute_dtype if dtype is None else jnp.dtype(dtype)
  # [L, B, K, S, Dh]: (batch, kv head) lead, so both attention matmuls read
  # each layer's cache as it lies, without a transposed copy every step.
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "mask": jnp.zeros((batch, max_len), jnp.bool_),
      "pos": jnp.zeros((batch, max_len), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }


def cache_axes() -> dict[str, tuple[str, ...]]:
  """Logical axes of `init_cache`'s leaves."""
  kv = ("layers", "batch", "kv_heads", "cache_len", "head_dim")
  return {"k": kv, "v": kv, "mask": ("batch", "cache_len"),
          "pos": ("batch", "cache_len"), "index": ()}


# ----------------------------------------------------------------------------
# Forward.


def _attention_mask(q_seg, q_pos, k_seg, k_pos, q_slot, k_slot, cfg):
  """bool[B, T, S]: same non-zero segment, causal in slot order, window."""
  allowed = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
  allowed &= k_slot[None, None, :] <= q_slot[None, :, None]
  if cfg.sliding_window is not None:
    allowed &= (q_pos[:, :, None] - k_pos[:, None, :]) < cfg.sliding_window
  return allowed


def _attend(cfg: ModelConfig, q_BxTxHxDh, blocks):
  """Softmax attention over one or more key blocks [(k_BxKxSxDh, v_BxKxSxDh,
  mask_BxTxS), ...], normalised jointly (f32 scores), as if the blocks were
  concatenated."""
  B, T = q_BxTxHxDh.shape[:2]
  K, G = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
  q = q_BxTxHxDh.reshape(B, T, K, G, cfg.head_dim)
  scores = [jnp.where(mask[:, None, None],
                      jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
                      * (cfg.head_dim ** -0.5),
                      jnp.finfo(jnp.float32).min)
            for k, _, mask in blocks]
  probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(q.dtype)
  out, offset = 0.0, 0
  for (k, v, _), sc in zip(blocks, scores):
    width = sc.shape[-1]
    out = out + jnp.einsum("bkgts,bksd->btkgd", probs[..., offset:offset + width], v)
    offset += width
  return out.reshape(B, T, cfg.num_heads, cfg.head_dim)


def _project(name: str, eq: str, x, p, lora, dt):
  """x @ W (an einsum over W's input dims), plus the LoRA term when `lora`
  holds an adapter for W: ((x @ A) @ B) * scale, with A [in, r], B [r, out]
  over W's flattened input / output dims. Merged weights are never formed."""
  w = p[name]
  y = jnp.einsum(eq, x, w.astype(dt))
  if lora is not None and name in lora[0]:
    ab, scale = lora[0][name], lora[1]
    n_in = ab["a"].shape[0]
    batch_shape = y.shape[:2]
    xa = x.reshape(batch_shape + (n_in,)) @ ab["a"].astype(dt)
    y = y + ((xa @ ab["b"].astype(dt)) * jnp.asarray(scale, dt)).reshape(y.shape)
  return y


def _pin(x, last: str):
  """Pin a [B, T, ...] activation under a mesh (`sharding.constrain`): batch
  split by the rule table, the dim after T by its rule (`last`)."""
  return sharding.constrain(x, ("batch", "length", last) + ("head_dim",) * (x.ndim - 3))


def _layer(cfg: ModelConfig, x_BxTxD, p, cos, sin, self_mask_BxTxT, cached=None, lora=None):
  """One pre-norm block; returns (x, (k_BxKxTxDh, v_BxKxTxDh)), this call's
  keys/values in the cache's layout.

  `cached` is None or (k_BxKxSxDh, v_BxKxSxDh, mask_BxTxS): earlier cache
  slots the T new tokens also attend to. The cache itself is written by the
  caller, one slot range per call, so a decode step never copies it.
  """
  dt = cfg.compute_dtype
  h = rms_norm(x_BxTxD, p["attn_norm"], cfg)
  q = _pin(_project("wq", "btd,dhk->bthk", h, p, lora, dt), "heads")
  k = _pin(_project("wk", "btd,dhk->bthk", h, p, lora, dt), "kv_heads")
  v = _pin(_project("wv", "btd,dhk->bthk", h, p, lora, dt), "kv_heads")
  if cfg.qkv_bias:
    q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
  if cfg.qk_norm:
    q, k = rms_norm(q, p["q_norm"], cfg), rms_norm(k, p["k_norm"], cfg)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

  blocks = [(k, v, self_mask_BxTxT)]
  if cached is not None:
    k_old, v_old, old_mask = cached
    blocks.insert(0, (k_old.astype(dt), v_old.astype(dt), old_mask))
  out = _project("wo", "bthk,hkd->btd", _pin(_attend(cfg, q, blocks), "heads"), p, lora, dt)
  if cfg.o_bias:
    out = out + p["bo"].astype(dt)
  x = _pin(x_BxTxD + out, "activation_embed")

  h = rms_norm(x, p["mlp_norm"], cfg)
  gate = _pin(_project("w_gate", "btd,df->btf", h, p, lora, dt), "mlp")
  up = _pin(_project("w_up", "btd,df->btf", h, p, lora, dt), "mlp")
  x = x + _project("w_down", "btf,fd->btd", _activation(cfg, gate) * up, p, lora, dt)
  return _pin(x, "activation_embed"), (k, v)


def _remat(cfg: ModelConfig, fn):
  if cfg.remat == "none":
    return fn
  policy = {
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[cfg.remat]
  return jax.checkpoint(fn, policy=policy)


def embed_tokens(params: Params, tokens_BxT, cfg: ModelConfig):
  # The table is not pinned: gathering a whole [V, D] table for the lookup
  # costs more than re-splitting the [B, T, D] rows it returns.
  x = params["embed"][tokens_BxT].astype(cfg.compute_dtype)
  if cfg.scale_embeddings:
    # HF rounds sqrt(D) to the compute dtype before multiplying.
    x = x * jnp.asarray(cfg.hidden_size ** 0.5, cfg.compute_dtype)
  return _pin(x, "activation_embed")


def _scan_layers(params, x, cos, sin, segment_ids_BxT, positions_BxT, cfg, lora_layers,
                 lora_scale, *, keep_kv: bool):
  """All layers without a cache; with keep_kv, also every layer's k and v
  stacked [L, B, K, T, Dh] (for filling a cache)."""
  T = x.shape[1]
  slots = jnp.arange(T)
  self_mask = _attention_mask(segment_ids_BxT, positions_BxT, segment_ids_BxT, positions_BxT,
                              slots, slots, cfg)

  def body(x, p_l):
    p, l = p_l
    x, kv = _layer(cfg, x, p, cos, sin, self_mask, lora=(l, lora_scale) if l else None)
    return x, (kv if keep_kv else None)

  return jax.lax.scan(_remat(cfg, body), x, (params["layers"], lora_layers))


def prefill(params: Params, tokens_BxT, *, cfg: ModelConfig, positions_BxT, segment_ids_BxT,
            cache_len: int, lora=None, lora_scale: float = 1.0):
  """Hidden states of a prompt batch and a fresh cache of `cache_len` slots
  holding it (slots [0, T)). Attention runs over the prompt only: an empty
  cache is never read, and nothing cache-sized is folded at compile time."""
  B, T = tokens_BxT.shape
  segment_ids_BxT = segment_ids_BxT.astype(jnp.int32)
  positions_BxT = positions_BxT.astype(jnp.int32)
  x = embed_tokens(params, tokens_BxT, cfg)
  cos, sin = rope_tables(cfg, positions_BxT, cfg.compute_dtype)
  x, (k, v) = _scan_layers(params, x, cos, sin, segment_ids_BxT, positions_BxT, cfg,
                           {} if lora is None else lora, lora_scale, keep_kv=True)
  pad = cache_len - T
  if pad < 0:
    raise ValueError(f"prefill: cache_len={cache_len} is shorter than the prompt ({T})")
  kv_pad = ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0))
  cache = {
      "k": jnp.pad(k.astype(cfg.compute_dtype), kv_pad),
      "v": jnp.pad(v.astype(cfg.compute_dtype), kv_pad),
      "mask": jnp.pad(segment_ids_BxT != 0, ((0, 0), (0, pad))),
      "pos": jnp.pad(positions_BxT, ((0, 0), (0, pad))),
      "index": jnp.asarray(T, jnp.int32),
  }
  return rms_norm(x, params["final_norm"], cfg), cache


def forward_hidden(params: Params, tokens_BxT, *, cfg: ModelConfig,
                   positions_BxT=None, segment_ids_BxT=None, cache=None, lora=None,
                   lora_scale: float = 1.0):
  """Final-normed hidden states [B, T, D] and the updated cache (or None).

  Without a cache, tokens attend within their segment causally. With a cache,
  the T tokens are written at slots [cache.index, cache.index + T) and attend
  to every valid earlier slot; rows must be left-padded so that slot order is
  position order.

  `lora`: optional adapters {target: {"a": [L, in, r], "b": [L, r, out]}}
  (see lora.py) added to the frozen `params` with factor `lora_scale`.
  """
  B, T = tokens_BxT.shape
  lora_layers = {} if lora is None else lora
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones((B, T), jnp.int32)
  segment_ids_BxT = segment_ids_BxT.astype(jnp.int32)
  if positions_BxT is None:
    positions_BxT = positions_from_segments(segment_ids_BxT)
  positions_BxT = positions_BxT.astype(jnp.int32)

  if cache is not None:
    hidden, entries = extend_hidden(params, tokens_BxT, cfg=cfg, positions_BxT=positions_BxT,
                                    segment_ids_BxT=segment_ids_BxT, cache=cache, lora=lora,
                                    lora_scale=lora_scale)
    return hidden, write_cache(cache, entries)
  x = embed_tokens(params, tokens_BxT, cfg)
  cos, sin = rope_tables(cfg, positions_BxT, cfg.compute_dtype)
  x, _ = _scan_layers(params, x, cos, sin, segment_ids_BxT, positions_BxT, cfg, lora_layers,
                      lora_scale, keep_kv=False)
  return rms_norm(x, params["final_norm"], cfg), None


def extend_hidden(params: Params, tokens_BxT, *, cfg: ModelConfig, cache, positions_BxT,
                  segment_ids_BxT=None, lora=None, lora_scale: float = 1.0):
  """Hidden states of T new tokens after the cache's valid slots, and their
  cache entries {"k", "v": [L, B, K, T, Dh], "mask", "pos": [B, T]}, not yet
  written (`write_cache`; the sampler writes them itself, outside its
  agent vmap, so that the write stays an in-place slice update)."""
  B, T = tokens_BxT.shape
  lora_layers = {} if lora is None else lora
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.ones((B, T), jnp.int32)
  positions_BxT = positions_BxT.astype(jnp.int32)
  x = embed_tokens(params, tokens_BxT, cfg)
  cos, sin = rope_tables(cfg, positions_BxT, cfg.compute_dtype)
  slots = jnp.arange(T)

  # Cached tokens are one segment (1) per row; padding is segment 0. The new
  # tokens attend to every valid earlier slot (all slots < start) and, among
  # themselves, causally.
  S = cache["mask"].shape[1]
  valid = segment_ids_BxT != 0
  q_seg = valid.astype(jnp.int32)
  self_mask = _attention_mask(q_seg, positions_BxT, q_seg, positions_BxT, slots, slots, cfg)
  old_mask = _attention_mask(q_seg, positions_BxT, cache["mask"].astype(jnp.int32), cache["pos"],
                             jnp.full((T,), S), jnp.arange(S), cfg)

  # The cache is read-only in the layer loop and the new entries are its
  # outputs: updating a loop-carried cache makes XLA copy all of it on every
  # layer. Weights and cache are loop inputs. Under an agent vmap, a scan
  # moves its inputs' agent axis to 1 and the constants it closes over to 0,
  # so the sampler hands them in layer-major ([L, A, ...]) and nothing moves.
  def body(x, xs):
    p, k_old, v_old, l = xs
    x, (k_new, v_new) = _layer(cfg, x, p, cos, sin, self_mask, (k_old, v_old, old_mask),
                               lora=(l, lora_scale) if l else None)
    return x, (k_new.astype(cache["k"].dtype), v_new.astype(cache["v"].dtype))

  x, (k_new, v_new) = jax.lax.scan(
      body, x, (params["layers"], cache["k"], cache["v"], lora_layers))
  entries = {"k": k_new, "v": v_new, "mask": valid, "pos": positions_BxT}
  return rms_norm(x, params["final_norm"], cfg), entries


def write_cache(cache, entries):
  """`cache` with `extend_hidden`'s entries written at slots [index, index + T).
  Slots are the second-to-last dim of k/v and the last of mask/pos, in one
  agent's cache and in the sampler's population cache ([L, A, B, K, S, Dh],
  [A, B, S]) alike."""
  start, T = cache["index"], entries["mask"].shape[-1]

  def put(x, new, axis):
    return jax.lax.dynamic_update_slice_in_dim(x, new, start, axis=x.ndim + axis)

  return {"k": put(cache["k"], entries["k"], -2), "v": put(cache["v"], entries["v"], -2),
          "mask": put(cache["mask"], entries["mask"], -1),
          "pos": put(cache["pos"], entries["pos"], -1), "index": start + T}


def logits_from_hidden(params: Params, hidden_BxTxD, cfg: ModelConfig):
  """f32 logits; the head runs in the compute dtype with f32 accumulation."""
  dt = cfg.compute_dtype
  if cfg.tie_embeddings:
    logits = jnp.einsum("btd,vd->btv", hidden_BxTxD.astype(dt), params["embed"].astype(dt),
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("btd,dv->btv", hidden_BxTxD.astype(dt), params["lm_head"].astype(dt),
                        preferred_element_type=jnp.float32)
  return _pin(logits, "vocab")


def forward(params: Params, tokens_BxT, *, cfg: ModelConfig, positions_BxT=None,
            segment_ids_BxT=None, cache=None, lora=None, lora_scale: float = 1.0):
  """Logits f32[B, T, V] and the updated cache (None without a cache)."""
  hidden, cache = forward_hidden(params, tokens_BxT, cfg=cfg, positions_BxT=positions_BxT,
                                 segment_ids_BxT=segment_ids_BxT, cache=cache, lora=lora,
                                 lora_scale=lora_scale)
  return logits_from_hidden(params, hidden, cfg), cache
