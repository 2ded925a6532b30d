"""Population checkpoints (orbax) with the model config and tokenizer beside them.

    CKPT/
      maft.json     format version, number of agents, ModelConfig, the source
                    HF config.json (kept verbatim for export) and its dtype
      params/       orbax checkpoint of the stacked population [A, ...]
      tokenizer/    the HF tokenizer files, copied verbatim

A checkpoint is written to `CKPT.partial` and renamed into place at the end,
so a crash mid-save never leaves something that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from maft_jax import hf, population, sharding
from maft_jax.model import ModelConfig, Params

FORMAT = "maft_jax.population"
VERSION = 1


class CheckpointError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class PopulationMeta:
  num_agents: int
  cfg: ModelConfig
  hf_config: dict[str, Any]
  source_dtype: str


def tokenizer_dir(path: str) -> str:
  return os.path.join(path, "tokenizer")


def save_population(path: str, pop: Params, *, cfg: ModelConfig, hf_config: dict[str, Any],
                    source_dtype: str, tokenizer_from: str | None = None) -> str:
  path = os.path.abspath(path)
  partial = path + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(partial, "params"), pop)
  ckptr.wait_until_finished()
  meta = {"format": FORMAT, "version": VERSION, "num_agents": population.num_agents(pop),
          "model_config": cfg.to_dict(), "hf_config": hf_config, "source_dtype": source_dtype}
  with open(os.path.join(partial, "maft.json"), "w") as f:
    json.dump(meta, f, indent=2)
  if tokenizer_from is not None:
    hf.copy_tokenizer_files(tokenizer_from, tokenizer_dir(partial))
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(partial, path)
  return path


def read_meta(path: str) -> PopulationMeta:
  meta_path = os.path.join(path, "maft.json")
  if not os.path.isfile(meta_path):
    raise CheckpointError(f"{path}: not a maft_jax population checkpoint (no maft.json)")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} version "
                          f"{meta.get('version')!r}; this maft_jax reads {FORMAT} v{VERSION}")
  return PopulationMeta(num_agents=int(meta["num_agents"]),
                        cfg=ModelConfig.from_dict(meta["model_config"]),
                        hf_config=meta["hf_config"], source_dtype=meta["source_dtype"])


def load_population(path: str, *, mesh: jax.sharding.Mesh | None = None,
                    rules=sharding.DEFAULT_RULES, **cfg_overrides) -> tuple[Params, PopulationMeta]:
  """Restore the population, sharded by the rule table when `mesh` is given.

  `cfg_overrides` replace runtime fields of the stored ModelConfig (dtype,
  remat, param_dtype: parameters are cast on restore).
  """
  path = os.path.abspath(path)
  meta = read_meta(path)
  cfg = dataclasses.replace(meta.cfg, **cfg_overrides)
  meta = dataclasses.replace(meta, cfg=cfg)
  abstract = population.shapes(cfg, meta.num_agents)
  if mesh is None:
    shard = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shard), abstract)
  else:
    shards = sharding.shardings(population.axes(cfg), abstract, mesh, rules)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, shards)
  pop = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
  return pop, meta
