"""Population sampling: one jitted prefill + decode loop for every agent.

Rows are left-padded, so every row's last prompt token sits in the same cache
slot and each decode step writes one shared slot; positions come from the
padding mask (HF generate's convention), so padding never changes results.

Sampling methods are small frozen dataclasses that turn logits into a
sampling distribution; `Chain` composes them in HF's order (temperature,
top-k, top-p, min-p). Agent i draws from `fold_in(key, i)`, so its samples do
not depend on which other agents run beside it.
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
  if isinstance(method, Greedy):
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, method.process(logits_BxV.astype(jnp.float32))).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Samples:
  """tokens i32[A, B, N] (pad after the stop), logprobs f32[A, B, N] (the
  model's log-softmax at each drawn token), lengths i32[A, B] (stop included)."""
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array


def _sample_one(params: Params, prompt_BxT, mask_BxT, key, *, cfg: ModelConfig, method,
                max_new_tokens: int, stop_ids: tuple[int, ...], pad_id: int):
  B, T = prompt_BxT.shape
  N = max_new_tokens
  cache = model.init_cache(cfg, B, T + N)
  positions = model.positions_from_mask(mask_BxT)
  logits, cache = model.forward(params, prompt_BxT, cfg=cfg, positions_BxT=positions,
                                segment_ids_BxT=mask_BxT.astype(jnp.int32), cache=cache)
  stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

  def cond(state):
    step, _, _, done, _, _, _ = state
    return (step < N) & ~jnp.all(done)

  def body(state):
    step, tokens, logprobs, done, last_logits, pos, cache = state
    tok = draw(method, last_logits, jax.random.fold_in(key, step))
    lp = jnp.take_along_axis(jax.nn.log_softmax(last_logits, axis=-1), tok[:, None], axis=-1)[:, 0]
    tok = jnp.where(done, pad_id, tok)
    lp = jnp.where(done, 0.0, lp)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, lp[:, None], step, axis=1)
    done = done | jnp.isin(tok, stops)
    logits, cache = model.forward(params, tok[:, None], cfg=cfg, positions_BxT=pos[:, None],
                                  cache=cache)
    return step + 1, tokens, logprobs, done, logits[:, -1], pos + 1, cache

  state = (jnp.zeros((), jnp.int32), jnp.full((B, N), pad_id, jnp.int32),
           jnp.zeros((B, N), jnp.float32), jnp.zeros((B,), jnp.bool_), logits[:, -1],
           positions[:, -1] + 1, cache)
  _, tokens, logprobs, _, _, _, _ = jax.lax.while_loop(cond, body, state)
  is_stop = jnp.isin(tokens, stops)
  first_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, N)
  return tokens, logprobs, first_stop.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new_tokens", "stop_ids", "pad_id"))
def sample(pop: Params, prompts, prompt_mask, key, *, cfg: ModelConfig, method,
           max_new_tokens: int, stop_ids: tuple[int, ...] = (), pad_id: int = 0) -> Samples:
  """Sample every agent. prompts/prompt_mask: left-padded [B, T] shared by all
  agents or [A, B, T] per agent. Agent i uses key fold_in(key, i)."""
  A = jax.tree.leaves(pop)[0].shape[0]
  in_axis = 0 if prompts.ndim == 3 else None
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(A))
  fn = functools.partial(_sample_one, cfg=cfg, method=method, max_new_tokens=max_new_tokens,
                         stop_ids=stop_ids, pad_id=pad_id)
  tokens, logprobs, lengths = jax.vmap(fn, in_axes=(0, in_axis, in_axis, 0))(
      pop, prompts, prompt_mask, keys)
  return Samples(tokens=tokens, logprobs=logprobs, lengths=lengths)


jax.tree_util.register_dataclass(Samples, data_fields=["tokens", "logprobs", "lengths"],
                                 meta_fields=[])


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
