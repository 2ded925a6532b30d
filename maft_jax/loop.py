"""The MAFT iteration driver: runs the stages of a plan in a workdir.

    plan = config.validate(c)               # every field checked, nothing compiled
    records = loop.Run(plan, workdir).run()

A run is a sequence of stages (`stages`), each a function of the stages
before it:

    iteration 0:   eval                                  (the base population)
    iteration k:   debate -> select -> finetune -> eval  (k = 1 .. iterations)

- debate:   N generators answer the training problems; critics (or the
            generators, without critics) answer rounds 2..M. Transcripts kept.
- select:   answer classes in the task's relation -> consensus of the last
            round / agreement / selection masks (`verdict`) -> each agent's
            own SFT rows (`selection`).
- finetune: every agent trains on its rows in one vmapped program, from the
            previous iteration's weights (`finetune.init='previous'`) or from
            the base on the rows of iterations 1..k (`'base'`).
- eval:     a debate on held-out problems -> accuracy, consensus, diversity
            (distinct answers, n-gram overlap, cross-agent NLL matrix).

`STAGE_TABLE` says which population each stage reads. The driver holds at
most one population: it releases the one it has before it loads another.

Workdir. `config.json` (the resolved config; a rerun must match it, except
`iterations`, `name`, `mesh` and `finetune.save_every`, which may grow or
change), `iter_KK/STAGE/` per
finished stage (written as `STAGE.partial/` and renamed when complete, so a
directory that exists is a finished stage), `iter_KK/finetune_state/`
(training checkpoints while a finetune stage runs), `metrics.jsonl` (one
object per finished stage, rewritten from the stage summaries, so it never
holds duplicates) and `tb/` (TensorBoard events, rewritten likewise). A run
killed anywhere resumes at the stage in flight (mid-finetune: at its last
training checkpoint) and ends with the same result as an uninterrupted run.
With several processes (`distributed`), every process runs every stage on
the same inputs over one global mesh; process 0 writes the workdir.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from maft_jax import (builders, config, distributed, files, population, records, report, source,
                      stages)
from maft_jax.config import ConfigError, Plan


class StageSpec(NamedTuple):
  name: str
  # The iteration whose population the stage reads at iteration k (0: the
  # base), or None when it reads none.
  reads: Callable[[int, Plan], int | None]
  run: Callable[..., Any]              # (env, k, pop, out) -> its record (finetune: , pop)


STAGE_TABLE = (
    StageSpec("debate", lambda k, p: k - 1, stages.debate),
    StageSpec("select", lambda k, p: k - 1 if p.selection.mode == "cross_agent" else None,
              stages.select),
    StageSpec("finetune", lambda k, p: 0 if p.finetune.init == "base" else k - 1,
              stages.finetune),
    StageSpec("eval", lambda k, p: k, stages.evaluate),
)
STAGES = tuple(s.name for s in STAGE_TABLE)
assert STAGES == stages.NAMES


def stage_list(iterations: int) -> list[tuple[int, StageSpec]]:
  """(iteration, stage) of a run in order: the base's eval, then every stage of 1..L."""
  return [(0, STAGE_TABLE[-1])] + [(k, s) for k in range(1, iterations + 1) for s in STAGE_TABLE]


class Stage:
  """A stage's output directory, written whole or not at all. With several
  processes the primary writes it (`begin` and `commit` end with a barrier, so
  every process then sees the same directory); files inside are written by
  the primary alone, or collectively (checkpoints)."""

  def __init__(self, workdir: str, iteration: int, name: str):
    self.dir = stages.stage_dir(workdir, iteration, name)
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

  def commit(self, iteration: int, name: str, data: records.Data, seconds: float) -> None:
    if distributed.is_primary():
      files.write_json(os.path.join(self.partial, "summary.json"),
                       records.to_json(data, iteration=iteration, stage=name, seconds=seconds))
      files.commit_dir(self.partial, self.dir)
    distributed.barrier(f"commit {self.dir}")

  def record(self, iteration: int, name: str) -> records.Record:
    """The finished stage's record (`records.parse`: a damaged or foreign
    summary.json is named)."""
    try:
      return records.read_summary(os.path.join(self.dir, "summary.json"), iteration, name)
    except records.RecordError as e:
      raise ConfigError(str(e)) from None


def base_source(plan: Plan, workdir: str, *, log: Callable[[str], None] = logging.info,
                progress: bool = True) -> source.Source:
  """The base model's description; a built base (`maft_jax.builders`) is
  built first, by the primary, into `<workdir>/<source>_base`."""
  m = plan.model
  if m.source in source.KINDS:
    return _for_plan(plan, source.describe(m.source, m.path, dtype=m.dtype,
                                           param_dtype="float32", remat=m.remat))
  build = lambda: builders.get(m.source).build(  # noqa: E731
      os.path.join(workdir, f"{m.source}_base"), m.demo_preset, task_options=plan.task.options,
      log=log, progress=progress)
  path = build() if distributed.is_primary() else None
  distributed.barrier(f"{m.source}_base")
  path = path or build()  # other processes find it built: a read
  return _for_plan(plan, source.describe("hf", path, dtype=m.dtype, param_dtype="float32",
                                         remat=m.remat))


def _for_plan(plan: Plan, src: source.Source) -> source.Source:
  """With LoRA the base is frozen: it is held in the dtype it is stored in
  (bf16 weights are not widened to f32 masters nobody updates)."""
  if plan.finetune.sft.lora is None:
    return src
  return dataclasses.replace(src, cfg=dataclasses.replace(src.cfg, param_dtype=src.stored_dtype))


class Run:
  """Runs (or resumes) the stages of a plan in a workdir."""

  def __init__(self, plan: Plan, workdir: str, *, log: Callable[[str], None] = logging.info,
               progress: bool = True):
    self.plan, self.workdir, self.log, self.progress = plan, os.path.abspath(workdir), log, progress
    self._env: stages.Env | None = None

  @property
  def env(self) -> stages.Env:
    """The stages' environment (built on first use: builds the demo base,
    reads the tokenizer; no weights)."""
    if self._env is None:
      base = base_source(self.plan, self.workdir, log=self.log, progress=self.progress)
      self._env = stages.Env(self.plan, self.workdir, base, log=self.log, progress=self.progress)
    return self._env

  def check_workdir(self) -> None:
    """Refuse a workdir that holds a run with another config, or a finished
    stage whose record is damaged or of another record version (before any
    stage runs); record ours."""
    cfg_path = os.path.join(self.workdir, "config.json")
    if os.path.isfile(cfg_path):
      changes = config.config_changes(files.read_json(cfg_path), self.plan.config)
      if changes:
        raise ConfigError(f"{self.workdir} holds a run with a different config: "
                          f"{'; '.join(changes)}. Use another workdir or the same config.")
      self.records()  # every finished stage's record reads back
    if distributed.is_primary():
      os.makedirs(self.workdir, exist_ok=True)
      files.write_json(cfg_path, self.plan.config)
    distributed.barrier("check_workdir")

  def population_path(self, iteration: int) -> str:
    return os.path.join(Stage(self.workdir, iteration, "finetune").dir, "population")

  def load_population(self, iteration: int) -> population.Population:
    """The population after `iteration` (0: the base) on the run's mesh."""
    if iteration == 0:
      return self.env.load_base()
    return self.env.load_checkpoint(self.population_path(iteration))

  def run(self) -> list[records.Record]:
    """Every stage not yet done, in order; returns the records."""
    p, t0 = self.plan, time.perf_counter()
    self.check_workdir()
    for note in config.layout_notes(p):
      self.log(f"note: {note}")
    pop, have = None, None  # `pop` is the population after iteration `have`
    with self.env.placement.context():
      for k, spec in stage_list(p.iterations):
        stage = Stage(self.workdir, k, spec.name)
        if stage.done:
          continue
        need = spec.reads(k, p)
        if need is not None and need != have:
          pop, have = None, None  # released before the next one loads
          pop, have = self.load_population(need), need
        self.log(f"iteration {k}/{p.iterations}: {spec.name}")
        start = time.perf_counter()
        out = stage.begin()
        data = spec.run(self.env, k, pop if need is not None else None, out)
        if spec.name == "finetune":
          (data, pop), have = data, k
        seconds = time.perf_counter() - start
        stage.commit(k, spec.name, data, seconds)
        if spec.name == "finetune" and distributed.is_primary():  # the population is committed
          shutil.rmtree(stages.finetune_state_dir(self.workdir, k), ignore_errors=True)
        self._publish()
        self.log(f"iteration {k}/{p.iterations}: {spec.name} done in {seconds:.1f}s")
        if spec.name == "eval":
          print(report.console_table(self.records(), p.config), flush=True)
    self.log(f"run finished in {time.perf_counter() - t0:.1f}s")
    return self.records()

  def records(self) -> list[records.Record]:
    """The records of the finished stages, in order."""
    return [stage.record(k, spec.name) for k, spec in stage_list(self.plan.iterations)
            if (stage := Stage(self.workdir, k, spec.name)).done]

  def _publish(self) -> None:
    if not distributed.is_primary():
      return
    done = self.records()
    files.write_jsonl(os.path.join(self.workdir, "metrics.jsonl"), map(records.to_line, done))
    report.write_tensorboard(self.workdir, done)
