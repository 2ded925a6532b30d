"""Population sampling: one jitted prefill + decode loop for every agent.

Rows are left-padded, so every row's last prompt token sits in the same cache
slot and each decode step writes one shared slot; positions come from the
padding mask (HF generate's convention), so padding never changes results.

Sampling methods are small frozen dataclasses that turn logits into a
sampling distribution; `Chain` composes them in HF's order (temperature,
top-k, top-p, min-p). Agent i draws from `fold_in(key, i)` and row r of it
from `fold_in(that, r)`, so its samples do not depend on which other agents
or rows run beside it.

Two jitted programs: `prefill` reads the prompts into a KV cache (once per
prompt, shared by its num_samples rows), `decode` runs one `lax.while_loop`
that exits as soon as every row of every agent has stopped, with the prefill
state donated so the cache buffers are reused in place.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from maft_jax import model
from maft_jax.model import ModelConfig, Params

_NEG = -jnp.inf


class Method(Protocol):
  def process(self, logits_BxV: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Greedy:
  """Argmax (temperature 0)."""

  def process(self, logits_BxV):
    return logits_BxV


@dataclasses.dataclass(frozen=True)
class Temperature:
  temperature: float

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f"Temperature.temperature={self.temperature} must be > 0 (use Greedy)")

  def process(self, logits_BxV):
    return logits_BxV / self.temperature


@dataclasses.dataclass(frozen=True)
class TopK:
  k: int

  def __post_init__(self):
    if self.k < 1:
      raise ValueError(f"TopK.k={self.k} must be >= 1")

  def process(self, logits_BxV):
    k = min(self.k, logits_BxV.shape[-1])
    kth = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
    return jnp.where(logits_BxV < kth, _NEG, logits_BxV)


@dataclasses.dataclass(frozen=True)
class TopP:
  """Nucleus: the smallest set of top tokens whose probability reaches p."""
  p: float

  def __post_init__(self):
    if not 0 < self.p <= 1:
      raise ValueError(f"TopP.p={self.p} must be in (0, 1]")

  def process(self, logits_BxV):
    order = jnp.argsort(-logits_BxV, axis=-1)
    sorted_logits = jnp.take_along_axis(logits_BxV, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < p (the top one always).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < self.p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits_BxV.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits_BxV, _NEG)


@dataclasses.dataclass(frozen=True)
class MinP:
  """Drop tokens whose probability is below p times the top probability."""
  p: float

  def __post_init__(self):
    if not 0 <= self.p <= 1:
      raise ValueError(f"MinP.p={self.p} must be in [0, 1]")

  def process(self, logits_BxV):
    probs = jax.nn.softmax(logits_BxV, axis=-1)
    threshold = self.p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < threshold, _NEG, logits_BxV)


@dataclasses.dataclass(frozen=True)
class Chain:
  steps: tuple

  def process(self, logits_BxV):
    for step in self.steps:
      logits_BxV = step.process(logits_BxV)
    return logits_BxV


def from_flags(*, temperature: float, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0):
  """The method a command line asks for; temperature 0 is greedy."""
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if temperature == 0:
    return Greedy()
  steps = [Temperature(temperature)]
  if top_k:
    steps.append(TopK(top_k))
  if top_p < 1.0:
    steps.append(TopP(top_p))
  if min_p > 0.0:
    steps.append(MinP(min_p))
  return steps[0] if len(steps) == 1 else Chain(tuple(steps))


def draw(method, logits_BxV, key):
  """One token per row (all rows from `key`; the sampler keys rows separately)."""
  if isinstance(method, Greedy):
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, method.process(logits_BxV.astype(jnp.float32))).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Samples:
  """tokens i32[A, R, N] (pad after the stop), logprobs f32[A, R, N] (the
  model's log-softmax at each drawn token), lengths i32[A, R] (stop
  included), steps i32[A] (decode-loop iterations run). R = B * num_samples,
  prompt-major: row b * num_samples + s is sample s of prompt b."""
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  steps: jax.Array


jax.tree_util.register_dataclass(Samples, data_fields=["tokens", "logprobs", "lengths", "steps"],
                                 meta_fields=[])


def _prefill_one(params: Params, prompt_BxT, mask_BxT, *, cfg: ModelConfig, cache_len: int,
                 num_samples: int):
  """Prefill B prompts once, then give each of its num_samples rows a copy."""
  positions = model.positions_from_mask(mask_BxT)
  hidden, cache = model.prefill(params, prompt_BxT, cfg=cfg, positions_BxT=positions,
                                segment_ids_BxT=mask_BxT.astype(jnp.int32), cache_len=cache_len)
  logits = model.logits_from_hidden(params, hidden[:, -1:], cfg)[:, 0]
  rows = lambda x, axis: jnp.repeat(x, num_samples, axis=axis)  # noqa: E731
  cache = {"k": rows(cache["k"], 1), "v": rows(cache["v"], 1), "mask": rows(cache["mask"], 0),
           "pos": rows(cache["pos"], 0), "index": cache["index"]}
  return {"cache": cache, "logits": rows(logits, 0), "next_pos": rows(positions[:, -1] + 1, 0)}


def _decode_one(params: Params, state, key, row_ids, *, cfg: ModelConfig, method,
                max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int):
  """The decode loop for one agent; exits when every row has stopped."""
  N = max_new_tokens
  stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
  row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)

  def cond(carry):
    step, _, _, done, _, _, _ = carry
    return (step < N) & ~jnp.all(done)

  def body(carry):
    step, tokens, logprobs, done, logits, pos, cache = carry
    if isinstance(method, Greedy):
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
      processed = method.process(logits.astype(jnp.float32))
      tok = jax.vmap(jax.random.categorical)(step_keys, processed).astype(jnp.int32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
    tok = jnp.where(done, pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, lp[:, None], step, axis=1)
    done = done | jnp.isin(tok, stops)
    hidden, cache = model.forward_hidden(params, tok[:, None], cfg=cfg,
                                         positions_BxT=pos[:, None], cache=cache)
    logits = model.logits_from_hidden(params, hidden, cfg)[:, 0]
    return step + 1, tokens, logprobs, done, logits, pos + 1, cache

  R = row_ids.shape[0]
  carry = (jnp.zeros((), jnp.int32), jnp.full((R, N), pad_id, jnp.int32),
           jnp.zeros((R, N), jnp.float32), jnp.zeros((R,), jnp.bool_), state["logits"],
           state["next_pos"], state["cache"])
  steps, tokens, logprobs, _, logits, pos, cache = jax.lax.while_loop(cond, body, carry)
  is_stop = jnp.isin(tokens, stops)
  lengths = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, N)
  final = {"cache": cache, "logits": logits, "next_pos": pos}
  return (tokens, logprobs, lengths.astype(jnp.int32), steps), final


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "num_samples",
                                             "spmd_axis_name"))
def prefill(pop: Params, prompts, prompt_mask, *, cfg: ModelConfig, cache_len: int,
            num_samples: int = 1, spmd_axis_name: str | None = None):
  """Decode state of every agent after reading the prompts (see `sample`)."""
  in_axis = 0 if prompts.ndim == 3 else None
  fn = functools.partial(_prefill_one, cfg=cfg, cache_len=cache_len, num_samples=num_samples)
  return jax.vmap(fn, in_axes=(0, in_axis, in_axis),
                  spmd_axis_name=spmd_axis_name)(pop, prompts, prompt_mask)


@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new_tokens", "stop_ids",
                                             "pad_id", "spmd_axis_name"),
                   donate_argnames=("state",))
def decode(pop: Params, state, key, row_ids=None, *, cfg: ModelConfig, method,
           max_new_tokens: int, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
           spmd_axis_name: str | None = None) -> tuple[Samples, dict]:
  """Decode every agent from `prefill`'s state. The state is donated and the
  final state returned, so the loop updates the cache in the donated buffers
  instead of copying them first."""
  A = jax.tree.leaves(pop)[0].shape[0]
  if row_ids is None:
    row_ids = jnp.arange(state["logits"].shape[1])
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(A))
  fn = functools.partial(_decode_one, cfg=cfg, method=method, max_new_tokens=max_new_tokens,
                         stop_ids=stop_ids, pad_id=pad_id)
  samples, final = jax.vmap(fn, in_axes=(0, 0, 0, None),
                            spmd_axis_name=spmd_axis_name)(pop, state, keys, row_ids)
  return Samples(*samples), final


def sample(pop: Params, prompts, prompt_mask, key, *, cfg: ModelConfig, method,
           max_new_tokens: int, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
           num_samples: int = 1, row_ids=None, spmd_axis_name: str | None = None) -> Samples:
  """Sample every agent: one jitted prefill, then one jitted decode loop.

  prompts / prompt_mask: left-padded [B, T] shared by all agents, or [A, B, T]
  per agent. Each prompt is prefilled once and decoded num_samples times.
  Randomness: agent a, row r, step t draws with fold_in(fold_in(fold_in(key,
  a), row_ids[r]), t), so a row's samples depend only on the key, its agent
  slot and its row id (default: its index), never on the other agents or rows.

  spmd_axis_name: the mesh axis the agent axis is split over (e.g. 'agent',
  with that mesh current: `sharding.use_mesh`); None leaves placement to the
  inputs' shardings.
  """
  T = prompts.shape[-1]
  state = prefill(pop, prompts, prompt_mask, cfg=cfg, cache_len=T + max_new_tokens,
                  num_samples=num_samples, spmd_axis_name=spmd_axis_name)
  samples, _ = decode(pop, state, key, row_ids, cfg=cfg, method=method,
                      max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids), pad_id=pad_id,
                      spmd_axis_name=spmd_axis_name)
  return samples


def left_pad(rows: list[list[int]], pad_id: int, length: int | None = None):
  """i32[B, T] tokens and bool[B, T] mask, rows aligned to the right."""
  if any(len(r) == 0 for r in rows):
    raise ValueError("a prompt tokenised to zero tokens; every prompt needs at least one")
  T = max(len(r) for r in rows) if length is None else length
  tokens = np.full((len(rows), T), pad_id, np.int32)
  mask = np.zeros((len(rows), T), bool)
  for i, r in enumerate(rows):
    tokens[i, T - len(r):] = r
    mask[i, T - len(r):] = True
  return tokens, mask
