"""Where a population comes from, and the one way to load it.

    src = source.describe("hf", path, dtype="bfloat16")   # reads no weights
    src.cfg, src.tokenizer(), src.agents
    pop = source.load(src, 6, placement)                 # [6, ...] leaves on its mesh

A source is a HF model directory (one agent) or a population checkpoint
(`checkpoint.save_population`: one agent or several). `load` gives `agents`
agents: copies of a one-agent source, or a checkpoint's own agents (or its
first `agents`). On a mesh every array is placed by the rule table as it is
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
    return Source(kind, path, cfg, hf_config, hf.tensors_dtype(tensors), 1, path)
  if kind == "checkpoint":
    meta = checkpoint.read_meta(path)
    cfg = dataclasses.replace(meta.cfg, dtype=dtype,
                              param_dtype=param_dtype or meta.cfg.param_dtype,
                              remat=remat or meta.cfg.remat)
    return Source(kind, path, cfg, meta.hf_config, meta.source_dtype, meta.num_agents,
                  checkpoint.tokenizer_dir(path))
  raise SourceError(f"{path}: source kind {kind!r}; kinds: {', '.join(KINDS)}")


def _copies(params: Params, num: int, cfg: ModelConfig, placement: sharding.Placement) -> Params:
  """`num` copies of one agent's (host) params: on a mesh, each device gets
  its shard of a broadcast view; without one, whole on the default device."""
  def one(x, axes):
    full = np.broadcast_to(np.asarray(x)[None], (num,) + tuple(x.shape))  # a view
    return placement.put(full, axes) if placement.mesh is not None else jnp.asarray(full)
  return jax.tree.map(one, params, population.axes(cfg))


def load(src: Source, agents: int | None = None,
         placement: sharding.Placement = sharding.LOCAL) -> Params:
  """`agents` agents from `src` (default: as many as it stores), placed on
  `placement`'s mesh by its rule table (without one: on this process's first
  device)."""
  mesh = placement.mesh
  want = agents or src.agents
  if src.agents > 1 and want > src.agents:
    raise SourceError(f"{src.path}: the checkpoint has {src.agents} agents; {want} asked for "
                      f"(a checkpoint of 1 agent is copied)")
  if src.agents > 1 and want < src.agents and mesh is not None:
    # The subset would be read whole onto one device first: not for a mesh.
    raise SourceError(f"{src.path}: the checkpoint has {src.agents} agents; a mesh takes all "
                      f"of them ({want} asked for)")
  if src.kind == "hf":
    m = hf.load(src.path, dtype=src.cfg.dtype, param_dtype=src.cfg.param_dtype,
                remat=src.cfg.remat)
    return _copies(m.params, want, src.cfg, placement)
  overrides = dict(dtype=src.cfg.dtype, param_dtype=src.cfg.param_dtype, remat=src.cfg.remat)
  if src.agents == 1:  # read onto a local device, then copied onto the mesh
    pop, _ = checkpoint.load_population(src.path, **overrides)
    one = jax.tree.map(np.asarray, population.select(pop, 0))
    del pop
    return _copies(one, want, src.cfg, placement)
  pop, _ = checkpoint.load_population(src.path, placement=placement, **overrides)
  return jax.tree.map(lambda x: x[:want], pop) if want < src.agents else pop
