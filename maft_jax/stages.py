"""The four stages of a MAFT iteration, each a function of explicit inputs.

    summary = stages.debate(env, k, pop, out)       # writes out/debate.json
    summary = stages.select(env, k, pop, out)       # out/consensus.json, out/agent_A.jsonl
    summary, pop = stages.finetune(env, k, pop, out)  # out/population/
    summary = stages.evaluate(env, k, pop, out)     # out/debate.json

A stage reads the run's `Env` (plan, task, problems, tokenizer, sampler:
nothing that holds weights), the population it is given (`loop.STAGE_TABLE`
says which; None when it needs none), and the files of the stages before it
(`env.stage_dir`). It writes its files into `out` (on the primary process;
checkpoints collectively) and returns its summary, the stage's record.

Randomness is derived, never carried (`seeds`): every stage draws from
`stage_key(seed, iteration, stage)`; inside it, the debate folds in the
round, samplers the agent, the prompt row and the step, and the trainer the
agent. Evaluation is the exception: every iteration's evaluation samples
with `eval_key(seed)` (common random numbers), so the change from one
iteration to the next reflects the weights, not a new draw of the sampling
noise.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np

from maft_jax import (checkpoint, config, debate as debates, distributed, files, generation,
                      metrics, population, records, scoring, seeds, selection, sft, sharding,
                      source)
from maft_jax.model import Params
from maft_jax.tasks import Problem, Task

NAMES = ("debate", "select", "finetune", "eval")


def stage_key(seed: int, iteration: int, stage: str) -> jax.Array:
  """The stage's key, derived from (seed, iteration, stage) alone."""
  return seeds.key(seed, iteration, NAMES.index(stage))


def eval_key(seed: int) -> jax.Array:
  """The sampling key of every iteration's held-out evaluation (see the module docstring)."""
  return stage_key(seed, 0, "eval")


class Env:
  """What every stage of a run reads. Built from the base's description, not
  its weights: the tokenizer, model config and sampler; the task and its
  problems are read when first used.

  With LoRA (finetune.lora_rank) every population is one base with stacked
  adapters (`population.Adapted`): the base is read once, held for the whole
  run and shared by every population; the base population's adapters are
  fresh (B = 0, so it samples as the base) from `stage_key(seed, 0,
  'finetune')`, and each iteration's checkpoint holds only its adapters and a
  reference to the base (`checkpoint.BaseRef`)."""

  def __init__(self, plan: config.Plan, workdir: str, base: source.Source, *,
               log: Callable[[str], None] = logging.info, progress: bool = True):
    self.plan, self.workdir, self.base, self.log = plan, workdir, base, log
    self.cfg = base.cfg
    self.tokenizer = base.tokenizer()
    # The agent axis split over the mesh's 'agent' axis; programs run under
    # `placement.context()`.
    self.placement = sharding.Placement(sharding.make_mesh(plan.mesh))
    self.gen = generation.Generator(self.cfg, self.tokenizer, progress=progress, log=log,
                                    placement=self.placement)
    self.progress = progress
    self.lora = plan.finetune.sft.lora
    self._task: Task | None = None
    self._split = None
    self._lora_base: Params | None = None
    self._base_ref: checkpoint.BaseRef | None = None

  @property
  def task(self) -> Task:
    if self._task is None:
      from maft_jax import tasks
      self._task = tasks.load(self.plan.task.name, **self.plan.task.options)
    return self._task

  def problems(self, split: str) -> list[Problem]:
    """The run's training ("train") or held-out ("test") problems: exactly
    task.train_size and task.test_size of them (`Task.split`)."""
    if self._split is None:
      self._split = self.task.split(self.plan.task.train_size, self.plan.task.test_size)
    return self._split.train if split == "train" else self._split.test

  def stage_dir(self, iteration: int, name: str) -> str:
    return stage_dir(self.workdir, iteration, name)

  @property
  def base_ref(self) -> checkpoint.BaseRef:
    """The run's base as LoRA checkpoints reference it (hashed once)."""
    if self._base_ref is None:
      self._base_ref = checkpoint.BaseRef.of(self.base.kind, self.base.path)
    return self._base_ref

  def lora_base(self) -> Params:
    """The one base every LoRA population shares (read on first use, then held)."""
    if self._lora_base is None:
      self._lora_base = source.load_base(self.base, self.placement)
    return self._lora_base

  def load_base(self) -> population.Population:
    """The base population on the mesh: A copies of the base (or a
    checkpoint's A agents, merged if they are LoRA ones); with LoRA, the
    held base with the base population's adapters (class docstring)."""
    A = self.plan.num_agents
    if self.lora is None:
      return population.merged(source.load(self.base, A, self.placement), self.cfg,
                               self.placement)
    return source.adapted(self.base, A, self.placement, self.lora,
                          stage_key(self.plan.seed, 0, "finetune"), base=self.lora_base())

  def load_checkpoint(self, path: str) -> population.Population:
    """An iteration's population checkpoint (`stages.finetune` wrote it) on the mesh."""
    if self.lora is None:
      m = self.plan.model
      src = source.describe("checkpoint", path, dtype=m.dtype, param_dtype="float32",
                            remat=m.remat)
      return source.load(src, self.plan.num_agents, self.placement)
    adapters, meta = checkpoint.load_adapters(path, self.placement)
    if meta.base_ref is None or meta.base_ref.sha256 != self.base_ref.sha256:
      raise checkpoint.CheckpointError(
          f"{path}: its adapters were not trained over this run's base {self.base.path} "
          f"(it records {meta.base_ref})")
    return population.Adapted(base=self.lora_base(), adapters=adapters, scale=meta.scale)

  def row_nll(self, pop: Params, rows) -> tuple[np.ndarray, np.ndarray]:
    """`scoring.text_nll` of rows[author][b] = (messages, response), in
    chunks of eval.nll_batch problems."""
    return scoring.text_nll(pop, rows, cfg=self.cfg, tokenizer=self.tokenizer,
                            pad_id=self.gen.pad_id, max_len=self.plan.finetune.sft.seq_len,
                            chunk=self.plan.eval.nll_batch,
                            ce_chunk=self.plan.finetune.sft.hyper.ce_chunk,
                            placement=self.placement)


# ----------------------------------------------------------------------------- records

def write_debate(path: str, problems: Sequence[Problem], d: debates.Debate) -> None:
  files.write_json(path, {"problem_ids": [p.id for p in problems], "texts": d.texts,
                          "keys": d.keys, "messages": d.messages, "finishes": d.finishes,
                          **({"rationales": d.rationales} if d.rationales is not None else {})})


def read_debate(path: str) -> tuple[list[str], debates.Debate]:
  raw = files.read_json(path)
  try:
    return raw["problem_ids"], debates.Debate(
        texts=raw["texts"], keys=raw["keys"], messages=raw["messages"],
        finishes=raw["finishes"], rationales=raw.get("rationales"))
  except (KeyError, TypeError) as e:
    raise files.FileError(f"{path}: not a debate record (no {e})") from None


def read_rows(select_dir: str, agent: int) -> list[dict]:
  return [r for _, r in files.read_jsonl(os.path.join(select_dir, f"agent_{agent}.jsonl"))]


# ----------------------------------------------------------------------------- stages

def stage_dir(workdir: str, iteration: int, name: str) -> str:
  """`<workdir>/iter_KK/<name>`: a stage's directory (and its neighbours)."""
  return os.path.join(workdir, f"iter_{iteration:02d}", name)


def finetune_state_dir(workdir: str, k: int) -> str:
  """Iteration k's training checkpoints while its finetune stage runs (the
  driver removes them once the stage is committed)."""
  return stage_dir(workdir, k, "finetune_state")


def run_debate(env: Env, pop: Params, problems: Sequence[Problem], *, rounds: int,
               options: generation.Options, key: jax.Array) -> debates.Debate:
  """A debate of the population's generators and critics (`debate.run`)."""
  a = env.plan.agents
  return debates.run(env.gen, env.task, problems, generators=a.generators_of(pop),
                     critics=a.critics_of(pop), rounds=rounds, options=options, key=key,
                     summarize=env.plan.debate.summarize)


def debate(env: Env, k: int, pop: Params, out: str) -> records.Debate:
  """The training debate of iteration k (STaR: with its rationalisations)."""
  p = env.plan
  problems = env.problems("train")
  debate_key, hint_key = jax.random.split(stage_key(p.seed, k, "debate"))
  d = run_debate(env, pop, problems, rounds=p.debate.rounds, options=p.debate.options,
                 key=debate_key)
  if p.selection.mode == "star":  # rationalise the failures, with the answer as a hint
    N = p.agents.generators
    correct = np.asarray(env.task.is_correct_many(
        [t for slot in d.texts[0] for t in slot], list(problems) * N), bool).reshape(N, -1)
    d = debates.rationalize(env.gen, env.task, problems, d,
                            generators=p.agents.generators_of(pop), failed_NxB=~correct,
                            options=p.debate.options, key=hint_key)
  if distributed.is_primary():
    write_debate(os.path.join(out, "debate.json"), problems, d)
  return records.Debate(problems=len(problems),
                        responses=sum(len(s) for r in d.texts for s in r))


def select(env: Env, k: int, pop: Params | None, out: str) -> records.Select:
  """Each agent's rows from iteration k's debate (`selection.select`); `pop`
  (cross_agent only) scores them."""
  p = env.plan
  ids, d = read_debate(os.path.join(env.stage_dir(k, "debate"), "debate.json"))
  by_id = {q.id: q for q in env.problems("train")}
  problems = [by_id[i] for i in ids]
  sel = selection.select(d, problems, env.task, p.selection, critics=p.agents.critics,
                         tokenizer=env.tokenizer,
                         key=stage_key(p.seed, k, "select"),
                         score=lambda rows: env.row_nll(pop, rows))
  if distributed.is_primary():
    files.write_json(os.path.join(out, "consensus.json"), sel.decided)
    for a, agent_rows in enumerate(sel.rows):
      files.write_jsonl(os.path.join(out, f"agent_{a}.jsonl"), agent_rows)
  return sel.summary


def finetune(env: Env, k: int, pop: population.Population, out: str
             ) -> tuple[records.Finetune, population.Population]:
  """Every agent trained on its rows of iteration k (finetune.init=base: from
  the base, on its rows of iterations 1..k); returns the new population.
  With LoRA, `pop`'s adapters train further (init=base: the base
  population's) and the checkpoint holds them with a reference to the base."""
  p = env.plan
  iters = range(1, k + 1) if p.finetune.init == "base" else range(k, k + 1)
  rows = [[] for _ in range(p.num_agents)]
  for i in iters:
    for a in range(p.num_agents):
      rows[a] += read_rows(env.stage_dir(i, "select"), a)
  if p.agents.shared:  # one model trains on every slot's rows; all slots stay copies of it
    rows = [[r for agent_rows in rows for r in agent_rows]]
    pop = population.take(pop, 0, 1)
  examples = [sft.tokenize_rows(r, env.tokenizer, where=lambda i, a=a: f"agent {a} row {i}")
              for a, r in enumerate(rows)]
  settings = dataclasses.replace(p.finetune.sft,
                                 seed=seeds.to_int(stage_key(p.seed, k, "finetune")))
  state_dir = finetune_state_dir(env.workdir, k)
  result = sft.run(pop, examples, cfg=env.cfg, settings=settings, pad_id=env.gen.pad_id,
                   workdir=state_dir, run_id={"iteration": k}, progress=env.progress,
                   log=env.log, placement=env.placement)
  params = result.params
  if p.agents.shared:  # copies of the one trained model, on the mesh by the rule table
    copies = lambda one: population.tile(one, p.num_agents)  # noqa: E731
    shapes = jax.eval_shape(copies, params)
    layout = env.placement.shardings(population.logical_axes(shapes, env.cfg), shapes)
    params = jax.jit(copies, out_shardings=layout)(params)
  adapted = isinstance(params, population.Adapted)
  checkpoint.save_population(os.path.join(out, "population"), params, cfg=env.cfg,
                             hf_config=env.base.hf_config, source_dtype=env.base.source_dtype,
                             tokenizer_from=env.base.tokenizer_dir,
                             base_ref=env.base_ref if adapted else None)
  return records.Finetune(examples=result.examples, steps=result.steps,
                          final_loss=result.final_loss, tokens=result.tokens), params


def eval_debate(env: Env, pop: Params, *, key: jax.Array
                ) -> tuple[records.Eval, debates.Debate, list[Problem]]:
  """Debate on the held-out problems and its metrics (also `launch.evaluate`)."""
  p = env.plan
  problems = env.problems("test")
  with env.placement.context():
    sample_key, vote_key = jax.random.split(key)
    d = run_debate(env, pop, problems, rounds=p.eval.rounds, options=p.eval.options,
                   key=sample_key)
    result = dict(metrics.evaluate(d, env.task, problems, vote_key), problems=len(problems))
    if p.eval.cross_nll:
      # Authors: generators' round-1 responses, critics' last-round responses.
      N, K = p.agents.generators, min(p.eval.nll_problems or len(problems), len(problems))
      authors = [(0, n) for n in range(N)] + [(-1, n) for n in range(N) if p.agents.critics]
      rows = [[(d.messages[r][n][b], d.texts[r][n][b]) for b in range(K)] for r, n in authors]
      sums, counts = env.row_nll(pop, rows)
      result["cross_nll"] = (sums.sum(-1) / np.maximum(counts.sum(-1), 1)).tolist()
      result["cross_nll_problems"] = K
  return records.Eval(**result), d, problems


def evaluate(env: Env, k: int, pop: Params, out: str) -> records.Eval:
  """The held-out evaluation of the population after iteration k."""
  result, d, problems = eval_debate(env, pop, key=eval_key(env.plan.seed))
  if distributed.is_primary():
    write_debate(os.path.join(out, "debate.json"), problems, d)
  return result
