r"""Finetune every agent of a population on its own data, in one vmapped program.

    python -m launch.finetune --checkpoint=CKPT --data=A0.jsonl,A1.jsonl,... --out=CKPT2 \
        [--epochs=2] [--lr=1e-5] [--batch_size=8] [--seq_len=1024] [--grad_accum=1] \
        [--workdir=DIR] [--save_every=100] [--no_pack] [--lora_rank=R]

Agent i trains on the i-th JSONL file of {"prompt": ..., "completion": ...}
rows (loss on completion tokens only; EOS is appended to each completion).
An empty file means no update for that agent: its weights stay bit-identical.
Each agent sees each of its rows once per epoch (see maft_jax/finetune.py for
the policy on unequal data). With --workdir, training checkpoints (state,
data iterators) are written every --save_every steps and a rerun resumes from
the latest one. The result is a new population checkpoint at --out.

With --lora_rank=R, the agents (which must be identical: one base) share one
frozen copy of the base and train per-agent adapters (--lora_alpha,
--lora_targets); the adapters are merged into full weights in --out.
"""

import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from maft_jax import checkpoint, data, finetune, lora, population
from maft_jax.tasks.base import read_jsonl, require

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Input population checkpoint.",
                                  required=True)
_DATA = flags.DEFINE_list("data", None, "One JSONL file per agent.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output population checkpoint.", required=True)
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs over each agent's data.", lower_bound=1)
_LR = flags.DEFINE_float("lr", 1e-5, "Peak learning rate.")
_WARMUP = flags.DEFINE_float("warmup_frac", 0.03, "Warmup fraction of each agent's steps.")
_WD = flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.")
_CLIP = flags.DEFINE_float("clip_norm", 1.0, "Per-agent gradient clipping norm.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per microbatch per agent.", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq_len", 1024, "Row length in tokens.", lower_bound=2)
_ACCUM = flags.DEFINE_integer("grad_accum", 1, "Microbatches per step.", lower_bound=1)
_PACK = flags.DEFINE_bool("pack", True, "Pack several examples per row.")
_SEED = flags.DEFINE_integer("seed", 0, "Data order seed.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots", "dots_no_batch"],
                           "Rematerialisation policy.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training checkpoints (resume from here).")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 100, "Steps between training checkpoints.",
                                   lower_bound=1)
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "LoRA rank (0: full finetuning).",
                                  lower_bound=0)
_LORA_ALPHA = flags.DEFINE_float("lora_alpha", None, "LoRA alpha (default 2 x rank).")
_LORA_TARGETS = flags.DEFINE_list("lora_targets", list(lora.TARGETS),
                                  "Projections that get adapters.")


def read_rows(path: str, tokenizer, eos_id: int) -> list[dict]:
  """Tokenised examples of one agent's JSONL file; errors name file and line.

  Optional per-row fields: "add_special_tokens" (default true; false for a
  prompt already rendered through a chat template, which holds its own BOS)
  and "append_eos" (default true; false for a completion cut at a length
  limit, which did not end).
  """
  examples = []
  for lineno, row in read_jsonl(path):
    where = f"{path}:{lineno}"
    prompt, completion = require(row, "prompt", where), require(row, "completion", where)
    special = row.get("add_special_tokens", True)
    append_eos = row.get("append_eos", True)
    for name, value in (("add_special_tokens", special), ("append_eos", append_eos)):
      if not isinstance(value, bool):
        raise ValueError(f"{where}: field {name!r} must be true or false")
    examples.append({"prompt_ids": tokenizer.encode(prompt, add_special_tokens=special),
                     "completion_ids": tokenizer.encode(completion, add_special_tokens=False)
                     + ([eos_id] if append_eos else [])})
  return examples


def pipelines(examples, agent_seeds, pad_id):
  """One SFT iterator per agent (None for an agent without data)."""
  return [data.sft_batches(ex, batch_size=_BATCH.value, seq_len=_SEQ.value, seed=seed,
                           pad_id=pad_id, pack=_PACK.value, num_epochs=_EPOCHS.value)
          if ex else None for ex, seed in zip(examples, agent_seeds)]


def main(argv):
  del argv
  meta = checkpoint.read_meta(_CHECKPOINT.value)
  if len(_DATA.value) != meta.num_agents:
    raise app.UsageError(f"--data lists {len(_DATA.value)} files for a population of "
                         f"{meta.num_agents} agents: give one (possibly empty) file per agent")
  from maft_jax.tokenizer import Tokenizer
  tok = Tokenizer(checkpoint.tokenizer_dir(_CHECKPOINT.value))
  if tok.eos_id is None:
    raise app.UsageError(f"{_CHECKPOINT.value}: the tokenizer has no EOS token to end completions")
  pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id
  examples = [read_rows(path, tok, tok.eos_id) for path in _DATA.value]
  seeds = [_SEED.value * 1000 + a for a in range(meta.num_agents)]

  # Each agent's schedule length: its own number of steps over all epochs.
  counts = [sum(1 for _ in it) if it else 0 for it in pipelines(examples, seeds, pad_id)]
  total_steps = [-(-c // _ACCUM.value) for c in counts]
  num_steps = max(total_steps) if total_steps else 0
  logging.info("examples per agent %s -> steps per agent %s", [len(e) for e in examples],
               total_steps)

  pop, meta = checkpoint.load_population(_CHECKPOINT.value, dtype=_DTYPE.value,
                                         remat=_REMAT.value)
  cfg = meta.cfg
  h = finetune.Hyper(learning_rate=_LR.value, warmup_frac=_WARMUP.value,
                     weight_decay=_WD.value, clip_norm=_CLIP.value)
  base, lcfg = None, None
  if _LORA_RANK.value:
    lcfg = lora.LoraConfig(rank=_LORA_RANK.value, alpha=_LORA_ALPHA.value or 2.0 * _LORA_RANK.value,
                           targets=tuple(_LORA_TARGETS.value))
    base = population.select(pop, 0)
    same = jax.jit(lambda p: jnp.all(jnp.stack([jnp.all(x == x[:1])
                                                for x in jax.tree.leaves(p)])))(pop)
    if not bool(same):
      raise app.UsageError(f"--lora_rank: the agents of {_CHECKPOINT.value} differ; LoRA trains "
                           "per-agent adapters on one shared base, so it needs a population of "
                           "identical agents (e.g. fresh from launch.import_hf)")
    del pop
    trainable = lora.init(cfg, lcfg, jax.random.key(_SEED.value), meta.num_agents)
    logging.info("LoRA rank %d alpha %g on %s: %s adapter parameters per agent", lcfg.rank,
                 lcfg.alpha, ",".join(lcfg.targets), f"{lora.count(trainable) // meta.num_agents:,}")
  else:
    trainable = pop
  state = finetune.init_state(trainable, h, total_steps)
  scale = lcfg.scale if lcfg else 1.0
  # What a resumed run must share with the saved one (schedule, data, shapes).
  run_config = {"data": list(_DATA.value), "epochs": _EPOCHS.value, "lr": _LR.value,
                "warmup_frac": _WARMUP.value, "weight_decay": _WD.value,
                "clip_norm": _CLIP.value, "batch_size": _BATCH.value, "seq_len": _SEQ.value,
                "grad_accum": _ACCUM.value, "pack": _PACK.value, "seed": _SEED.value,
                "lora": dataclasses.asdict(lcfg) if lcfg else None,
                "total_steps": [int(t) for t in total_steps]}
  run_config = json.loads(json.dumps(run_config))  # as it reads back from JSON
  its = pipelines(examples, seeds, pad_id)
  start = 0
  ckpts = checkpoint.TrainCheckpoints(_WORKDIR.value) if _WORKDIR.value else None
  if ckpts is not None and ckpts.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    state, extra = ckpts.restore(abstract)
    if extra.get("run") != run_config:
      raise app.UsageError(
          f"--workdir={_WORKDIR.value} holds a run with different settings "
          f"({extra.get('run')}); this command asks for {run_config}. Use another workdir "
          "or the same flags.")
    start = int(extra["step"])
    for it, st in zip(its, extra["data"]):
      if it is not None:
        it.set_state(st)
    logging.info("resumed from %s at step %d", _WORKDIR.value, start)

  empty = {k: np.zeros((_BATCH.value, _SEQ.value), np.int32)
           for k in ("tokens_BxT", "loss_mask_BxT", "segment_ids_BxT", "positions_BxT")}

  def next_micro(it):
    if it is None:
      return empty
    try:
      return next(it)
    except StopIteration:
      return empty

  t0, tokens_done = time.perf_counter(), 0
  try:
    for step in range(start, num_steps):
      micro = [[next_micro(it) for _ in range(_ACCUM.value)] for it in its]
      batch = {k: jnp.asarray(np.stack([np.stack([m[k] for m in agent]) for agent in micro]))
               for k in empty}
      state, metrics = finetune.train_step(state, batch, base, cfg=cfg, h=h, lora_scale=scale)
      finetune.check_finite(metrics, step)
      tokens_done += int(np.asarray(metrics["tokens"]).sum())
      rate = tokens_done / max(time.perf_counter() - t0, 1e-9)
      losses = " ".join(f"{l:.3f}" if u else "-" for l, u in
                        zip(np.asarray(metrics["loss"]).tolist(), np.asarray(metrics["updated"])))
      sys.stderr.write(f"\rstep {step + 1}/{num_steps} loss [{losses}] {rate:,.0f} tok/s")
      sys.stderr.flush()
      if ckpts is not None and ((step + 1) % _SAVE_EVERY.value == 0 or step + 1 == num_steps):
        ckpts.save(step + 1, state, {"step": step + 1, "run": run_config,
                                     "data": [it.get_state() if it else None for it in its]})
  finally:
    # Let an in-flight asynchronous save of the last good state finish, also
    # when a step fails (e.g. a non-finite loss).
    if ckpts is not None:
      ckpts.close()
  sys.stderr.write("\n")
  params = state["params"] if lcfg is None else lora.merge_population(base, state["params"], lcfg)
  out = checkpoint.save_population(_OUT.value, params, cfg=cfg,
                                   hf_config=meta.hf_config, source_dtype=meta.source_dtype,
                                   tokenizer_from=checkpoint.tokenizer_dir(_CHECKPOINT.value))
  print(f"wrote {out}: {meta.num_agents} agents, steps per agent "
        f"{np.asarray(state['step']).tolist()}")


if __name__ == "__main__":
  app.run(main)
