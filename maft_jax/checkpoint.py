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
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from maft_jax import distributed, files, hf, population, sharding
from maft_jax.model import ModelConfig, Params
from maft_jax.tokenizer import Tokenizer, check_fits

FORMAT = "maft_jax.population"
TRAIN_FORMAT = "maft_jax.train"
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
  """Collective: with several processes every one calls it (each writes its
  shards); the primary writes the metadata and renames the finished directory."""
  path = os.path.abspath(path)
  partial = path + ".partial"
  if distributed.is_primary():
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
  distributed.barrier(f"save_population begin {path}")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(partial, "params"), pop)
  ckptr.wait_until_finished()
  if distributed.is_primary():
    meta = {"format": FORMAT, "version": VERSION, "num_agents": population.num_agents(pop),
            "model_config": cfg.to_dict(), "hf_config": hf_config, "source_dtype": source_dtype}
    files.write_json(os.path.join(partial, "maft.json"), meta, indent=2)
    if tokenizer_from is not None:
      hf.copy_tokenizer_files(tokenizer_from, tokenizer_dir(partial))
    files.commit_dir(partial, path)
  distributed.barrier(f"save_population end {path}")
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


def load_population(path: str, *, placement: sharding.Placement = sharding.LOCAL,
                    **cfg_overrides) -> tuple[Params, PopulationMeta]:
  """Restore the population, sharded by the rule table on `placement`'s mesh
  (without one: on this process's first device).

  `cfg_overrides` replace runtime fields of the stored ModelConfig (dtype,
  remat, param_dtype: parameters are cast on restore).
  """
  path = os.path.abspath(path)
  meta = read_meta(path)
  cfg = dataclasses.replace(meta.cfg, **cfg_overrides)
  meta = dataclasses.replace(meta, cfg=cfg)
  abstract = population.shapes(cfg, meta.num_agents)
  if placement.mesh is None:
    shard = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shard), abstract)
  else:
    shards = placement.shardings(population.axes(cfg), abstract)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, shards)
  pop = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), target)
  return pop, meta


def import_hf(hf_dir: str, out: str, *, agents: int, param_dtype: str = "float32") -> str:
  """Write a population checkpoint of `agents` copies of the HF model in
  `hf_dir` (with its tokenizer, which must fit the embedding). `launch.import_hf`."""
  tok = Tokenizer(hf_dir)  # a missing or broken tokenizer fails before the weights load
  m = hf.load(hf_dir, param_dtype=param_dtype)
  check_fits(tok, m.cfg.vocab_size, hf_dir)
  return save_population(out, population.replicate(m.params, agents), cfg=m.cfg,
                         hf_config=m.hf_config, source_dtype=m.source_dtype,
                         tokenizer_from=hf_dir)


def export_hf(path: str, out: str, *, agents: Sequence[int] | None = None,
              dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Write agents of the population checkpoint `path` as HF directories
  (`agents=None`: every one, as out/agent_<i>; one agent: `out` itself), in
  the dtype the model was imported from unless `dtype` says otherwise.
  `launch.export_hf`."""
  meta = read_meta(path)
  for i in agents or ():
    if not 0 <= i < meta.num_agents:
      raise CheckpointError(f"agent {i}: {path} has agents 0..{meta.num_agents - 1}")
  pop, meta = load_population(path)
  dtype = dtype or meta.source_dtype
  dirs = []
  for i in range(meta.num_agents) if agents is None else agents:
    target = os.path.join(out, f"agent_{i}") if agents is None or len(agents) > 1 else out
    hf.save(target, jax.device_get(population.select(pop, i)), meta.cfg, meta.hf_config,
            dtype=dtype, tokenizer_dir=tokenizer_dir(path), max_shard_bytes=max_shard_bytes)
    dirs.append(target)
  return dirs


class TrainCheckpoints:
  """Keep-N, asynchronous orbax checkpoints of a training run: the train state
  (parameters, optimizer state, per-agent steps) and a JSON item with the data
  iterators' states, the RNG seed and anything else the loop needs to resume.

  Saving returns once the arrays are copied off the device (so the next step
  may donate them); writing continues in the background. Restoring takes an
  abstract state whose leaves carry the target shardings, so a run resumes on
  a different device count or mesh.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save))

  def save(self, step: int, state, extra: dict[str, Any]) -> None:
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        extra=ocp.args.JsonSave({"format": TRAIN_FORMAT, **extra})))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def restore(self, abstract_state, step: int | None = None):
    """(state, extra) of `step` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"{self.directory}: no training checkpoint to restore")
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
    extra = dict(out["extra"])
    if extra.pop("format", None) != TRAIN_FORMAT:
      raise CheckpointError(f"{self.directory}/{step}: not a maft_jax training checkpoint")
    return out["state"], extra

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
