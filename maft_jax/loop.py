"""The MAFT iteration driver: the only module that reads a config.

    plan = loop.validate(config)           # every field checked, nothing compiled
    records = loop.Run(plan, workdir).run()

A run is a sequence of stages, each a pure function of the stages before it:

    iteration 0:   eval                                  (the base population)
    iteration k:   debate -> select -> finetune -> eval  (k = 1 .. iterations)

- debate:   N generators answer the training problems; critics (or the
            generators, without critics) answer rounds 2..M. Transcripts kept.
- select:   answer classes in the task's relation -> jitted consensus of the
            last round / agreement / selection masks (`verdict`) -> each
            agent's own SFT rows (`selection.mode`, see `select`).
- finetune: every agent trains on its rows in one vmapped program, from the
            previous iteration's weights (`finetune.init='previous'`) or from
            the base on the rows of iterations 1..k (`'base'`).
- eval:     a debate on held-out problems -> accuracy, consensus, diversity
            (distinct answers, n-gram overlap, cross-agent NLL matrix).

Workdir. `config.json` (the resolved config; a rerun must match it, except
`iterations`, `name` and `mesh`, which may grow or change), `iter_KK/STAGE/` per
finished stage (written as `STAGE.partial/` and renamed when complete, so a
directory that exists is a finished stage), `iter_KK/finetune_state/`
(training checkpoints while a finetune stage runs), `metrics.jsonl` (one
object per finished stage, rewritten from the stage summaries, so it never
holds duplicates) and `tb/` (TensorBoard events, rewritten likewise). A run
killed anywhere resumes at the stage in flight (mid-finetune: at its last
training checkpoint) and ends with the same result as an uninterrupted run.
With several processes (`distributed`), every process runs every stage on
the same inputs over one global mesh; process 0 writes the workdir.

Randomness is derived, never carried: every stage draws from
`stage_seed(seed, iteration, stage)`; inside it, samplers fold in the agent,
the prompt row and the step, and the trainer the agent. Evaluation is the
exception: every iteration's evaluation samples with `eval_seed(seed)` (common
random numbers), so the change from one iteration to the next reflects the
weights, not a new draw of the sampling noise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

from maft_jax import (checkpoint, debate, distributed, finetune, generation, hf, lora, metrics,
                      population, sampling, scoring, sft, sharding, verdict)
from maft_jax.model import ModelConfig, Params
from maft_jax.tasks import Problem, Task, prompts
from maft_jax.tasks.base import read_jsonl
from maft_jax.tokenizer import Tokenizer, check_fits

STAGES = ("debate", "select", "finetune", "eval")
SELECTION_MODES = ("paper", "ground_truth", "cross_agent", "star")
MODEL_SOURCES = ("hf", "checkpoint", "demo")
# Fields (or groups) a rerun of a workdir may change: more iterations extend
# the run; a resumed run may use another slice of devices.
RESUMABLE_CHANGES = ("iterations", "name", "mesh")
# Programs map the population's agent axis onto this mesh axis (vmap's
# spmd_axis_name), under `sharding.use_mesh(Run.mesh)`.
AGENT_AXIS = "agent"


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
      demo_preset="full",              # source=demo: full | smoke
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
      mode="paper",                    # paper | ground_truth | cross_agent
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
class Plan:
  """A validated config, as typed settings for the library."""
  config: dict[str, Any]               # the resolved config (JSON)
  name: str
  seed: int
  iterations: int
  model_source: str
  model_path: str | None
  demo_preset: str
  dtype: str
  remat: str
  task_name: str
  task_options: dict[str, Any]
  train_size: int
  test_size: int
  generators: int
  critics: bool
  shared: bool
  rounds: int
  summarize: bool
  debate_options: generation.Options
  selection_mode: str
  critic_weight: float
  cross_temperature: float
  init: str
  sft: sft.Settings
  eval_rounds: int
  eval_options: generation.Options
  cross_nll: bool
  nll_batch: int
  nll_problems: int
  mesh: tuple[int, ...]                # sizes of sharding.MESH_AXES, -1 resolved

  @property
  def num_agents(self) -> int:
    return self.generators * (2 if self.critics else 1)


def _check(ok: bool, field: str, value: Any, why: str):
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def _method(c: Mapping[str, Any], field: str):
  for name in ("temperature", "top_p", "top_k", "min_p"):
    _check(isinstance(c[name], (int, float)), f"{field}.{name}", c[name], "must be a number")
  _check(c["temperature"] >= 0, f"{field}.temperature", c["temperature"], "must be >= 0 (0: greedy)")
  _check(0 < c["top_p"] <= 1, f"{field}.top_p", c["top_p"], "must be in (0, 1]")
  _check(c["top_k"] >= 0, f"{field}.top_k", c["top_k"], "must be >= 0 (0: off)")
  _check(0 <= c["min_p"] < 1, f"{field}.min_p", c["min_p"], "must be in [0, 1)")
  return sampling.from_flags(temperature=c["temperature"], top_k=int(c["top_k"]),
                             top_p=c["top_p"], min_p=c["min_p"])


def _known_fields(user: Mapping[str, Any], default: Mapping[str, Any], prefix: str = ""):
  for k, v in user.items():
    field = f"{prefix}{k}"
    if k not in default:
      raise ConfigError(f"config.{field}: unknown field; {prefix or 'config.'} fields are "
                        f"{', '.join(sorted(default))}")
    if isinstance(default[k], Mapping) and field != "task.options":
      _check(isinstance(v, Mapping), field, v, "must be a group of fields")
      _known_fields(v, default[k], field + ".")


def validate(config: ml_collections.ConfigDict | Mapping[str, Any]) -> Plan:
  """Check every field; raise ConfigError naming the first bad one. Fields
  the config omits take `default_config()`'s values."""
  user = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  default = default_config().to_dict()
  _known_fields(user, default)
  c = default
  for group, values in user.items():
    if isinstance(values, Mapping) and group in c and isinstance(c[group], Mapping):
      c[group].update(values)
    else:
      c[group] = values
  c = json.loads(json.dumps(c))  # plain JSON: what config.json holds
  ints = [("seed", 0), ("iterations", 0), ("task.train_size", 1), ("task.test_size", 1),
          ("agents.generators", 1), ("debate.rounds", 1), ("debate.max_new_tokens", 1),
          ("debate.batch_size", 1), ("finetune.epochs", 1), ("finetune.batch_size", 1),
          ("finetune.seq_len", 2), ("finetune.grad_accum", 1), ("finetune.save_every", 1),
          ("finetune.lora_rank", 0), ("eval.rounds", 1), ("eval.max_new_tokens", 1),
          ("eval.batch_size", 1), ("eval.nll_batch", 1), ("eval.nll_problems", 0)]
  for field, low in ints:
    value = _get(c, field)
    _check(isinstance(value, int) and not isinstance(value, bool), field, value,
           "must be an integer")
    _check(value >= low, field, value, f"must be >= {low}")
  for field in ("agents.critics", "agents.shared", "debate.summarize", "debate.stop_after_boxed",
                "finetune.pack", "eval.cross_nll"):
    _check(isinstance(_get(c, field), bool), field, _get(c, field), "must be true or false")
  m = c["model"]
  _check(m["source"] in MODEL_SOURCES, "model.source", m["source"],
         f"must be one of {', '.join(MODEL_SOURCES)}")
  if m["source"] in ("hf", "checkpoint"):
    _check(bool(m["path"]), "model.path", m["path"],
           f"model.source={m['source']!r} needs the path of a local "
           f"{'HF model directory' if m['source'] == 'hf' else 'population checkpoint'}")
    marker = "config.json" if m["source"] == "hf" else "maft.json"
    _check(os.path.isfile(os.path.join(m["path"], marker)), "model.path", m["path"],
           f"no {marker} there (model.source={m['source']!r})")
  _check(m["demo_preset"] in ("full", "smoke"), "model.demo_preset", m["demo_preset"],
         "must be full or smoke")
  _check(m["dtype"] in ("bfloat16", "float32"), "model.dtype", m["dtype"],
         "must be bfloat16 or float32")
  _check(m["remat"] in ("none", "full", "dots", "dots_no_batch"), "model.remat", m["remat"],
         "must be none, full, dots or dots_no_batch")
  t = c["task"]
  from maft_jax import tasks
  _check(isinstance(t["name"], str) and (t["name"] in tasks._REGISTRY
                                         or t["name"].startswith("reasoning_gym:")),
         "task.name", t["name"], f"unknown task; tasks: {', '.join(sorted(tasks._REGISTRY))}, "
         "reasoning_gym:<dataset>")
  if "path" in t["options"]:
    path = t["options"]["path"]
    _check(isinstance(path, str) and os.path.isfile(path), "task.options.path", path,
           f"task {t['name']!r} reads its problems from a local file: give an existing file")
  try:  # builds the task object only; problems are read when first used
    tasks.load(t["name"], **t["options"])
  except tasks.TaskError as err:
    raise ConfigError(f"config.task.options: {err}") from None
  a, d, s, f, e = c["agents"], c["debate"], c["selection"], c["finetune"], c["eval"]
  if a["shared"]:
    _check(not a["critics"], "agents.shared", True,
           "one shared model (majority finetuning) has no separate critics: set "
           "agents.critics=False")
  debate_method = _method(d, "debate")
  eval_method = _method(e, "eval")
  _check(s["mode"] in SELECTION_MODES, "selection.mode", s["mode"],
         f"must be one of {', '.join(SELECTION_MODES)}")
  _check(0 < s["critic_weight"] < 1, "selection.critic_weight", s["critic_weight"],
         "must be in (0, 1)")
  _check(s["cross_temperature"] > 0, "selection.cross_temperature", s["cross_temperature"],
         "must be > 0")
  if s["mode"] == "star":
    _check(not a["critics"], "selection.mode", s["mode"],
           "STaR trains generators on their own verified rationales: set agents.critics=False")
    _check(f["init"] == "base", "selection.mode", s["mode"],
           "STaR restarts from the base every iteration (on the rationales of iterations "
           "1..k): set finetune.init='base'")
  if s["mode"] == "cross_agent":
    _check(not a["shared"], "selection.mode", s["mode"],
           "cross_agent exchanges responses between distinct agents; agents.shared is on")
  _check(f["init"] in ("previous", "base"), "finetune.init", f["init"], "must be previous or base")
  for name in ("learning_rate",):
    _check(isinstance(f[name], (int, float)) and f[name] > 0, f"finetune.{name}", f[name],
           "must be > 0")
  _check(0 <= f["warmup_frac"] < 1, "finetune.warmup_frac", f["warmup_frac"], "must be in [0, 1)")
  lcfg = None
  if f["lora_rank"]:
    _check(f["init"] == "base", "finetune.lora_rank", f["lora_rank"],
           "LoRA trains adapters on one shared frozen base, so each iteration must start from "
           "the base: set finetune.init='base' (it then trains on the accumulated data)")
    targets = tuple(x.strip() for x in f["lora_targets"].split(",") if x.strip())
    bad = [x for x in targets if x not in lora.TARGETS]
    _check(targets and not bad, "finetune.lora_targets", f["lora_targets"],
           f"unknown projection(s) {bad}; choose from {', '.join(lora.TARGETS)}")
    lcfg = lora.LoraConfig(rank=f["lora_rank"], alpha=f["lora_alpha"] or 2.0 * f["lora_rank"],
                           targets=targets)
  for axis in sharding.MESH_AXES:
    size = c["mesh"][axis]
    _check(isinstance(size, int) and not isinstance(size, bool) and (size >= 1 or size == -1),
           f"mesh.{axis}", size, "must be a positive integer or -1 (fill the remaining devices)")
  try:
    mesh = sharding.mesh_shape(c["mesh"], jax.device_count())
  except sharding.MeshError as err:
    raise ConfigError(f"config.mesh={c['mesh']}: {err}") from None
  prompt_room = f["seq_len"] - d["max_new_tokens"]
  _check(prompt_room >= 16, "finetune.seq_len", f["seq_len"],
         f"rows hold a prompt and a response of up to debate.max_new_tokens="
         f"{d['max_new_tokens']} tokens; leave at least 16 tokens of prompt")
  options = lambda g, method: generation.Options(  # noqa: E731
      max_new_tokens=g["max_new_tokens"], method=method, batch_size=g["batch_size"],
      stop_after_boxed=d["stop_after_boxed"])
  settings = sft.Settings(
      hyper=finetune.Hyper(learning_rate=float(f["learning_rate"]),
                           warmup_frac=float(f["warmup_frac"]),
                           weight_decay=float(f["weight_decay"]), clip_norm=float(f["clip_norm"])),
      epochs=f["epochs"], batch_size=f["batch_size"], seq_len=f["seq_len"],
      grad_accum=f["grad_accum"], pack=f["pack"], save_every=f["save_every"], lora=lcfg)
  return Plan(config=c, name=str(c["name"]), seed=c["seed"], iterations=c["iterations"],
              model_source=m["source"], model_path=m["path"], demo_preset=m["demo_preset"],
              dtype=m["dtype"], remat=m["remat"], task_name=t["name"],
              task_options=dict(t["options"]), train_size=t["train_size"],
              test_size=t["test_size"], generators=a["generators"], critics=a["critics"],
              shared=a["shared"], rounds=d["rounds"], summarize=d["summarize"],
              debate_options=options(d, debate_method), selection_mode=s["mode"],
              critic_weight=float(s["critic_weight"]),
              cross_temperature=float(s["cross_temperature"]), init=f["init"], sft=settings,
              eval_rounds=e["rounds"], eval_options=options(e, eval_method),
              cross_nll=e["cross_nll"], nll_batch=e["nll_batch"],
              nll_problems=e["nll_problems"], mesh=mesh)


def _get(c: Mapping[str, Any], field: str):
  for part in field.split("."):
    c = c[part]
  return c


def stage_seed(seed: int, iteration: int, stage: str) -> int:
  """The stage's seed, derived from (seed, iteration, stage) alone. Kept below
  2^20 so that the samplers' seed arithmetic stays inside int32."""
  state = np.random.SeedSequence([seed, iteration, STAGES.index(stage)]).generate_state(1)
  return int(state[0]) % (1 << 20)


def eval_seed(seed: int) -> int:
  """The sampling seed of every iteration's held-out evaluation (see the module docstring)."""
  return stage_seed(seed, 0, "eval")


def config_changes(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
  def resumable(field: str) -> bool:
    return any(field == f or field.startswith(f + ".") for f in RESUMABLE_CHANGES)
  return [d for d in sft.describe_changes(saved, wanted) if not resumable(d.split(" ", 1)[0])]


# ----------------------------------------------------------------------------- files

def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _write_jsonl(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  tmp = path + ".tmp"  # readers (and a kill mid-write) never see half a file
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


class Stage:
  """A stage's output directory, written whole or not at all. With several
  processes the primary writes it (`begin` and `commit` end with a barrier, so
  every process then sees the same directory); files inside are written by
  the primary alone, or collectively (checkpoints)."""

  def __init__(self, workdir: str, iteration: int, name: str):
    self.dir = os.path.join(workdir, f"iter_{iteration:02d}", name)
    self.partial = self.dir + ".partial"

  @property
  def done(self) -> bool:
    return os.path.isdir(self.dir)

  def begin(self) -> str:
    if distributed.is_primary():
      shutil.rmtree(self.partial, ignore_errors=True)
      os.makedirs(self.partial)
    distributed.barrier(f"begin {self.dir}")
    return self.partial

  def commit(self, summary: Mapping[str, Any]) -> None:
    if distributed.is_primary():
      _write_json(os.path.join(self.partial, "summary.json"), summary)
      os.replace(self.partial, self.dir)
    distributed.barrier(f"commit {self.dir}")

  def summary(self) -> dict:
    return _read_json(os.path.join(self.dir, "summary.json"))


# ----------------------------------------------------------------------------- run

def _agents(pop: Params, start: int, stop: int) -> Params:
  return jax.tree.map(lambda x: x[start:stop], pop)


def _save_debate(path: str, problems: Sequence[Problem], d: debate.Debate) -> None:
  _write_json(path, {"problem_ids": [p.id for p in problems], "texts": d.texts, "keys": d.keys,
                     "messages": d.messages, "finishes": d.finishes,
                     **({"rationales": d.rationales} if d.rationales is not None else {})})


def _load_debate(path: str) -> tuple[list[str], debate.Debate]:
  raw = _read_json(path)
  return raw["problem_ids"], debate.Debate(texts=raw["texts"], keys=raw["keys"],
                                            messages=raw["messages"], finishes=raw["finishes"],
                                            rationales=raw.get("rationales"))


class Run:
  """Runs (or resumes) the stages of a plan in a workdir."""

  def __init__(self, plan: Plan, workdir: str, *, log: Callable[[str], None] = logging.info,
               progress: bool = True):
    self.plan, self.workdir, self.log, self.progress = plan, os.path.abspath(workdir), log, progress
    self._task: Task | None = None

  def check_workdir(self) -> None:
    """Refuse a workdir that holds a run with another config; record ours."""
    cfg_path = os.path.join(self.workdir, "config.json")
    if os.path.isfile(cfg_path):
      changes = config_changes(_read_json(cfg_path), self.plan.config)
      if changes:
        raise ConfigError(f"{self.workdir} holds a run with a different config: "
                          f"{'; '.join(changes)}. Use another workdir or the same config.")
    if distributed.is_primary():
      os.makedirs(self.workdir, exist_ok=True)
      _write_json(cfg_path, self.plan.config)
    distributed.barrier("check_workdir")

  def prepare(self) -> Params:
    """Load the base: sets the model config, tokenizer and generator; returns
    the base population."""
    pop, self.cfg, self.tok, self.hf_config, self.source_dtype, self.tok_dir = self.load_base()
    self.gen = generation.Generator(self.cfg, self.tok, progress=self.progress, log=self.log,
                                    spmd_axis_name=AGENT_AXIS, mesh=self.mesh)
    self.pad_id = self.gen.pad_id
    return pop

  # -- inputs

  @property
  def task(self) -> Task:
    if self._task is None:
      from maft_jax import tasks
      self._task = tasks.load(self.plan.task_name, **self.plan.task_options)
    return self._task

  def problems(self, split: str) -> list[Problem]:
    """The run's training ("train") or held-out ("test") problems: exactly
    task.train_size and task.test_size of them (`Task.split`)."""
    if getattr(self, "_split", None) is None:
      self._split = self.task.split(self.plan.train_size, self.plan.test_size)
    return self._split.train if split == "train" else self._split.test

  def base_source(self) -> tuple[str, str]:
    """(kind, path) of the base model, building the demo model when asked."""
    p = self.plan
    if p.model_source != "demo":
      return p.model_source, p.model_path
    from maft_jax import demo
    build = lambda: demo.build_base(  # noqa: E731
        os.path.join(self.workdir, "demo_base"), demo.DemoSettings.preset(p.demo_preset),
        task_options=p.task_options,
        log=self.log, progress=self.progress)
    path = build() if distributed.is_primary() else None
    distributed.barrier("demo_base")
    return "hf", path or build()  # other processes find it built: a read

  @property
  def mesh(self) -> jax.sharding.Mesh:
    """The device mesh of `config.mesh` (built on first use)."""
    if getattr(self, "_mesh", None) is None:
      self._mesh = sharding.make_mesh(self.plan.mesh)
    return self._mesh

  def copies(self, params: Params, num: int, cfg: ModelConfig) -> Params:
    """`num` copies of one agent's `params` (local arrays), placed on the mesh
    by the rule table: each device receives only its shard, sliced from a
    broadcast view of the one copy, so no device or host ever holds the
    population whole (6 copies of an 8B model are 192 GB in f32)."""
    def one(x, axes):
      full = np.broadcast_to(np.asarray(x)[None], (num,) + tuple(x.shape))  # a view
      return sharding.host_to_global(full, axes, self.mesh)
    return jax.tree.map(one, params, population.axes(cfg))

  def load_base(self) -> tuple[Params, ModelConfig, Tokenizer, dict, str, str]:
    """(population of A base copies on the mesh, cfg, tokenizer, hf_config,
    source dtype, tokenizer dir)."""
    p = self.plan
    kind, path = self.base_source()
    if kind == "hf":
      m = hf.load(path, dtype=p.dtype, param_dtype="float32")
      tok = Tokenizer(path)
      check_fits(tok, m.cfg.vocab_size, path)
      cfg = dataclasses.replace(m.cfg, remat=p.remat)
      return (self.copies(m.params, p.num_agents, cfg), cfg, tok, m.hf_config, m.source_dtype,
              path)
    agents = checkpoint.read_meta(path).num_agents
    if agents not in (1, p.num_agents):
      raise ConfigError(f"config.model.path={path!r}: the checkpoint has {agents} "
                        f"agents; this config needs 1 (copied) or {p.num_agents}")
    # A whole population restores straight onto the mesh; one agent is read
    # onto a local device and copied onto it.
    pop, meta = checkpoint.load_population(path, mesh=self.mesh if agents > 1 else None,
                                           dtype=p.dtype, param_dtype="float32",
                                           remat=p.remat)
    if agents == 1:
      pop = self.copies(population.select(pop, 0), p.num_agents, meta.cfg)
    return (pop, meta.cfg, Tokenizer(checkpoint.tokenizer_dir(path)), meta.hf_config,
            meta.source_dtype, checkpoint.tokenizer_dir(path))

  def population_path(self, iteration: int) -> str:
    return os.path.join(Stage(self.workdir, iteration, "finetune").dir, "population")

  def load_population(self, iteration: int) -> Params:
    """The population after `iteration` (0: the base)."""
    if iteration == 0:
      return self.load_base()[0]
    pop, _ = checkpoint.load_population(self.population_path(iteration), mesh=self.mesh,
                                        dtype=self.plan.dtype, param_dtype="float32",
                                        remat=self.plan.remat)
    return pop

  # -- driver

  def run(self) -> list[dict]:
    """Every stage not yet done, in order; returns the records."""
    with sharding.use_mesh(self.mesh):
      return self._run()

  def _run(self) -> list[dict]:
    p = self.plan
    t0 = time.perf_counter()
    self.check_workdir()
    for note in layout_notes(p):
      self.log(f"note: {note}")
    pop = self.prepare()
    have = 0  # `pop` is the population after iteration `have`
    for k in range(0, p.iterations + 1):
      for s in ("eval",) if k == 0 else STAGES:
        stage = Stage(self.workdir, k, s)
        if stage.done:
          continue
        need = k if s == "eval" else k - 1
        if have != need:
          pop, have = self.load_population(need), need
        start = time.perf_counter()
        self.log(f"iteration {k}/{p.iterations}: {s}")
        out = getattr(self, f"_{s}")(k, pop, stage)
        if s == "finetune":
          pop, have = out, k
        self._publish()
        self.log(f"iteration {k}/{p.iterations}: {s} done in {time.perf_counter() - start:.1f}s")
        if s == "eval":
          print(table(self.records(), p), flush=True)
    self.log(f"run finished in {time.perf_counter() - t0:.1f}s")
    return self.records()

  def records(self) -> list[dict]:
    out = []
    for k in range(0, self.plan.iterations + 1):
      for s in (("eval",) if k == 0 else STAGES):
        stage = Stage(self.workdir, k, s)
        if stage.done:
          out.append({"iteration": k, "stage": s, **stage.summary()})
    return out

  def _publish(self) -> None:
    if not distributed.is_primary():
      return
    records = self.records()
    _write_jsonl(os.path.join(self.workdir, "metrics.jsonl"), records)
    from maft_jax import report
    report.write_tensorboard(self.workdir, records)

  # -- stages

  def _debate(self, k: int, pop: Params, stage: Stage):
    p = self.plan
    problems = self.problems("train")
    t0 = time.perf_counter()
    seed = stage_seed(p.seed, k, "debate")
    d = self._run_debate(pop, problems, rounds=p.rounds, options=p.debate_options, seed=seed)
    if p.selection_mode == "star":  # rationalise the failures, with the answer as a hint
      N = p.generators
      correct = np.asarray(self.task.is_correct_many(
          [t for slot in d.texts[0] for t in slot], list(problems) * N), bool).reshape(N, -1)
      d = debate.rationalize(self.gen, self.task, problems, d, generators=_agents(pop, 0, N),
                             failed_NxB=~correct, options=p.debate_options, seed=seed)
    out = stage.begin()
    if distributed.is_primary():
      _save_debate(os.path.join(out, "debate.json"), problems, d)
    stage.commit({"problems": len(problems), "responses": sum(len(s) for r in d.texts for s in r),
                  "seconds": time.perf_counter() - t0})

  def _run_debate(self, pop, problems, *, rounds, options, seed) -> debate.Debate:
    N = self.plan.generators
    gens = _agents(pop, 0, N)
    critics = _agents(pop, N, 2 * N) if self.plan.critics else None
    return debate.run(self.gen, self.task, problems, generators=gens, critics=critics,
                      rounds=rounds, options=options, seed=seed, summarize=self.plan.summarize)

  def _select(self, k: int, pop: Params, stage: Stage):
    p = self.plan
    t0 = time.perf_counter()
    ids, d = _load_debate(os.path.join(Stage(self.workdir, k, "debate").dir, "debate.json"))
    by_id = {q.id: q for q in self.problems("train")}
    problems = [by_id[i] for i in ids]
    rows, summary, decided = select(d, problems, self.task, plan=p, tokenizer=self.tok,
                                    key=jax.random.key(stage_seed(p.seed, k, "select")),
                                    score=lambda r: self._row_nll(pop, r))
    out = stage.begin()
    if distributed.is_primary():
      _write_json(os.path.join(out, "consensus.json"), decided)
      for a, agent_rows in enumerate(rows):
        _write_jsonl(os.path.join(out, f"agent_{a}.jsonl"), agent_rows)
    summary["seconds"] = time.perf_counter() - t0
    stage.commit(summary)

  def _finetune(self, k: int, pop: Params, stage: Stage) -> Params:
    p = self.plan
    iters = range(1, k + 1) if p.init == "base" else range(k, k + 1)
    rows = [[] for _ in range(p.num_agents)]
    for i in iters:
      sel = Stage(self.workdir, i, "select").dir
      for a in range(p.num_agents):
        rows[a] += [r for _, r in read_jsonl(os.path.join(sel, f"agent_{a}.jsonl"))]
    if p.init == "base":
      pop = self.load_base()[0]
    if p.shared:  # one model trains on every slot's rows; all slots stay copies of it
      rows = [[r for agent_rows in rows for r in agent_rows]]
      pop = _agents(pop, 0, 1)
    examples = [sft.tokenize_rows(r, self.tok, where=lambda i, a=a: f"agent {a} row {i}")
                for a, r in enumerate(rows)]
    settings = dataclasses.replace(p.sft, seed=stage_seed(p.seed, k, "finetune"))
    result = sft.run(pop, examples, cfg=self.cfg, settings=settings, pad_id=self.pad_id,
                     workdir=os.path.join(self.workdir, f"iter_{k:02d}", "finetune_state"),
                     run_id={"iteration": k}, progress=self.progress, log=self.log,
                     spmd_axis_name=AGENT_AXIS, mesh=self.mesh)
    params = result.params
    if p.shared:  # copies of the one trained model, on the mesh by the rule table
      layout = sharding.shardings(population.axes(self.cfg),
                                  population.shapes(self.cfg, p.num_agents), self.mesh)
      params = jax.jit(lambda one: population.replicate(population.select(one, 0), p.num_agents),
                       out_shardings=layout)(params)
    out = stage.begin()
    checkpoint.save_population(os.path.join(out, "population"), params, cfg=self.cfg,
                               hf_config=self.hf_config, source_dtype=self.source_dtype,
                               tokenizer_from=self.tok_dir)
    stage.commit({"examples": result.examples, "steps": result.steps,
                  "final_loss": result.final_loss, "tokens": result.tokens,
                  "seconds": result.seconds})
    if distributed.is_primary():
      shutil.rmtree(os.path.join(self.workdir, f"iter_{k:02d}", "finetune_state"),
                    ignore_errors=True)
    return params

  def _eval(self, k: int, pop: Params, stage: Stage):
    t0 = time.perf_counter()
    result, d, problems = self.evaluate(pop, seed=eval_seed(self.plan.seed))
    out = stage.begin()
    if distributed.is_primary():
      _save_debate(os.path.join(out, "debate.json"), problems, d)
    result["seconds"] = time.perf_counter() - t0
    stage.commit(result)

  def evaluate(self, pop: Params, *, seed: int) -> tuple[dict, debate.Debate, list[Problem]]:
    """Debate on the held-out problems and its metrics (also `launch.evaluate`)."""
    with sharding.use_mesh(self.mesh):
      return self._evaluate(pop, seed=seed)

  def _evaluate(self, pop: Params, *, seed: int) -> tuple[dict, debate.Debate, list[Problem]]:
    p = self.plan
    problems = self.problems("test")
    d = self._run_debate(pop, problems, rounds=p.eval_rounds, options=p.eval_options, seed=seed)
    result = metrics.evaluate(d, self.task, problems, jax.random.key(seed))
    result["problems"] = len(problems)
    if p.cross_nll:
      # Authors: generators' round-1 responses, critics' last-round responses.
      N, K = p.generators, min(p.nll_problems or len(problems), len(problems))
      responses = [(0, n) for n in range(N)] + [(-1, n) for n in range(N) if p.critics]
      rows = [[(d.messages[r][n][b], d.texts[r][n][b]) for b in range(K)]
              for r, n in responses]
      sums, counts = self._row_nll(pop, rows)
      result["cross_nll"] = (sums.sum(-1) / np.maximum(counts.sum(-1), 1)).tolist()
      result["cross_nll_problems"] = K
    return result, d, problems

  def _row_nll(self, pop: Params, rows) -> tuple[np.ndarray, np.ndarray]:
    """rows[author][b] = (messages, response) -> per-row NLL sums and token
    counts f32/i32[A_scorer, A_author, b], in chunks of eval.nll_batch rows."""
    def ids(messages, response):
      text, special = prompts.to_text(messages, self.tok)
      return (self.tok.encode(text, add_special_tokens=special),
              self.tok.encode(response, add_special_tokens=False))

    pairs = [[ids(m, t) for m, t in author] for author in rows]
    # Rows as long as the longest pair needs (bucketed, at most finetune.seq_len).
    longest = max(len(p) + len(c) for author in pairs for p, c in author)
    T = min(generation.bucket_length(longest, 16), self.plan.sft.seq_len)
    encoded = [[scoring.scoring_rows(p, c, T, self.pad_id) for p, c in author]
               for author in pairs]
    B = len(encoded[0])
    chunk = min(self.plan.nll_batch, B)  # one compiled shape; no all-padding rows
    sums, counts = [], []
    for c in range(0, B, chunk):
      part = [a[c:c + chunk] for a in encoded]
      pad = chunk - len(part[0])
      # [A_author, chunk, T]: every scorer reads every author's rows.
      batch = {key: sharding.host_to_global(
          np.stack([np.stack([r[key] for r in a] + [np.zeros(T, np.int32)] * pad)
                    for a in part]), (None, "batch", "length"), self.mesh)
               for key in sft.BATCH_KEYS}
      s, n = scoring.row_nll(pop, batch, cfg=self.cfg, ce_chunk=self.plan.sft.hyper.ce_chunk,
                             spmd_axis_name=AGENT_AXIS)
      sums.append(distributed.to_host(s)[..., :chunk - pad])
      counts.append(distributed.to_host(n)[..., :chunk - pad])
    return np.concatenate(sums, -1), np.concatenate(counts, -1)


# ----------------------------------------------------------------------------- memory plan

def model_config(plan: Plan) -> ModelConfig:
  """The model's architecture and numerics without reading any weights."""
  if plan.model_source == "hf":
    cfg = hf.config_from_hf(hf.read_config(plan.model_path), dtype=plan.dtype,
                            param_dtype="float32", where=f"{plan.model_path}/config.json")
  elif plan.model_source == "checkpoint":
    cfg = dataclasses.replace(checkpoint.read_meta(plan.model_path).cfg, dtype=plan.dtype,
                              param_dtype="float32")
  else:  # demo: the vocabulary is at most the BPE target, rounded as the build rounds it
    from maft_jax import demo
    s = demo.DemoSettings.preset(plan.demo_preset)
    cfg = hf.config_from_hf(demo.hf_config(s, s.vocab_size, {demo.PAD: 0, demo.BOS: 1,
                                                              demo.EOS: 2}),
                            dtype=plan.dtype, param_dtype="float32")
  return dataclasses.replace(cfg, remat=plan.remat)


def layout_notes(plan: Plan) -> list[str]:
  """Mesh choices that run correctly but leave devices computing copies, one
  line each (logged when a run starts, printed by the dry run)."""
  agent, data, fsdp, _ = plan.mesh
  notes = []
  if plan.generators % agent:
    notes.append(
        f"config.mesh.agent={agent} does not divide agents.generators={plan.generators}: "
        "generators and critics sample as populations of N each, which cannot be split "
        "over the agent axis, so every agent slice samples all of them (mesh.agent=1 with "
        "a larger mesh.fsdp splits the same memory)")
  rows = data * fsdp
  for field, size in (("finetune.batch_size", plan.sft.batch_size),
                      ("debate.batch_size", plan.debate_options.batch_size),
                      ("eval.batch_size", plan.eval_options.batch_size)):
    if size % rows:
      notes.append(
          f"config.{field}={size} is not a multiple of mesh.data x mesh.fsdp = {rows}: "
          "its rows are split over fewer devices than that (the rule table drops an axis "
          "that does not divide), and the others compute copies"
          + ("; a larger batch_size with a smaller grad_accum keeps the tokens per step"
             if field.startswith("finetune") else ""))
  return notes


def memory_plan(plan: Plan, *, capacity: int, compile: bool = True,
                log: Callable[[str], None] = logging.info):
  """`memory.plan_memory` for this run on its mesh: sampling at the larger of
  the debate's and evaluation's batch and lengths (prompts as long as a
  finetuning row leaves room for), training at finetune.batch_size x
  grad_accum x seq_len."""
  from maft_jax import memory
  new_tokens = max(plan.debate_options.max_new_tokens, plan.eval_options.max_new_tokens)
  return memory.plan_memory(
      model_config(plan), agents=plan.num_agents, mesh=sharding.make_mesh(plan.mesh),
      sample_batch=max(plan.debate_options.batch_size, plan.eval_options.batch_size),
      prompt_len=plan.sft.seq_len - new_tokens, max_new_tokens=new_tokens,
      train_batch=plan.sft.batch_size, grad_accum=plan.sft.grad_accum, seq_len=plan.sft.seq_len,
      hyper=plan.sft.hyper, lora_config=plan.sft.lora, capacity=capacity, compile=compile,
      methods=(plan.debate_options.method, plan.eval_options.method), log=log)


# ----------------------------------------------------------------------------- selection

def select(d: debate.Debate, problems: Sequence[Problem], task: Task, *, plan: Plan, tokenizer,
           key: jax.Array, score: Callable | None = None
           ) -> tuple[list[list[dict]], dict, dict]:
  """Each agent's SFT rows from a training debate, a summary of the sets, and
  what the debate decided per problem (`consensus.json`: the majority's
  representative answer key, its votes, whether it is right).

  Slot n's round-1 answer (generator n) and last-round answer (critic n, or
  generator n without critics) are compared with a target: the consensus of
  the last round's answers alone (`paper`; `verdict`: the task's answer
  relation, seeded ties) or the reference (`ground_truth`, `cross_agent`).

  - paper / ground_truth: generator n trains on its own agreeing round-1
    responses (D^G_n); critic n on its corrected transcripts D^C-_n plus a
    seeded subset of D^C+_n so corrected ones make up `critic_weight`
    (`scoring.paper_selection`).
  - star: STaR (Zelikman et al. 2022): generator n trains on its own verified
    round-1 responses and on its verified rationalisations of the problems it
    failed (`debate.rationalize`, sampled with the answer as a hint in the
    debate stage), each under the round-1 prompt without the hint.
  - cross_agent: within each role (generators: round 1; critics: last round),
    agent a trains on every verified response b of every agent a' with weight
    w[a, a', b] from `scoring.cross_agent_weights` (own successes weigh >= 1;
    weight doubles on problems a failed; softmax over a's NLL of the verified
    responses, so unlikely ones weigh more). A weight becomes a number of
    copies by seeded stochastic rounding: floor(w), plus one with probability
    w - floor(w).
  """
  N, B, M = plan.generators, len(problems), d.num_rounds
  last = M - 1
  k_vote, k_sel, k_round = jax.random.split(key, 3)
  v = verdict.judge(d, task, problems)
  vote = v.vote(last, k_vote)                  # the last round's majority, alone
  first_true, last_true = v.correct_RxNxB[0], v.correct_RxNxB[last]
  if plan.selection_mode == "paper":
    first_ok, last_ok = vote.agree_RxNxB[0], vote.agree_RxNxB[last]
  else:
    first_ok, last_ok = first_true, last_true
  summary = {"mode": plan.selection_mode, "problems": B,
             "consensus_accuracy": float(vote.right_B.mean()),
             "consensus_rate": float((vote.votes_B / N).mean())}
  decided = {"problem_ids": [p.id for p in problems], "consensus": vote.keys_B,
             "votes": vote.votes_B.tolist(), "right": vote.right_B.tolist()}
  critics_train = plan.critics
  if plan.selection_mode == "star":
    # Own verified round-1 rationales, and verified rationalisations of the
    # failures under the prompt without the hint.
    r = d.rationales
    asked = [(n, b) for n in range(N) for b in range(B) if r["texts"][n][b] is not None]
    ok = task.is_correct_many([r["texts"][n][b] for n, b in asked], [problems[b] for _, b in asked])
    rationale_ok = np.zeros((N, B), bool)
    for (n, b), good in zip(asked, ok):
      rationale_ok[n, b] = good
    own, hinted = debate.sft_rows(d, 0, first_true, tokenizer), debate.rationale_rows(
        d, rationale_ok, tokenizer)
    rows = [a + h for a, h in zip(own, hinted)]
    summary.update({"d_g": first_true.sum(1).tolist(),
                    "rationalized": [sum(1 for m, _ in asked if m == n) for n in range(N)],
                    "rationales_kept": rationale_ok.sum(1).tolist()})
  elif plan.selection_mode in ("paper", "ground_truth"):
    d_g, d_minus, d_plus, kept = (np.asarray(x) for x in scoring.paper_selection(
        first_ok, first_ok, last_ok, k_sel, critic_weight=plan.critic_weight))
    rows = debate.sft_rows(d, 0, d_g, tokenizer)
    if critics_train:
      rows += debate.sft_rows(d, last, d_minus | kept, tokenizer)
    summary.update({"d_g": d_g.sum(1).tolist(), "d_c_minus": d_minus.sum(1).tolist(),
                    "d_c_plus": d_plus.sum(1).tolist(), "d_c_kept": kept.sum(1).tolist()})
  else:
    rows, copies = [], []
    roles = [(0, first_true)] + ([(last, last_true)] if critics_train else [])
    rng = np.random.default_rng(np.asarray(jax.random.key_data(k_round)).tolist())
    for round_index, ok in roles:
      texts = [[(d.messages[round_index][n][b], d.texts[round_index][n][b]) for b in range(B)]
               for n in range(N)]
      sums, counts = score(texts)                      # [A_scorer(all agents), N, B]
      offset = 0 if round_index == 0 else N
      nll = sums[offset:offset + N] / np.maximum(counts[offset:offset + N], 1)
      w = np.asarray(scoring.cross_agent_weights(ok, nll, temperature=plan.cross_temperature))
      n_copies = np.floor(w).astype(int) + (rng.random(w.shape) < w - np.floor(w))
      copies.append(n_copies.sum(axis=(1, 2)).tolist())
      all_rows = [debate.sft_rows(d, round_index, np.ones((N, B), bool), tokenizer)[n]
                  for n in range(N)]
      for a in range(N):
        rows.append([all_rows[src][b] for src in range(N) for b in range(B)
                     for _ in range(int(n_copies[a, src, b]))])
    summary["d_g"] = first_true.sum(1).tolist()
    summary["cross_copies"] = copies
  summary["selected"] = [len(r) for r in rows]
  return rows, summary, decided


# ----------------------------------------------------------------------------- table

def _pct(x) -> str:
  return "   -  " if x is None else f"{100 * x:5.1f}%"


def _pct_se(record, field: str) -> str:
  from maft_jax import report
  return report.pct_se(*report.accuracy(record, field))


def table(records: Sequence[Mapping[str, Any]], plan: Plan) -> str:
  """The per-iteration table printed after every iteration; accuracies carry
  ± their standard error (percentage points)."""
  evals = {r["iteration"]: r for r in records if r["stage"] == "eval"}
  sel = {r["iteration"]: r for r in records if r["stage"] == "select"}
  lines = [f"{'iter':>4}  {'agents (round 1)':<{7 * plan.generators}}  {'mean':>12}  "
           f"{'majority':>12}  {'debate':>12}  {'best-of-N':>12}  {'consensus':>9}  selected"]
  for k in sorted(evals):
    e = evals[k]
    accs = e.get("round1_accuracy", [])
    lines.append(
        f"{k:>4}  {' '.join(_pct(x) for x in accs):<{7 * plan.generators}}  "
        f"{_pct_se(e, 'round1_mean'):>12}  {_pct_se(e, 'majority_accuracy'):>12}  "
        f"{_pct_se(e, 'debate_accuracy'):>12}  {_pct_se(e, 'best_of_n_accuracy'):>12}  "
        f"{_pct(e.get('consensus_rate')):>9}  {sel[k]['selected'] if k in sel else '-'}")
  return "\n".join(lines)
