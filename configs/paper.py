r"""The paper's experiments: Phi-3-mini, Mistral-7B-Instruct-v0.2 or Llama-3-8B
on arithmetic, GSM8K or MATH with N=3 generators + 3 critics, M=2 debate
rounds and L=5 iterations (Subramaniam et al., ICLR 2025), and the baselines.

    python -m launch.train --workdir=runs/llama3-gsm8k \
        --config=configs/paper.py:model=llama3,task=gsm8k \
        --config.model.path=/models/Meta-Llama-3-8B-Instruct \
        --config.task.options.path=/data/gsm8k/train.jsonl

Arguments after the colon (comma-separated):
  model=phi3|mistral|llama3          which base (a local HF directory: --config.model.path)
  task=arithmetic|gsm8k|math         gsm8k/math read --config.task.options.path
                                     (GSM8K JSONL/Parquet with question/answer; MATH JSONL
                                     with problem/solution/level/type)
  method=maft|no_critic|five_agents|summarize|ground_truth|cross_agent|
         star|single_agent|majority_ft|base  (see configs/methods.py); a bare method
                                     name works too: configs/paper.py:model=phi3,single_agent

Where each setting comes from (paper: Subramaniam et al., ICLR 2025, arXiv
2501.05707; code: github.com/vsubramaniam851/multiagent-ft, files named):
  N=3 generators + 3 critics, M=2 rounds, L=5 iterations     paper
  500 problems, from a seeded shuffle of the source          paper; code original_gen.py
                                                             (random.seed(0), shuffle,
                                                             first 500)
  + 500 held-out problems, disjoint by id (the held-out      ours (see below)
    ones come first in the shuffle, then the training ones)
  MATH: levels 1-3 of the MATH test split                    code original_gen.py
  sampling T=1.0, top-p 0.9                                  code original_gen.py,
                                                             ft_gen.py (defaults)
  finetuning: 2 epochs, lr 1e-5, cosine, 3% warmup, weight   code lm_ft/ft.sh
  decay 0
  selection: consensus of the final round; generators on     paper
  their agreeing round-1 answers, critics on corrected and
  kept-right transcripts (w=0.5)
Two differences from the official code, on purpose: it evaluates on its
training problems and drops problems without an answer; we evaluate on a
disjoint held-out split and count an unanswered problem as wrong.

Full finetuning of 6 agents of an 8B model needs a pod slice (see README,
"Running on a pod") or LoRA on one card: configs/paper.py:model=llama3,lora=16
(one frozen base, rank-16 adapters per agent, sampling batches of 8 and
finetuning microbatches of 1 x 16 accumulated: the same 16 rows per step;
`launch.train --dry_run` plans it at ~76 GB on an 80 GB device). Then: python -m launch.report --workdir=DIR
"""

import ml_collections
from ml_collections import config_dict

from configs import methods
from maft_jax import config as run_config

MODELS = {"phi3": "Phi-3-mini-4k-instruct", "mistral": "Mistral-7B-Instruct-v0.2",
          "llama3": "Meta-Llama-3-8B-Instruct"}
TASKS = ("arithmetic", "gsm8k", "math")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = methods.parse(arg, model="llama3", task="gsm8k", method="maft", lora="0")
  if a["model"] not in MODELS:
    raise ValueError(f"model={a['model']!r}; models: {', '.join(MODELS)}")
  if a["task"] not in TASKS:
    raise ValueError(f"task={a['task']!r}; tasks: {', '.join(TASKS)}")
  c = run_config.default_config()
  c.name = f"{a['model']}-{a['task']}"
  c.model.source = "hf"           # --config.model.path=/models/<HF directory>
  c.model.dtype, c.model.remat = "bfloat16", "full"
  c.task.name = a["task"]
  if a["task"] == "arithmetic":
    c.task.options = ml_collections.ConfigDict({"size": 2000, "seed": 0, "split_seed": 0})
  elif a["task"] == "math":  # --config.task.options.path=<MATH test split as JSONL>
    c.task.options = ml_collections.ConfigDict({"path": config_dict.placeholder(str),
                                                "levels": "1,2,3", "split_seed": 0})
  else:
    c.task.options = ml_collections.ConfigDict({"path": config_dict.placeholder(str),
                                                "split_seed": 0})
  c.task.train_size, c.task.test_size = 500, 500
  c.iterations = 5
  c.agents.generators, c.agents.critics = 3, True
  new_tokens = 256 if a["task"] == "arithmetic" else 512
  c.debate.rounds, c.debate.max_new_tokens, c.debate.batch_size = 2, new_tokens, 64
  c.debate.temperature, c.debate.top_p = 1.0, 0.9
  c.eval.rounds, c.eval.max_new_tokens, c.eval.batch_size = 2, new_tokens, 64
  c.eval.temperature, c.eval.top_p = 1.0, 0.9
  # Paper finetuning defaults: lr 1e-5, 3% warmup, no weight decay, 2 epochs.
  c.finetune.epochs, c.finetune.learning_rate, c.finetune.warmup_frac = 2, 1e-5, 0.03
  c.finetune.batch_size, c.finetune.grad_accum, c.finetune.seq_len = 4, 4, 2048
  c.selection.mode, c.selection.critic_weight = "paper", 0.5
  if int(a["lora"]):  # one 80 GB card: one base + adapters, smaller batches, same step
    c.finetune.lora_rank = int(a["lora"])
    c.debate.batch_size = c.eval.batch_size = 8
    c.finetune.batch_size, c.finetune.grad_accum = 1, 16
  return methods.apply(c, a["method"])
