"""Population checkpoints (orbax) with the model config and tokenizer beside them.

    CKPT/
      maft.json     format version, number of agents, ModelConfig, the source
                    HF config.json (kept verbatim for export) and its dtype;
                    of a LoRA population also its adapters' rank, alpha and
                    targets, and where its base is
      params/       orbax: the stacked population [A, ...], or of a LoRA
                    population (`population.Adapted`) its stacked adapters
      base/         orbax: a LoRA population's one base, when stored here
      tokenizer/    the HF tokenizer files, copied verbatim

A LoRA population's base is stored once, in base/, or referenced (`BaseRef`:
the kind and path of an unchanged source, and the sha256 of its weight
files): the MAFT loop's iterations reference the run's base instead of
writing it again each iteration. Loading checks the hash and names the base
when it has changed.

A checkpoint is written to `CKPT.partial` and renamed into place at the end,
so a crash mid-save never leaves something that looks complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from maft_jax import distributed, files, hf, model, population, sharding
from maft_jax.model import ModelConfig, Params
from maft_jax.tokenizer import Tokenizer, check_fits

FORMAT = "maft_jax.population"
TRAIN_FORMAT = "maft_jax.train"
VERSION = 2
READS = (1, 2)  # version 1: full populations only, no "lora" or "base" fields


class CheckpointError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class BaseRef:
  """An unchanged base a LoRA checkpoint was trained over: a HF directory
  or a population checkpoint (`load_base` says which base it holds), and
  the sha256 of its weight files (`weights_sha256`)."""
  kind: str                            # "hf" | "checkpoint"
  path: str
  sha256: str

  @classmethod
  def of(cls, kind: str, path: str) -> BaseRef:
    path = os.path.abspath(path)
    return cls(kind, path, weights_sha256(kind, path))


def weights_sha256(kind: str, path: str) -> str:
  """sha256 of a source's weight files: a HF directory's safetensors, a
  checkpoint's params/ and base/ (memoised: `files.sha256`)."""
  if kind == "hf":
    names = [os.path.relpath(f, path) for f in hf.weight_files(path)]
  else:
    names = files.tree_files(path, "params", "base")
  return files.sha256(path, names)


@dataclasses.dataclass(frozen=True)
class PopulationMeta:
  num_agents: int
  cfg: ModelConfig
  hf_config: dict[str, Any]
  source_dtype: str
  lora: dict | None = None             # LoRA: {"rank", "alpha", "targets"} (`lora.describe`)
  base_ref: BaseRef | None = None      # LoRA with a referenced base (None: in base/)

  @property
  def scale(self) -> float:
    return self.lora["alpha"] / self.lora["rank"]


def tokenizer_dir(path: str) -> str:
  return os.path.join(path, "tokenizer")


def save_population(path: str, pop: population.Population, *, cfg: ModelConfig,
                    hf_config: dict[str, Any], source_dtype: str,
                    tokenizer_from: str | None = None, base_ref: BaseRef | None = None) -> str:
  """Write `pop` (either form) to `path`. An Adapted population's base is
  written to base/ unless `base_ref` names where it already is (the caller
  vouches that it is that base). Collective: with several processes every
  one calls it (each writes its shards); the primary writes the metadata and
  renames the finished directory."""
  from maft_jax import lora
  path = os.path.abspath(path)
  partial = path + ".partial"
  adapted = isinstance(pop, population.Adapted)
  if base_ref is not None and not adapted:
    raise CheckpointError(f"{path}: a base reference is for a LoRA population; this one is full")
  if distributed.is_primary():
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
  distributed.barrier(f"save_population begin {path}")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(partial, "params"), pop.adapters if adapted else pop)
  if adapted and base_ref is None:
    ckptr.save(os.path.join(partial, "base"), pop.base)
  ckptr.wait_until_finished()
  if distributed.is_primary():
    meta = {"format": FORMAT, "version": VERSION, "num_agents": population.num_agents(pop),
            "model_config": cfg.to_dict(), "hf_config": hf_config, "source_dtype": source_dtype}
    if adapted:
      meta["lora"] = lora.describe(pop.adapters, pop.scale)
      # The base's path also relative to this checkpoint: a workdir moved or
      # copied whole keeps its iterations' bases.
      meta["base"] = ({**dataclasses.asdict(base_ref),
                       "relative": os.path.relpath(base_ref.path, path)}
                      if base_ref else {"kind": "stored"})
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
  meta = files.read_json(meta_path, error=CheckpointError)
  if meta.get("format") != FORMAT or meta.get("version") not in READS:
    raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} version "
                          f"{meta.get('version')!r}; this maft_jax reads {FORMAT} "
                          f"v{', v'.join(map(str, READS))}")
  try:
    base = meta.get("base")
    ref = None
    if base and base.get("kind") != "stored":
      moved = os.path.normpath(os.path.join(os.path.abspath(path), base["relative"]))
      ref = BaseRef(base["kind"], moved if os.path.isdir(moved) else base["path"],
                    base["sha256"])
    return PopulationMeta(num_agents=int(meta["num_agents"]),
                          cfg=ModelConfig.from_dict(meta["model_config"]),
                          hf_config=meta["hf_config"], source_dtype=meta["source_dtype"],
                          lora=meta.get("lora"), base_ref=ref)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{meta_path}: damaged metadata ({e!r})") from None


def _meta_with(path: str, overrides) -> PopulationMeta:
  meta = read_meta(path)
  return dataclasses.replace(meta, cfg=dataclasses.replace(meta.cfg, **overrides))


def _restore(item: str, abstract, axes, placement: sharding.Placement):
  """Restore an orbax item onto `placement` (without a mesh: this process's
  first device), each leaf placed by the rule table as it is read."""
  if placement.mesh is None:
    shard = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's
    shards = jax.tree.map(lambda _: shard, abstract)
  else:
    shards = placement.shardings(axes, abstract)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract, shards)
  if not os.path.isdir(item):
    raise CheckpointError(f"{item}: missing (the checkpoint is incomplete)")
  return ocp.StandardCheckpointer().restore(item, target)


def _adapter_shapes(meta: PopulationMeta):
  from maft_jax import lora
  lcfg = lora.LoraConfig(rank=meta.lora["rank"], alpha=meta.lora["alpha"],
                         targets=tuple(meta.lora["targets"]))
  return {t: {k: jax.ShapeDtypeStruct((meta.num_agents,) + shape, np.float32)
              for k, shape in ab.items()} for t, ab in lora.adapter_shapes(meta.cfg, lcfg).items()}


def place(params: Params, cfg: ModelConfig, placement: sharding.Placement) -> Params:
  """One model's host params placed as a LoRA base: by the rule table,
  without an agent axis (without a mesh: on this process's first device)."""
  if placement.mesh is None:
    return jax.device_put(params, jax.local_devices()[0])
  return jax.tree.map(lambda x, a: placement.put(np.asarray(x), a), params,
                      model.param_axes(cfg))


def load_base(path: str, *, placement: sharding.Placement = sharding.LOCAL,
              **cfg_overrides) -> Params:
  """The one base model of a checkpoint, placed without an agent axis: a
  LoRA checkpoint's base (stored or referenced), or the single agent of a
  one-agent full checkpoint."""
  path = os.path.abspath(path)
  meta = _meta_with(path, cfg_overrides)
  if meta.lora is not None:
    if meta.base_ref is not None:
      return load_ref(meta.base_ref, meta.cfg, placement, where=path)
    return _restore(os.path.join(path, "base"), model.param_shapes(meta.cfg),
                    model.param_axes(meta.cfg), placement)
  if meta.num_agents != 1:
    raise CheckpointError(f"{path}: holds {meta.num_agents} full agents, not one base (import "
                          "the base with launch.import_hf --agents=1, or give its HF directory)")
  pop = _restore(os.path.join(path, "params"), population.shapes(meta.cfg, 1),
                 population.axes(meta.cfg), placement)
  one = population.select(pop, 0)
  if placement.mesh is None:
    return one
  return jax.device_put(one, placement.shardings(model.param_axes(meta.cfg), one))


def load_ref(ref: BaseRef, cfg: ModelConfig, placement: sharding.Placement, *,
             where: str) -> Params:
  """The base `ref` names, after checking that its weights are unchanged."""
  if not os.path.isdir(ref.path):
    raise CheckpointError(f"{where}: its base {ref.path} ({ref.kind}) is missing; restore it "
                          "there, or export this population merged (launch.export_hf)")
  got = weights_sha256(ref.kind, ref.path)
  if got != ref.sha256:
    raise CheckpointError(f"{where}: its base {ref.path} has changed since it was trained over "
                          f"(weights sha256 {got[:12]}..., recorded {ref.sha256[:12]}...); "
                          "restore the original base there")
  overrides = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat)
  if ref.kind == "hf":
    return place(hf.load(ref.path, **overrides).params, cfg, placement)
  return load_base(ref.path, placement=placement, **overrides)


def load_adapters(path: str, placement: sharding.Placement = sharding.LOCAL
                  ) -> tuple[dict, PopulationMeta]:
  """A LoRA checkpoint's stacked adapters (float32, as trained), placed."""
  from maft_jax import lora
  path = os.path.abspath(path)
  meta = read_meta(path)
  if meta.lora is None:
    raise CheckpointError(f"{path}: a full population, not LoRA adapters")
  adapters = _restore(os.path.join(path, "params"), _adapter_shapes(meta),
                      lora.stacked_axes(meta.lora["targets"]), placement)
  return adapters, meta


def load_population(path: str, *, placement: sharding.Placement = sharding.LOCAL,
                    **cfg_overrides) -> tuple[population.Population, PopulationMeta]:
  """Restore the population in its own form (full, or `population.Adapted`),
  sharded by the rule table on `placement`'s mesh (without one: on this
  process's first device).

  `cfg_overrides` replace runtime fields of the stored ModelConfig (dtype,
  remat, param_dtype: parameters, a LoRA population's base, are cast on
  restore).
  """
  path = os.path.abspath(path)
  meta = _meta_with(path, cfg_overrides)
  if meta.lora is None:
    pop = _restore(os.path.join(path, "params"), population.shapes(meta.cfg, meta.num_agents),
                   population.axes(meta.cfg), placement)
    return pop, meta
  adapters, _ = load_adapters(path, placement)
  base = load_base(path, placement=placement, **cfg_overrides)
  return population.Adapted(base=base, adapters=adapters, scale=meta.scale), meta


def import_hf(hf_dir: str, out: str, *, agents: int, param_dtype: str = "float32") -> str:
  """Write a population checkpoint of `agents` copies of the HF model in
  `hf_dir` (with its tokenizer, which must fit the embedding). `launch.import_hf`."""
  tok = Tokenizer(hf_dir)  # a missing or broken tokenizer fails before the weights load
  m = hf.load(hf_dir, param_dtype=param_dtype)
  check_fits(tok, m.cfg.vocab_size, hf_dir)
  return save_population(out, population.replicate(m.params, agents), cfg=m.cfg,
                         hf_config=m.hf_config, source_dtype=m.source_dtype,
                         tokenizer_from=hf_dir)


def _agent_dirs(path: str, out: str, agents: Sequence[int] | None) -> tuple[list[int], list[str]]:
  meta = read_meta(path)
  for i in agents or ():
    if not 0 <= i < meta.num_agents:
      raise CheckpointError(f"agent {i}: {path} has agents 0..{meta.num_agents - 1}")
  chosen = list(range(meta.num_agents)) if agents is None else list(agents)
  one = agents is not None and len(agents) == 1
  return chosen, [out if one else os.path.join(out, f"agent_{i}") for i in chosen]


def export_hf(path: str, out: str, *, agents: Sequence[int] | None = None,
              dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Write agents of the population checkpoint `path` as HF directories
  (`agents=None`: every one, as out/agent_<i>; one agent: `out` itself), in
  the dtype the model was imported from unless `dtype` says otherwise. A
  LoRA agent is its adapters merged into the base in float32. `launch.export_hf`."""
  chosen, dirs = _agent_dirs(path, out, agents)
  pop, meta = load_population(path)
  dtype = dtype or meta.source_dtype
  for i, target in zip(chosen, dirs):
    if isinstance(pop, population.Adapted):
      from maft_jax import lora
      one = lora.merge(pop.base, jax.tree.map(lambda x: x[i], pop.adapters), pop.scale,
                       dtype=np.float32)
    else:
      one = population.select(pop, i)
    hf.save(target, jax.device_get(one), meta.cfg, meta.hf_config, dtype=dtype,
            tokenizer_dir=tokenizer_dir(path), max_shard_bytes=max_shard_bytes)
  return dirs


def export_peft(path: str, out: str, *, agents: Sequence[int] | None = None,
                dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Write a LoRA checkpoint as its base (out/base, a HF directory, in
  `dtype` or the source's) and each agent's adapters in the PEFT format
  (adapter_config.json + adapter_model.safetensors, float32) over it, as
  out/agent_<i> (one agent: out/adapter). Returns the adapter directories."""
  meta = read_meta(path)
  if meta.lora is None:
    raise CheckpointError(f"{path}: a full population has no adapters to write in the PEFT "
                          "format (export it with the default format)")
  chosen, _ = _agent_dirs(path, out, agents)
  pop, meta = load_population(path)
  base_dir = os.path.join(out, "base")
  hf.save(base_dir, jax.device_get(pop.base), meta.cfg, meta.hf_config,
          dtype=dtype or meta.source_dtype, tokenizer_dir=tokenizer_dir(path),
          max_shard_bytes=max_shard_bytes)
  dirs = []
  for i in chosen:
    target = os.path.join(out, "adapter" if len(chosen) == 1 and agents else f"agent_{i}")
    hf.save_peft(target, jax.device_get(jax.tree.map(lambda x: x[i], pop.adapters)),
                 meta.lora, meta.cfg, meta.hf_config, base_dir=base_dir)
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
