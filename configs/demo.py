r"""The embedded demo: MAFT on the built-in arithmetic task with a tiny model
the project builds itself, on CPU, in minutes. No downloads.

    make demo        # = python -m launch.train --config=configs/demo.py --workdir=runs/demo

The first run builds the base in WORKDIR/demo_base (a byte-level BPE
tokenizer and a tiny Llama, warm-started briefly on solved problems of
another seed stream, deliberately weak) and reuses it afterwards. Then
`iterations` rounds of debate -> consensus -> per-agent selection ->
finetuning -> held-out evaluation, printing the per-iteration table.

Variants (after the colon, comma-separated; a method name from
configs/methods.py selects a baseline through the same code):

    configs/demo.py:smoke                 minimal sizes, for tests (seconds per stage)
    configs/demo.py:star                  STaR on the same base, for comparison
    configs/demo.py:smoke,no_critic       combinations work too
"""

import ml_collections

from configs import methods
from maft_jax import config as run_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = methods.parse(arg, variant="full", method="maft")
  if a["variant"] not in ("full", "smoke"):
    raise ValueError(f"variant={a['variant']!r}; variants: full, smoke")
  smoke = a["variant"] == "smoke"
  c = run_config.default_config()
  c.name = "demo-smoke" if smoke else "demo"
  c.seed = 0
  c.iterations = 2 if smoke else 3
  c.model.source = "demo"
  c.model.demo_preset = "smoke" if smoke else "full"
  c.model.dtype, c.model.remat = "float32", "none"
  c.task.name = "arithmetic"
  c.task.options = ml_collections.ConfigDict({"size": 4000, "seed": 0, "max_value": 3})
  c.task.train_size = 8 if smoke else 128
  # smoke: as many held-out problems as training ones, so that evaluation
  # samples with the debate's compiled programs (the same batch shapes).
  c.task.test_size = 8 if smoke else 96
  c.agents.generators, c.agents.critics = (2, True) if smoke else (3, True)
  new_tokens = 12 if smoke else 56  # the longest solution: 50 tokens + EOS
  c.debate.rounds, c.debate.max_new_tokens, c.debate.batch_size = 2, new_tokens, 64
  c.debate.temperature, c.debate.top_p = 0.8, 1.0
  c.eval.rounds, c.eval.max_new_tokens, c.eval.batch_size = 2, new_tokens, 96
  c.eval.temperature, c.eval.top_p = 0.8, 1.0
  c.eval.nll_batch, c.eval.nll_problems = (8, 0) if smoke else (16, 16)
  c.selection.mode = "paper"
  c.finetune.epochs, c.finetune.learning_rate, c.finetune.warmup_frac = 2, 3e-4, 0.03
  c.finetune.batch_size, c.finetune.seq_len, c.finetune.save_every = 8, 384, 50
  return methods.apply(c, a["method"])
