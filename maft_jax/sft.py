"""Finetune a population on per-agent example lists: the SFT run around
`finetune.train_step`, shared by `launch.finetune` and the MAFT loop.

    examples = [tokenize_rows(rows_a, tok, where=...) for rows_a in per_agent_rows]
    result = sft.run(pop, examples, cfg=cfg, settings=Settings(...), workdir=DIR)

Agent a trains on `examples[a]` (an empty list: no update, weights stay
bit-identical; see `finetune` for the policy on unequal data). With a
`workdir`, training checkpoints (state + data iterator states) are written
every `save_every` steps and at the end, and a rerun with the same settings
resumes from the latest one; different settings are refused (`ResumeError`).
With LoRA, a `population.Adapted` population trains its own adapters further
(the base frozen) and the result is Adapted again; a full population must
hold identical agents (one base), which share one frozen copy and train fresh
adapters (B = 0: they start as the base), merged into full weights in the
result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maft_jax import (checkpoint, checks, data, distributed, finetune, lora, population, seeds,
                      sharding)
from maft_jax import progress as progress_line
from maft_jax.model import ModelConfig, Params
from maft_jax.tasks.base import require

BATCH_KEYS = ("tokens_BxT", "loss_mask_BxT", "segment_ids_BxT", "positions_BxT")
BATCH_AXES = ("agent", None, "batch", "length")  # of a step's [A, grad_accum, batch, T] arrays


class ResumeError(ValueError):
  pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
  hyper: finetune.Hyper = finetune.Hyper()
  epochs: int = 2
  batch_size: int = 8           # rows per microbatch per agent
  seq_len: int = 1024
  grad_accum: int = 1           # microbatches per step
  pack: bool = True
  seed: int = 0                 # data order and LoRA init (`seeds`: derived per agent)
  save_every: int = 100
  lora: lora.LoraConfig | None = None

  def __post_init__(self):
    checks.at_least(self, 1, "epochs", "batch_size", "grad_accum", "save_every")
    checks.at_least(self, 2, "seq_len")


@dataclasses.dataclass(frozen=True)
class Result:
  params: population.Population  # full weights [A, ...], or Adapted for an Adapted input
  steps: list[int]               # updates taken by each agent
  examples: list[int]            # examples per agent
  final_loss: list[float | None]  # each agent's loss at its last update (None: never updated)
  tokens: int                    # completion tokens trained on, all agents, all steps
  seconds: float                 # of this call (a resumed run: since the resume)


def tokenize_rows(rows: Sequence[Mapping[str, Any]], tokenizer, *, where: Callable[[int], str]
                  ) -> list[dict]:
  """Examples from {"prompt", "completion"} rows; `where(i)` names row i in errors.

  Optional per-row fields: "add_special_tokens" (default true; false for a
  prompt already rendered through a chat template, which holds its own BOS)
  and "append_eos" (default true; false for a completion cut at a length
  limit, which did not end). EOS is the tokenizer's own eos token.
  """
  if rows and tokenizer.eos_id is None:
    raise ValueError("the tokenizer has no EOS token to end completions")
  examples = []
  for i, row in enumerate(rows):
    prompt, completion = require(row, "prompt", where(i)), require(row, "completion", where(i))
    special = row.get("add_special_tokens", True)
    append_eos = row.get("append_eos", True)
    for name, value in (("add_special_tokens", special), ("append_eos", append_eos)):
      if not isinstance(value, bool):
        raise ValueError(f"{where(i)}: field {name!r} must be true or false")
    examples.append({"prompt_ids": tokenizer.encode(prompt, add_special_tokens=special),
                     "completion_ids": tokenizer.encode(completion, add_special_tokens=False)
                     + ([tokenizer.eos_id] if append_eos else [])})
  return examples


def _pipelines(examples, s: Settings, pad_id: int, held: Sequence[Sequence[tuple[int, int]]]):
  # Agent a gets one pipeline per interval of rows held[a] of its batches that
  # this process's devices hold (all of them in one process), building only
  # those rows; an agent this process holds none of keeps one empty pipeline,
  # whose state it saves like the others. The batches are slot ranges of one
  # global stream (see `data`), so a run on several processes trains on
  # exactly the batches of a one-process run, and the iterator states (a
  # position in that stream) resume on any process count.
  return [[data.sft_batches(ex, batch_size=s.batch_size, seq_len=s.seq_len,
                            # streams under s.seed: 0 data order (per agent), 1 LoRA init
                            seed=seeds.to_int(seeds.key(s.seed, 0, a)), pad_id=pad_id,
                            pack=s.pack,
                            num_epochs=s.epochs, slots=slots) for slots in rows or [(0, 0)]]
          if ex else None for a, (ex, rows) in enumerate(zip(examples, held))]


def _fresh_adapters(pop: Params, cfg: ModelConfig, s: Settings) -> population.Adapted:
  """A full population of identical agents as its one base with fresh adapters."""
  if not _identical_agents(pop):
    raise ValueError("LoRA on a full population trains fresh adapters on one shared base, so it "
                     "needs identical agents (e.g. fresh from launch.import_hf)")
  A = population.num_agents(pop)
  return population.Adapted(base=population.select(pop, 0),
                            adapters=lora.init(cfg, s.lora, seeds.key(s.seed, 1), A),
                            scale=s.lora.scale)


def _check_adapters(pop: population.Adapted, cfg: ModelConfig, lcfg: lora.LoraConfig) -> None:
  """The adapters are those `lcfg` describes (targets, rank, shapes) at its scale."""
  A = population.num_agents(pop)
  want = {t: {k: (A,) + shape for k, shape in ab.items()}
          for t, ab in lora.adapter_shapes(cfg, lcfg).items()}
  got = jax.tree.map(lambda x: tuple(x.shape), pop.adapters)
  if got != want or pop.scale != lcfg.scale:
    raise ValueError(f"the population's adapters (shapes {got}, scale {pop.scale:g}) are not "
                     f"those of {lcfg} (shapes {want}, scale {lcfg.scale:g})")


def _identical_agents(pop: Params) -> bool:
  return bool(jax.jit(lambda p: jnp.all(jnp.stack([jnp.all(x == x[:1])
                                                   for x in jax.tree.leaves(p)])))(pop))


def describe_changes(saved, wanted, path: str = "") -> list[str]:
  """Human-readable differences between two JSON-like values."""
  if isinstance(saved, dict) and isinstance(wanted, dict):
    return [d for k in sorted(set(saved) | set(wanted), key=str)
            for d in describe_changes(saved.get(k), wanted.get(k), f"{path}.{k}" if path else str(k))]
  return [] if saved == wanted else [f"{path or 'run'} was {saved!r}, now {wanted!r}"]


def run(pop: population.Population, examples: Sequence[Sequence[Mapping[str, Any]]], *,
        cfg: ModelConfig, settings: Settings, pad_id: int, workdir: str | None = None,
        run_id: Mapping[str, Any] | None = None, progress: bool = True,
        log: Callable[[str], None] = logging.info,
        placement: sharding.Placement = sharding.LOCAL) -> Result:
  """Train agent a on examples[a]; see the module docstring. `pop` is donated.

  `run_id`: what else a resumed run must share with the saved one (e.g. the
  data files), checked together with the settings and step counts.
  `placement`: the agent axis split over its mesh (that mesh current), as in
  `finetune.train_step`; each batch is placed by its rule table, each process
  builds only the rows its devices hold (`Placement.rows`), and each device
  receives only its own.
  """
  s = settings
  A = population.num_agents(pop)
  if len(examples) != A:
    raise ValueError(f"{len(examples)} example lists for a population of {A} agents")
  shape = (A, s.grad_accum, s.batch_size, s.seq_len)
  held = placement.rows(shape, BATCH_AXES, per=0, along=2)
  its = _pipelines(examples, s, pad_id, held)
  counts = [it[0].num_batches() if it else 0 for it in its]
  total_steps = [-(-c // s.grad_accum) for c in counts]
  num_steps = max(total_steps, default=0)
  log(f"examples per agent {[len(e) for e in examples]} -> steps per agent {total_steps}")
  if any(rows != [(0, s.batch_size)] for rows in held):
    log(f"process {jax.process_index()} builds rows {[[list(r) for r in rows] for rows in held]}"
        f" of each agent's batches of {s.batch_size}")
  adapted_in = isinstance(pop, population.Adapted)
  if adapted_in and s.lora is None:
    raise ValueError("an Adapted population (base + LoRA adapters) trains its adapters: "
                     "give settings.lora")
  base, trainable = None, pop
  if s.lora is not None:
    if adapted_in:
      _check_adapters(pop, cfg, s.lora)
    adapted = pop if adapted_in else _fresh_adapters(pop, cfg, s)
    base, trainable = adapted.base, adapted.adapters
    del pop, adapted
    log(f"LoRA rank {s.lora.rank} alpha {s.lora.alpha:g} on {','.join(s.lora.targets)}: "
        f"{lora.count(trainable) // A:,} adapter parameters per agent"
        + ("" if adapted_in else " (fresh)"))
  state = finetune.init_state(trainable, s.hyper, total_steps)
  scale = s.lora.scale if s.lora else 1.0
  settings_id = dataclasses.asdict(s)
  del settings_id["save_every"]  # how often to save does not change the run
  run_config = {"settings": settings_id, "run_id": dict(run_id or {}),
                "total_steps": [int(t) for t in total_steps]}
  run_config = json.loads(json.dumps(run_config))  # as it reads back from JSON
  start, tokens_done = 0, 0
  last_loss: list[float | None] = [None] * A
  ckpts = checkpoint.TrainCheckpoints(workdir) if workdir else None
  if ckpts is not None and ckpts.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    state, extra = ckpts.restore(abstract)
    if extra.get("run") != run_config:
      ckpts.close()
      raise ResumeError(f"{workdir} holds a run with different settings ({extra.get('run')}); "
                        f"this run asks for {run_config}. Use another workdir or the same "
                        "settings.")
    start, tokens_done, last_loss = int(extra["step"]), int(extra["tokens"]), extra["last_loss"]
    for pipes, st in zip(its, extra["data"]):
      for it in pipes or ():
        it.set_state(st)
    log(f"resumed from {workdir} at step {start}")

  def next_micro(pipes) -> list[dict[str, np.ndarray]] | None:
    """One microbatch of an agent: a piece per held interval (None: no data)."""
    if pipes is None:
      return None
    pieces = [next(it, None) for it in pipes]
    return None if pieces[0] is None else pieces

  def fetch(micro, key: str, index: tuple[slice, ...]) -> np.ndarray:
    # This process's piece of the global batch [A, grad_accum, batch, T]. A
    # device's rows lie inside one of the intervals held[a] of agent a; a
    # finished agent's rows are padding.
    agents, accum, rows, length = index
    out = np.zeros([sl.stop - sl.start for sl in index], np.int32)
    for i, a in enumerate(range(agents.start, agents.stop)):
      n, lo = next((n, lo) for n, (lo, hi) in enumerate(held[a])
                   if lo <= rows.start and rows.stop <= hi)
      for j, m in enumerate(range(accum.start, accum.stop)):
        if micro[a][m] is not None:
          out[i, j] = micro[a][m][n][key][rows.start - lo:rows.stop - lo, length]
    return out

  t0, tokens_before = time.perf_counter(), tokens_done
  bar = progress_line.Line("training", total=num_steps, unit="steps", enabled=progress,
                           start=start)
  try:
    for step in range(start, num_steps):
      micro = [[next_micro(pipes) for _ in range(s.grad_accum)] for pipes in its]
      batch = {k: placement.assemble(shape, BATCH_AXES, functools.partial(fetch, micro, k))
               for k in BATCH_KEYS}
      state, metrics = finetune.train_step(state, batch, base, cfg=cfg, h=s.hyper,
                                           lora_scale=scale, placement=placement)
      metrics = {k: distributed.to_host(v) for k, v in metrics.items()}
      finetune.check_finite(metrics, step)
      tokens_done += int(metrics["tokens"].sum())
      loss, updated = metrics["loss"], metrics["updated"]
      for a in range(A):
        if updated[a]:
          last_loss[a] = float(loss[a])
      losses = " ".join(f"{l:.3f}" if u else "-" for l, u in zip(loss.tolist(), updated))
      bar.update(step + 1, tokens_done - tokens_before, f"loss [{losses}]")
      if ckpts is not None and ((step + 1) % s.save_every == 0 or step + 1 == num_steps):
        ckpts.save(step + 1, state, {"step": step + 1, "run": run_config, "tokens": tokens_done,
                                     "last_loss": list(last_loss),
                                     "data": [pipes[0].get_state() if pipes else None
                                              for pipes in its]})
  finally:
    # Let an in-flight asynchronous save of the last good state finish, also
    # when a step fails (e.g. a non-finite loss).
    if ckpts is not None:
      ckpts.close()
  bar.close()
  if s.lora is None:
    params = state["params"]
  elif adapted_in:
    params = population.Adapted(base=base, adapters=state["params"], scale=s.lora.scale)
  else:
    params = population.merged(population.Adapted(base=base, adapters=state["params"],
                                                  scale=s.lora.scale), cfg, placement)
  return Result(params=params, steps=distributed.to_host(state["step"]).tolist(),
                examples=[len(e) for e in examples], final_loss=last_loss, tokens=tokens_done,
                seconds=time.perf_counter() - t0)
