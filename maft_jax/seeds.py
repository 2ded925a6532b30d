"""Randomness is derived, never carried: every key comes from the run's seed
by `fold_in` along a path of integers (iteration, stage, round, agent, row,
step), never by arithmetic on seeds, so two paths never share a stream and
a draw depends only on its own path.

    key = seeds.key(seed, iteration, stage_index)   # fold_in(fold_in(key(seed), i), s)
    grain_seed = seeds.to_int(seeds.fold(key, a))   # for APIs that take an int seed
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fold(key: jax.Array, *path: int) -> jax.Array:
  """`key` folded with each integer of `path` in turn."""
  for i in path:
    key = jax.random.fold_in(key, i)
  return key


def key(seed: int, *path: int) -> jax.Array:
  """The key at `path` under `seed`."""
  return fold(jax.random.key(seed), *path)


def to_int(key: jax.Array) -> int:
  """An int seed in [0, 2^31) drawn from `key`, for APIs that take one
  (grain's shuffles)."""
  return int(jax.random.bits(key, dtype=jnp.uint32)) >> 1
