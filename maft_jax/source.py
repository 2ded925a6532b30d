"""Where a population comes from, and the one way to load it.

    src = source.describe("hf", path, dtype="bfloat16")   # reads no weights
    src.cfg, src.tokenizer(), src.agents
    pop = source.load(src, 6, placement)                 # [6, ...] leaves on its mesh

A source is a HF model directory (one agent) or a population checkpoint
(`checkpoint.save_population`: one agent or several, full or LoRA). `load`
gives `agents` agents in the source's own form: copies of a one-agent
source, or a checkpoint's own agents (or its first `agents`). `adapted`
gives them as one base with LoRA adapters (`population.Adapted`): a LoRA
checkpoint's own, or fresh adapters over a one-model source. On a mesh every array is placed by the rule table as it is
read: each device receives only its shard, so no device or host ever holds a
population of copies whole (6 copies of an 8B model are 192 GB in f32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maft_jax import checkpoint, hf, population, sharding
from maft_jax.model import ModelConfig, Params
from maft_jax.tokenizer import Tokenizer, check_fits

KINDS = ("hf", "checkpoint")


class SourceError(ValueError):
  """A source that cannot give what was asked (the message names its path)."""


@dataclasses.dataclass(frozen=True)
class Source:
  kind: str                            # one of KINDS
  path: str
  cfg: ModelConfig                     # with the dtype, param_dtype and remat asked for
  hf_config: dict[str, Any]            # written back on export
  source_dtype: str                    # the dtype the weights were stored in
  agents: int                          # agents stored (a HF directory: 1)
  tokenizer_dir: str
  lora: dict | None = None             # a LoRA checkpoint's adapters (`checkpoint.PopulationMeta`)
  stored_dtype: str = "float32"        # the dtype its parameters are stored in here

  @property
  def one_base(self) -> bool:
    """Whether the source holds one base model (what LoRA adapters go over)."""
    return self.agents == 1 or self.lora is not None

  def tokenizer(self) -> Tokenizer:
    tok = Tokenizer(self.tokenizer_dir)
    check_fits(tok, self.cfg.vocab_size, self.path)
    return tok


def describe(kind: str, path: str, *, dtype: str = "bfloat16", param_dtype: str | None = None,
             remat: str | None = None) -> Source:
  """The source at `path`, from its config files (weights are not read).
  `param_dtype` and `remat` default to a checkpoint's own (a HF directory:
  float32 and none)."""
  if kind == "hf":
    hf_config = hf.read_config(path)
    cfg = hf.config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype or "float32",
                            remat=remat or "none", where=f"{path}/config.json")
    tensors, _ = hf.read_tensors(path)  # memory maps: the dtypes, no data
    stored = hf.tensors_dtype(tensors)
    return Source(kind, path, cfg, hf_config, stored, 1, path, stored_dtype=stored)
  if kind == "checkpoint":
    meta = checkpoint.read_meta(path)
    cfg = dataclasses.replace(meta.cfg, dtype=dtype,
                              param_dtype=param_dtype or meta.cfg.param_dtype,
                              remat=remat or meta.cfg.remat)
    return Source(kind, path, cfg, meta.hf_config, meta.source_dtype, meta.num_agents,
                  checkpoint.tokenizer_dir(path), lora=meta.lora,
                  stored_dtype=meta.cfg.param_dtype)
  raise SourceError(f"{path}: source kind {kind!r}; kinds: {', '.join(KINDS)}")


def _copies(params: Params, num: int, cfg: ModelConfig, placement: sharding.Placement) -> Params:
  """`num` copies of one agent's (host) params: on a mesh, each device gets
  its shard of a broadcast view; without one, whole on the default device."""
  def one(x, axes):
    full = np.broadcast_to(np.asarray(x)[None], (num,) + tuple(x.shape))  # a view
    return placement.put(full, axes) if placement.mesh is not None else jnp.asarray(full)
  return jax.tree.map(one, params, population.axes(cfg))


def _count(src: Source, want: int, mesh) -> None:
  if src.agents > 1 and want > src.agents:
    raise SourceError(f"{src.path}: the checkpoint has {src.agents} agents; {want} asked for "
                      f"(a checkpoint of 1 agent is copied)")
  if src.agents > 1 and want < src.agents and mesh is not None:
    # The subset would be read whole onto one device first: not for a mesh.
    raise SourceError(f"{src.path}: the checkpoint has {src.agents} agents; a mesh takes all "
                      f"of them ({want} asked for)")


def _agents_of(pop: population.Population, want: int) -> population.Population:
  """The first `want` agents of a loaded population (copies of a one-agent one)."""
  have = population.num_agents(pop)
  if have == want:
    return pop
  return population.tile(pop, want) if have == 1 else population.take(pop, 0, want)


def load(src: Source, agents: int | None = None,
         placement: sharding.Placement = sharding.LOCAL) -> population.Population:
  """`agents` agents from `src` (default: as many as it stores) in its own
  form, placed on `placement`'s mesh by its rule table (without one: on this
  process's first device)."""
  mesh = placement.mesh
  want = agents or src.agents
  _count(src, want, mesh)
  if src.kind == "hf":
    m = hf.load(src.path, dtype=src.cfg.dtype, param_dtype=src.cfg.param_dtype,
                remat=src.cfg.remat)
    return _copies(m.params, want, src.cfg, placement)
  overrides = dict(dtype=src.cfg.dtype, param_dtype=src.cfg.param_dtype, remat=src.cfg.remat)
  if src.lora is not None:
    pop, _ = checkpoint.load_population(src.path, placement=placement, **overrides)
    return _agents_of(pop, want)
  if src.agents == 1:  # read onto a local device, then copied onto the mesh
    pop, _ = checkpoint.load_population(src.path, **overrides)
    one = jax.tree.map(np.asarray, population.select(pop, 0))
    del pop
    return _copies(one, want, src.cfg, placement)
  pop, _ = checkpoint.load_population(src.path, placement=placement, **overrides)
  return _agents_of(pop, want)


def load_base(src: Source, placement: sharding.Placement = sharding.LOCAL) -> Params:
  """The one base model of `src` (a HF directory, a one-agent checkpoint, a
  LoRA checkpoint's base), placed by the rule table without an agent axis."""
  if not src.one_base:
    raise SourceError(f"{src.path}: holds {src.agents} full agents, not one base model for LoRA "
                      "adapters (give the base's HF directory, or a one-agent or LoRA checkpoint)")
  overrides = dict(dtype=src.cfg.dtype, param_dtype=src.cfg.param_dtype, remat=src.cfg.remat)
  if src.kind == "hf":
    return checkpoint.place(hf.load(src.path, **overrides).params, src.cfg, placement)
  return checkpoint.load_base(src.path, placement=placement, **overrides)


def fresh_adapters(cfg: ModelConfig, lcfg, key: jax.Array, agents: int,
                   placement: sharding.Placement = sharding.LOCAL) -> dict:
  """`lora.init`'s adapters of `agents` agents, placed by the rule table."""
  from maft_jax import lora
  if placement.mesh is None:
    return lora.init(cfg, lcfg, key, agents)
  shapes = jax.eval_shape(lambda: lora.init(cfg, lcfg, key, agents))
  layout = placement.shardings(lora.stacked_axes(lcfg.targets), shapes)
  return jax.jit(lambda k: lora.init(cfg, lcfg, k, agents), out_shardings=layout)(key)


def adapted(src: Source, agents: int, placement: sharding.Placement, lcfg, key: jax.Array,
            base: Params | None = None) -> population.Adapted:
  """`agents` agents of `src` as one base with LoRA adapters: a LoRA
  checkpoint's own (copies of a one-agent one), or fresh adapters
  (`lora.init` from `key`: B = 0, so they start as the base) over a
  one-model source. `base`: the source's base, when already loaded."""
  _count(src, agents, placement.mesh)
  base = load_base(src, placement) if base is None else base
  if src.lora is None:
    return population.Adapted(base=base, adapters=fresh_adapters(src.cfg, lcfg, key, agents,
                                                                 placement), scale=lcfg.scale)
  adapters, meta = checkpoint.load_adapters(src.path, placement)
  return _agents_of(population.Adapted(base=base, adapters=adapters, scale=meta.scale), agents)
