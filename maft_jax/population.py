"""A population of A agents is one pytree whose leaves have a leading agent axis.

Functions in `model.py` are written for one agent; this module builds, slices
and lifts them over the agent axis. There is never a Python loop over agents
on a hot path: `forward` is one vmapped program for every agent at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from maft_jax import model, sharding
from maft_jax.model import ModelConfig, Params


def num_agents(pop: Params) -> int:
  return jax.tree.leaves(pop)[0].shape[0]


def replicate(params: Params, num: int) -> Params:
  """A copies of one base: the paper's starting population."""
  return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x)[None], (num,) + x.shape), params)


@functools.partial(jax.jit, static_argnames=("cfg", "num", "independent"))
def init(cfg: ModelConfig, key: jax.Array, num: int, *, independent: bool = True) -> Params:
  """Random population: independent inits (agent i from fold_in(key, i)) or
  `num` copies of the init from `key`."""
  if not independent:
    return replicate(model.init_params(cfg, key), num)
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num))
  return jax.vmap(lambda k: model.init_params(cfg, k))(keys)


def stack(agents: list[Params]) -> Params:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *agents)


@jax.jit
def select(pop: Params, i: int) -> Params:
  """Agent i's params (no agent axis), as one program (not one slice per leaf)."""
  return jax.tree.map(lambda x: x[i], pop)


def unstack(pop: Params) -> list[Params]:
  return [select(pop, i) for i in range(num_agents(pop))]


def shapes(cfg: ModelConfig, num: int) -> Params:
  """Abstract population (ShapeDtypeStructs) without allocating anything."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct((num,) + s.shape, s.dtype),
                      model.param_shapes(cfg))


def axes(cfg: ModelConfig) -> Params:
  """Logical axis names of every population leaf: ('agent', ...)."""
  return jax.tree.map(lambda a: ("agent",) + a, model.param_axes(cfg),
                      is_leaf=lambda x: isinstance(x, tuple))


def forward(pop: Params, tokens, *, cfg: ModelConfig, positions=None, segment_ids=None,
            placement: sharding.Placement = sharding.LOCAL):
  """Logits f32[A, B, T, V] of every agent. Token-like inputs are shared [B, T]
  or per agent [A, B, T]."""

  def axis(x):
    return None if x is None or x.ndim == 2 else 0

  def one(params, tokens, positions, segment_ids):
    logits, _ = model.forward(params, tokens, cfg=cfg, positions_BxT=positions,
                              segment_ids_BxT=segment_ids)
    return logits

  with placement.tracing():
    return jax.vmap(one, in_axes=(0, axis(tokens), axis(positions), axis(segment_ids)),
                    spmd_axis_name=placement.spmd_axis_name)(pop, tokens, positions, segment_ids)
