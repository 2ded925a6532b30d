"""A population of A agents is one pytree, in one of two forms:

  full     a param dict whose leaves have a leading agent axis [A, ...]
  Adapted  one frozen base (a param dict without the agent axis) and every
           agent's LoRA adapters stacked [A, ...] (`lora.init`'s layout):
           agent a's weights are W + scale * A_a @ B_a on each adapted
           projection, never formed.

Functions in `model.py` are written for one agent; this module builds, slices
and lifts them over the agent axis (`vmap_axes`: the base of an Adapted
population is not mapped, so one copy serves every agent, and `parts` gives
one agent's base, adapters and scale inside the vmap). There is never a
Python loop over agents on a hot path: `forward` is one vmapped program for
every agent at once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Union

import jax
import jax.numpy as jnp

from maft_jax import lora, model, sharding
from maft_jax.model import ModelConfig, Params


@dataclasses.dataclass(frozen=True, eq=False)  # leaves are arrays: no field-wise ==
class Adapted:
  """A LoRA population (module docstring). A pytree: `base` and `adapters`
  are its children, `scale` (alpha / rank) is static."""
  base: Params
  adapters: dict
  scale: float


jax.tree_util.register_dataclass(Adapted, data_fields=["base", "adapters"],
                                 meta_fields=["scale"])

Population = Union[Params, Adapted]


def num_agents(pop: Population) -> int:
  return jax.tree.leaves(pop.adapters if isinstance(pop, Adapted) else pop)[0].shape[0]


def vmap_axes(pop: Population, axis: int = 0) -> Any:
  """`in_axes` of `pop` under an agent vmap: its agent axis at `axis`; an
  Adapted population's base is not mapped (read once for every agent)."""
  if isinstance(pop, Adapted):
    return Adapted(base=None, adapters=jax.tree.map(lambda _: axis, pop.adapters),
                   scale=pop.scale)
  return jax.tree.map(lambda _: axis, pop)


def parts(one: Population) -> tuple[Params, dict | None, float]:
  """One agent's (params, adapters or None, lora scale), inside an agent
  vmap: what `model`'s functions take as (params, lora=, lora_scale=)."""
  if isinstance(one, Adapted):
    return one.base, one.adapters, one.scale
  return one, None, 1.0


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


def select(pop: Params, i: int) -> Params:
  """Agent i's params (no agent axis) of a full population, as one program
  (not one eager slice per leaf). The index is static: a traced one slices
  dynamically, which on a population split over the agent axis gathers
  every agent onto every device."""
  if isinstance(pop, Adapted):
    raise TypeError("select takes a full population; agent i of an Adapted one is its base "
                    "with adapters[i] (lora.merge for full weights)")
  A = num_agents(pop)
  if not 0 <= i < A:
    raise IndexError(f"agent {i} of a population of {A}")
  return _select(pop, int(i))


@functools.partial(jax.jit, static_argnums=1)
def _select(pop: Params, i: int) -> Params:
  return jax.tree.map(lambda x: x[i], pop)


def take(pop: Population, start: int, stop: int) -> Population:
  """Agents start..stop-1 as a population of the same form (an Adapted one
  keeps its one base and slices its adapters)."""
  if isinstance(pop, Adapted):
    return dataclasses.replace(pop, adapters=jax.tree.map(lambda x: x[start:stop], pop.adapters))
  return jax.tree.map(lambda x: x[start:stop], pop)


def tile(pop: Population, num: int) -> Population:
  """A population of one agent as `num` copies of it (an Adapted one: of its
  adapters, over its one base)."""
  if isinstance(pop, Adapted):
    return dataclasses.replace(pop, adapters=jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num,) + x.shape[1:]), pop.adapters))
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num,) + x.shape[1:]), pop)


def logical_axes(pop: Population, cfg: ModelConfig) -> Population:
  """Logical axis names of every leaf of `pop` (arrays or shapes), in its own
  form: a full population's have 'agent' first (`axes`); an Adapted one's
  base has no agent axis (the rule table places it as one model), its
  adapters do."""
  if isinstance(pop, Adapted):
    return Adapted(base=model.param_axes(cfg), adapters=lora.stacked_axes(pop.adapters),
                   scale=pop.scale)
  return axes(cfg)


def merged(pop: Population, cfg: ModelConfig,
           placement: sharding.Placement = sharding.LOCAL) -> Params:
  """The full weights [A, ...] of a population: an Adapted one's adapters
  folded into copies of its base (`lora.merge`), on the rule table's
  layout; a full one as it is."""
  if not isinstance(pop, Adapted):
    return pop
  with placement.context():
    return _merged(pop, cfg, placement)


@functools.partial(jax.jit, static_argnames=("cfg", "placement"))
def _merged(pop: Adapted, cfg: ModelConfig, placement: sharding.Placement) -> Params:
  with placement.tracing():
    full = jax.vmap(lambda ad: lora.merge(pop.base, ad, pop.scale))(pop.adapters)
    return sharding.constrain_state(full, axes(cfg))


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


def forward(pop: Population, tokens, *, cfg: ModelConfig, positions=None, segment_ids=None,
            placement: sharding.Placement = sharding.LOCAL):
  """Logits f32[A, B, T, V] of every agent. Token-like inputs are shared [B, T]
  or per agent [A, B, T]."""

  def axis(x):
    return None if x is None or x.ndim == 2 else 0

  def one(agent, tokens, positions, segment_ids):
    params, lora, scale = parts(agent)
    logits, _ = model.forward(params, tokens, cfg=cfg, positions_BxT=positions,
                              segment_ids_BxT=segment_ids, lora=lora, lora_scale=scale)
    return logits

  with placement.tracing():
    return jax.vmap(one, in_axes=(vmap_axes(pop), axis(tokens), axis(positions),
                                  axis(segment_ids)),
                    spmd_axis_name=placement.spmd_axis_name)(pop, tokens, positions, segment_ids)
