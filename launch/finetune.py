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

With --lora_rank=R, a full population's agents (which must be identical: one
base) share one frozen copy of the base and train fresh per-agent adapters
(--lora_alpha, --lora_targets), merged into full weights in --out; a LoRA
checkpoint's adapters train further and --out is a LoRA checkpoint again
(over the same base).
"""

from absl import app, flags

from maft_jax import checkpoint, finetune, lora, sft
from maft_jax.tasks.base import read_jsonl

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


def read_rows(path: str, tokenizer) -> list[dict]:
  """Tokenised examples of one agent's JSONL file; errors name file and line."""
  lines, rows = [], []
  for lineno, row in read_jsonl(path):
    lines.append(lineno)
    rows.append(row)
  return sft.tokenize_rows(rows, tokenizer, where=lambda i: f"{path}:{lines[i]}")


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
  try:
    examples = [read_rows(path, tok) for path in _DATA.value]
  except ValueError as e:  # a malformed line: its file and line, not a traceback
    raise SystemExit(f"error: {e}") from None
  pop, meta = checkpoint.load_population(_CHECKPOINT.value, dtype=_DTYPE.value,
                                         remat=_REMAT.value)
  lcfg = None
  if _LORA_RANK.value:
    lcfg = lora.LoraConfig(rank=_LORA_RANK.value, alpha=_LORA_ALPHA.value or 2.0 * _LORA_RANK.value,
                           targets=tuple(_LORA_TARGETS.value))
  settings = sft.Settings(
      hyper=finetune.Hyper(learning_rate=_LR.value, warmup_frac=_WARMUP.value,
                           weight_decay=_WD.value, clip_norm=_CLIP.value),
      epochs=_EPOCHS.value, batch_size=_BATCH.value, seq_len=_SEQ.value,
      grad_accum=_ACCUM.value, pack=_PACK.value, seed=_SEED.value, save_every=_SAVE_EVERY.value,
      lora=lcfg)
  try:
    result = sft.run(pop, examples, cfg=meta.cfg, settings=settings, pad_id=pad_id,
                     workdir=_WORKDIR.value, run_id={"data": list(_DATA.value)})
  except ValueError as e:  # bad rows, a changed resume, LoRA on differing agents
    raise SystemExit(f"error: {e}") from None
  out = checkpoint.save_population(_OUT.value, result.params, cfg=meta.cfg,
                                   hf_config=meta.hf_config, source_dtype=meta.source_dtype,
                                   tokenizer_from=checkpoint.tokenizer_dir(_CHECKPOINT.value),
                                   # adapters trained further keep the input's base reference
                                   base_ref=meta.base_ref if meta.lora else None)
  print(f"wrote {out}: {meta.num_agents} agents, steps per agent {result.steps}")


if __name__ == "__main__":
  app.run(main)
