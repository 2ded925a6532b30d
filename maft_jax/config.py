"""The run config: its schema, its validation, and the typed plan built from it.

    plan = config.validate(c)     # every field checked, nothing loaded or compiled
    plan.debate.options           # a generation.Options
    plan.finetune.sft             # an sft.Settings

A config is an ml_collections file (see configs/) over `default_config()`.
`validate` checks in three passes, and the first bad field raises one
`ConfigError` naming it (`config.debate.top_p=0.0: must be in (0, 1]`):

1. every field is known and has the type of its default;
2. the plan is built from the library's own settings dataclasses
   (`generation.Options`, `sft.Settings`, `finetune.Hyper`, `lora.LoraConfig`,
   the sampling steps, `selection.Settings`) and the groups below: each rule
   is written once, where the setting is used, and its `checks.SettingError`
   becomes a ConfigError naming the config field the setting came from;
3. the rules that relate fields of several groups, the files the config
   names, and the mesh on this machine's devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from ml_collections import config_dict

from maft_jax import (builders, checks, files, finetune, generation, lora, population, sampling,
                      selection, sft, sharding)

# A HF directory, a population checkpoint, or a base the run builds (maft_jax.builders).
MODEL_SOURCES = ("hf", "checkpoint", *builders.BUILDERS)
# Fields (or groups) a rerun of a workdir may change: more iterations extend
# the run; a resumed run may use another slice of devices.
RESUMABLE_CHANGES = ("iterations", "name", "mesh", "finetune.save_every")


class ConfigError(ValueError):
  """An impossible config; the message names the field and why."""


def default_config() -> ml_collections.ConfigDict:
  """Every field a MAFT config has, with the paper's defaults where it has one.
  Config files start from this and override (see configs/)."""
  c = ml_collections.ConfigDict()
  c.name = "maft"
  c.seed = 0
  c.iterations = 5                     # L
  c.model = ml_collections.ConfigDict(dict(
      source="hf",                     # hf | checkpoint | demo
      path=config_dict.placeholder(str),   # HF model dir or population checkpoint
      demo_preset="full",              # a built base's preset; source=demo: full | smoke
      dtype="bfloat16",                # compute dtype; parameters stay float32
      remat="full"))
  c.task = ml_collections.ConfigDict(dict(
      name="arithmetic",
      options=ml_collections.ConfigDict(),   # keyword options of tasks.load
      train_size=500,                  # training problems (Task.split: seeded, disjoint by id)
      test_size=100))                  # held-out problems for evaluation
  c.agents = ml_collections.ConfigDict(dict(
      generators=3,                    # N
      critics=True,                    # N critic agents; False: the no-critic ablation
      shared=False))                   # one model for every slot (majority finetuning)
  c.debate = ml_collections.ConfigDict(dict(
      rounds=2,                        # M
      summarize=False,
      max_new_tokens=512,
      temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
      batch_size=32,
      stop_after_boxed=True))
  c.selection = ml_collections.ConfigDict(dict(
      mode="paper",                    # paper | ground_truth | cross_agent | star
      critic_weight=0.5,               # w: share of corrected transcripts in a critic's data
      cross_temperature=1.0))          # cross_agent: softmax temperature over NLLs
  c.finetune = ml_collections.ConfigDict(dict(
      init="previous",                 # previous | base (base: on accumulated data)
      epochs=2, learning_rate=1e-5, warmup_frac=0.03, weight_decay=0.0, clip_norm=1.0,
      batch_size=8, seq_len=1024, grad_accum=1, pack=True, save_every=100,
      lora_rank=0, lora_alpha=0.0, lora_targets=",".join(lora.TARGETS)))
  c.eval = ml_collections.ConfigDict(dict(
      rounds=2, max_new_tokens=512, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
      batch_size=32, cross_nll=True, nll_batch=16,
      nll_problems=0))                 # cross-agent NLL on the first K problems (0: all)
  # Device mesh over sharding.MESH_AXES; -1 fills the remaining devices. The
  # rule table (sharding.DEFAULT_RULES) places every array on it.
  c.mesh = ml_collections.ConfigDict(dict(agent=1, data=1, fsdp=-1, tensor=1))
  return c


# ----------------------------------------------------------------------------- plan

@dataclasses.dataclass(frozen=True, kw_only=True)
class Model:
  source: str                          # one of MODEL_SOURCES
  path: str | None
  demo_preset: str
  dtype: str
  remat: str

  def __post_init__(self):
    checks.check(self.source in MODEL_SOURCES, "source", self.source,
                 f"must be one of {', '.join(MODEL_SOURCES)}")
    checks.check(self.dtype in ("bfloat16", "float32"), "dtype", self.dtype,
                 "must be bfloat16 or float32")
    checks.check(self.remat in ("none", "full", "dots", "dots_no_batch"), "remat", self.remat,
                 "must be none, full, dots or dots_no_batch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
  name: str
  options: dict[str, Any]              # keyword options of tasks.load
  train_size: int
  test_size: int

  def __post_init__(self):
    checks.at_least(self, 1, "train_size", "test_size")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Agents:
  """Slots 0..N-1 of a population are the generators, N..2N-1 the critics
  (`generators_of`, `critics_of`: the one place this convention lives)."""
  generators: int                      # N
  critics: bool
  shared: bool

  def __post_init__(self):
    checks.at_least(self, 1, "generators")
    checks.check(not (self.shared and self.critics), "shared", self.shared,
                 "one shared model (majority finetuning) has no separate critics: set "
                 "agents.critics=False")

  @property
  def num_agents(self) -> int:
    return self.generators * (2 if self.critics else 1)

  def generators_of(self, pop):
    return population.take(pop, 0, self.generators)

  def critics_of(self, pop):
    """The critics' slots, or None without critics."""
    return population.take(pop, self.generators, self.num_agents) if self.critics else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Debate:
  rounds: int                          # M
  summarize: bool
  options: generation.Options

  def __post_init__(self):
    checks.at_least(self, 1, "rounds")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Finetune:
  init: str                            # previous | base
  sft: sft.Settings

  def __post_init__(self):
    checks.check(self.init in ("previous", "base"), "init", self.init,
                 "must be previous or base")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Eval:
  rounds: int
  options: generation.Options
  cross_nll: bool
  nll_batch: int
  nll_problems: int                    # cross-agent NLL on the first K problems (0: all)

  def __post_init__(self):
    checks.at_least(self, 1, "rounds", "nll_batch")
    checks.at_least(self, 0, "nll_problems")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
  """A validated config, as typed settings for the library."""
  config: dict[str, Any]               # the resolved config (JSON): what config.json holds
  name: str
  seed: int
  iterations: int                      # L
  model: Model
  task: Task
  agents: Agents
  debate: Debate
  selection: selection.Settings
  finetune: Finetune
  eval: Eval
  mesh: tuple[int, ...]                # sizes of sharding.MESH_AXES, -1 resolved

  def __post_init__(self):
    checks.at_least(self, 0, "seed", "iterations")

  @property
  def num_agents(self) -> int:
    return self.agents.num_agents


# ----------------------------------------------------------------------------- validation

def _get(c: Mapping[str, Any], field: str):
  for part in field.split("."):
    c = c[part]
  return c


def _fail(c: Mapping[str, Any], field: str, why: str):
  raise ConfigError(f"config.{field}={_get(c, field)!r}: {why}")


def _check(c: Mapping[str, Any], ok: bool, field: str, why: str) -> None:
  if not ok:
    _fail(c, field, why)


def _build(c: Mapping[str, Any], group: str, make: Callable, fields: Mapping[str, str] = {},
           **kwargs):
  """`make(**kwargs)`; a SettingError of its setting `s` names config field
  `group.fields.get(s, s)` (a group's settings mostly share its field names)."""
  try:
    return make(**kwargs)
  except checks.SettingError as e:
    field = f"{group}.{fields.get(e.field, e.field)}" if group else fields.get(e.field, e.field)
    _fail(c, field, e.why)


def _known_fields(user: Mapping[str, Any], default: Mapping[str, Any], prefix: str = ""):
  for k, v in user.items():
    field = f"{prefix}{k}"
    if k not in default:
      raise ConfigError(f"config.{field}: unknown field; {prefix or 'config.'} fields are "
                        f"{', '.join(sorted(default))}")
    if isinstance(default[k], Mapping) and field != "task.options":
      if not isinstance(v, Mapping):
        raise ConfigError(f"config.{field}={v!r}: must be a group of fields")
      _known_fields(v, default[k], field + ".")


def _types(c: Mapping[str, Any], default: Mapping[str, Any], prefix: str = ""):
  """Every field has its default's type (an int is also a number; a field
  whose default is None, a string or nothing)."""
  for k, d in default.items():
    field, v = f"{prefix}{k}", c[k]
    if field == "task.options":
      continue
    if isinstance(d, Mapping):
      _types(v, d, field + ".")
    elif isinstance(d, bool):
      if not isinstance(v, bool):
        raise ConfigError(f"config.{field}={v!r}: must be true or false")
    elif isinstance(d, int):
      if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"config.{field}={v!r}: must be an integer")
    elif isinstance(d, float):
      if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ConfigError(f"config.{field}={v!r}: must be a number")
    elif not isinstance(v, str) and not (d is None and v is None):
      raise ConfigError(f"config.{field}={v!r}: must be a string")


def resolve(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """The config as plain JSON over `default_config()` (what config.json
  holds): unknown fields refused, omitted ones filled in."""
  user = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  default = default_config().to_dict()
  _known_fields(user, default)
  c = default
  for group, values in user.items():
    if isinstance(values, Mapping) and group in c and isinstance(c[group], Mapping):
      c[group].update(values)
    else:
      c[group] = values
  c = json.loads(json.dumps(c))
  _types(c, default_config().to_dict())
  return c


def _sampling(c: Mapping[str, Any], group: str) -> generation.Options:
  g = c[group]
  method = _build(c, group, sampling.from_flags, temperature=g["temperature"],
                  top_k=g["top_k"], top_p=g["top_p"], min_p=g["min_p"])
  return _build(c, group, generation.Options, max_new_tokens=g["max_new_tokens"],
                method=method, batch_size=g["batch_size"],
                stop_after_boxed=c["debate"]["stop_after_boxed"])


def _lora(c: Mapping[str, Any]) -> lora.LoraConfig | None:
  f = c["finetune"]
  _check(c, f["lora_rank"] >= 0, "finetune.lora_rank", "must be >= 0 (0: full finetuning)")
  if not f["lora_rank"]:
    return None
  targets = tuple(x.strip() for x in f["lora_targets"].split(",") if x.strip())
  return _build(c, "finetune", lora.LoraConfig,
                {"rank": "lora_rank", "alpha": "lora_alpha", "targets": "lora_targets"},
                rank=f["lora_rank"], alpha=f["lora_alpha"] or 2.0 * f["lora_rank"],
                targets=targets)


def _check_model_files(c: Mapping[str, Any], num_agents: int) -> None:
  m = c["model"]
  if m["source"] in ("hf", "checkpoint"):
    _check(c, bool(m["path"]), "model.path",
           f"model.source={m['source']!r} needs the path of a local "
           f"{'HF model directory' if m['source'] == 'hf' else 'population checkpoint'}")
    marker = "config.json" if m["source"] == "hf" else "maft.json"
    _check(c, os.path.isfile(os.path.join(m["path"], marker)), "model.path",
           f"no {marker} there (model.source={m['source']!r})")
  if m["source"] == "checkpoint":
    meta = files.read_json(os.path.join(m["path"], "maft.json"))
    stored = meta.get("num_agents")
    _check(c, stored in (1, num_agents), "model.path",
           f"the checkpoint has {stored} agents; this config needs 1 (copied) or {num_agents}")
    _check(c, not c["finetune"]["lora_rank"] or stored == 1 or "lora" in meta, "model.path",
           f"the checkpoint holds {stored} full agents; LoRA (finetune.lora_rank) trains "
           "adapters over one base: give the base's HF directory, a one-agent checkpoint "
           "(launch.import_hf --agents=1) or a LoRA checkpoint")
    lcfg = _lora(c)
    if lcfg is not None and "lora" in meta:
      want = {"rank": lcfg.rank, "alpha": lcfg.alpha, "targets": sorted(lcfg.targets)}
      _check(c, meta["lora"] == want, "finetune.lora_rank",
             f"the checkpoint's adapters are {meta['lora']}; this config trains {want}: "
             "set finetune.lora_rank, lora_alpha and lora_targets to the checkpoint's")


def _check_task(c: Mapping[str, Any]) -> None:
  from maft_jax import tasks  # deferred: the task modules import their verifiers
  t = c["task"]
  _check(c, t["name"] in tasks._REGISTRY or t["name"].startswith("reasoning_gym:"), "task.name",
         f"unknown task; tasks: {', '.join(sorted(tasks._REGISTRY))}, reasoning_gym:<dataset>")
  if "path" in t["options"]:
    path = t["options"]["path"]
    _check(c, isinstance(path, str) and os.path.isfile(path), "task.options.path",
           f"task {t['name']!r} reads its problems from a local file: give an existing file")
  try:  # builds the task object only; problems are read when first used
    tasks.load(t["name"], **t["options"])
  except tasks.TaskError as err:
    raise ConfigError(f"config.task.options: {err}") from None


def validate(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Plan:
  """Check every field; raise ConfigError naming the first bad one. Fields
  the config omits take `default_config()`'s values."""
  c = resolve(config)
  m, t, a, d, s, f, e = (c[g] for g in ("model", "task", "agents", "debate", "selection",
                                         "finetune", "eval"))
  hyper = _build(c, "finetune", finetune.Hyper, learning_rate=float(f["learning_rate"]),
                 warmup_frac=float(f["warmup_frac"]), weight_decay=float(f["weight_decay"]),
                 clip_norm=float(f["clip_norm"]))
  settings = _build(c, "finetune", sft.Settings, hyper=hyper, epochs=f["epochs"],
                    batch_size=f["batch_size"], seq_len=f["seq_len"], grad_accum=f["grad_accum"],
                    pack=f["pack"], save_every=f["save_every"], lora=_lora(c))
  groups = dict(
      model=_build(c, "model", Model, **m),
      task=_build(c, "task", Task, **t),
      agents=_build(c, "agents", Agents, **a),
      debate=_build(c, "debate", Debate, rounds=d["rounds"], summarize=d["summarize"],
                    options=_sampling(c, "debate")),
      selection=_build(c, "selection", selection.Settings, **s),
      finetune=_build(c, "finetune", Finetune, init=f["init"], sft=settings),
      eval=_build(c, "eval", Eval, rounds=e["rounds"], options=_sampling(c, "eval"),
                  cross_nll=e["cross_nll"], nll_batch=e["nll_batch"],
                  nll_problems=e["nll_problems"]))
  # Rules across groups, files, devices.
  if m["source"] in builders.BUILDERS:  # the builder knows its presets
    _build(c, "model", builders.get(m["source"]).architecture, preset=m["demo_preset"])
  _check_model_files(c, groups["agents"].num_agents)
  _check_task(c)
  if s["mode"] == "star":
    _check(c, not a["critics"], "selection.mode",
           "STaR trains generators on their own verified rationales: set agents.critics=False")
    _check(c, f["init"] == "base", "selection.mode",
           "STaR restarts from the base every iteration (on the rationales of iterations "
           "1..k): set finetune.init='base'")
  if s["mode"] == "cross_agent":
    _check(c, not a["shared"], "selection.mode",
           "cross_agent exchanges responses between distinct agents; agents.shared is on")
  _check(c, f["seq_len"] - d["max_new_tokens"] >= 16, "finetune.seq_len",
         f"rows hold a prompt and a response of up to debate.max_new_tokens="
         f"{d['max_new_tokens']} tokens; leave at least 16 tokens of prompt")
  for axis in sharding.MESH_AXES:
    _check(c, c["mesh"][axis] >= 1 or c["mesh"][axis] == -1, f"mesh.{axis}",
           "must be a positive integer or -1 (fill the remaining devices)")
  try:
    mesh = sharding.mesh_shape(c["mesh"], jax.device_count())
  except sharding.MeshError as err:
    raise ConfigError(f"config.mesh={c['mesh']}: {err}") from None
  return _build(c, "", Plan, config=c, name=c["name"], seed=c["seed"],
                iterations=c["iterations"], mesh=mesh, **groups)


def config_changes(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
  """How `wanted` differs from the config a workdir was run with, except
  the fields a rerun may change (RESUMABLE_CHANGES)."""
  def resumable(field: str) -> bool:
    return any(field == f or field.startswith(f + ".") for f in RESUMABLE_CHANGES)
  return [d for d in sft.describe_changes(saved, wanted) if not resumable(d.split(" ", 1)[0])]


def layout_notes(plan: Plan) -> list[str]:
  """Mesh choices that run correctly but leave devices computing copies, one
  line each (logged when a run starts, printed by the dry run)."""
  agent, data, fsdp, _ = plan.mesh
  notes = []
  if plan.agents.generators % agent:
    notes.append(
        f"config.mesh.agent={agent} does not divide agents.generators={plan.agents.generators}: "
        "generators and critics sample as populations of N each, which cannot be split "
        "over the agent axis, so every agent slice samples all of them (mesh.agent=1 with "
        "a larger mesh.fsdp splits the same memory)")
  rows = data * fsdp
  for field, size in (("finetune.batch_size", plan.finetune.sft.batch_size),
                      ("debate.batch_size", plan.debate.options.batch_size),
                      ("eval.batch_size", plan.eval.options.batch_size)):
    if size % rows:
      notes.append(
          f"config.{field}={size} is not a multiple of mesh.data x mesh.fsdp = {rows}: "
          "its rows are split over fewer devices than that (the rule table drops an axis "
          "that does not divide), and the others compute copies"
          + ("; a larger batch_size with a smaller grad_accum keeps the tokens per step"
             if field.startswith("finetune") else ""))
  return notes
