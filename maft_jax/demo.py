"""The demo's base model: a tiny Llama the project trains itself, on CPU.

`make demo` runs Multiagent Finetuning end to end without downloading
anything, so the base model is built here: a byte-level BPE tokenizer (digits
always single tokens, so arithmetic is learnable), a randomly initialised
Llama-architecture model, and a short supervised warm start on solved
arithmetic problems in exactly the prompt formats the debate uses (round 1
and debate rounds with other agents' solutions, some of them wrong).

The warm start is deliberately short: the base must be weak but not useless
(a fraction of samples right, majority votes of samples better than single
samples), because that is the regime where MAFT's consensus-filtered
self-training has something to add. Warm-start problems come from their own
seed stream (`corpus_seed`), never the task's, so the demo's held-out
evaluation is not memorised.

The directory is a plain Hugging Face model directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), written to
`out_dir + '.partial'` and renamed into place, with a `demo.json` recording
the settings it was built with (and the warm-start losses): a later call with
the same settings reuses it, other settings rebuild it.
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
import jax.numpy as jnp
import numpy as np

from maft_jax import data, finetune, hf, model, population, sft
from maft_jax.tasks import arithmetic, prompts
from maft_jax.tasks.base import Problem

FORMAT_VERSION = 1  # bump when the corpus or build changes what a setting means
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
INFO_FILE = "demo.json"
DEFAULT_MAX_VALUE = 30                 # arithmetic's own default
NUM_STEPS = 5                          # steps of a+b*c+d-e*f in a solution
ERROR_DELTAS = (-10, -2, -1, 1, 2, 10)  # slips of a noisy step


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSettings:
  """Sizes of the tiny model and its warm start. Defaults: the demo; `smoke()`: tests."""
  vocab_size: int = 448         # BPE target (256 bytes + merges + 3 special tokens)
  hidden_size: int = 96
  intermediate_size: int = 288
  num_layers: int = 2
  num_heads: int = 8            # many small heads: copying operands over long debate prompts
  num_kv_heads: int = 8
  max_position_embeddings: int = 1024
  round1_rows: int = 2000       # warm-start rows answering a round-1 prompt
  debate_rows: int = 600        # warm-start rows answering a debate-round prompt
  num_others: int = 2           # other agents' solutions shown in a debate row
  step_noise: float = 0.08      # chance each step of a round-1 completion slips
  debate_noise: float = 0.0     # the same for debate-round completions
  shown_noise: float = 0.12     # the same for the solutions a debate row shows
  epochs: int = 1
  batch_size: int = 2
  seq_len: int = 384
  learning_rate: float = 2e-3
  corpus_seed: int = 1000       # arithmetic seed stream of the warm start (not the task's)
  seed: int = 0                 # model init and data order

  @classmethod
  def smoke(cls) -> "DemoSettings":
    """Tiny everything, for tests: seconds to build, accuracy irrelevant."""
    return cls(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
               num_kv_heads=2, max_position_embeddings=512, round1_rows=48, debate_rows=16,
               batch_size=4)


# ----------------------------------------------------------------------------
# Solutions: the short step-by-step format the base learns.


def _steps(operands: Sequence[int], errors: Mapping[int, int] | None = None
           ) -> list[tuple[str, int]]:
  """[(left side, result)] of a+b*c+d-e*f. `errors` maps a step index (0..4)
  to a delta added to that step's result; later steps carry the wrong value on
  correctly, as a solver that slipped once would."""
  a, b, c, d, e, f = operands
  errors = errors or {}
  out: list[tuple[str, int]] = []

  def step(lhs: str, value: int) -> int:
    value += errors.get(len(out), 0)
    out.append((lhs, value))
    return value

  p1 = step(f"{b}*{c}", b * c)
  p2 = step(f"{e}*{f}", e * f)
  s1 = step(f"{a}+{p1}", a + p1)
  s2 = step(f"{s1}+{d}", s1 + d)
  step(f"{s2}-{p2}", s2 - p2)
  return out


def solution(operands: Sequence[int], errors: Mapping[int, int] | None = None) -> str:
  """E.g. ' 3*4=12. 5*6=30. 1+12=13. 13+7=20. 20-30=-10. The answer is \\boxed{-10}'.

  The leading space follows the prompt's 'Answer:' as sampled text does; the
  text ends at the box's closing brace, exactly where sampling with
  `stop_after_boxed` cuts it, so the base's own (cut) answers used as
  finetuning data end the way its warm-start data did."""
  steps = _steps(operands, errors)
  body = " ".join(f"{lhs}={value}." for lhs, value in steps)
  return f" {body} The answer is \\boxed{{{steps[-1][1]}}}"


def noisy_solution(operands: Sequence[int], rng: np.random.Generator, step_noise: float) -> str:
  """A solution whose every step independently slips with probability `step_noise`."""
  errors = {k: int(rng.choice(ERROR_DELTAS)) for k in range(NUM_STEPS) if rng.random() < step_noise}
  return solution(operands, errors)


# ----------------------------------------------------------------------------
# Warm-start corpus.


def corpus_rows(s: DemoSettings, max_value: int) -> list[dict[str, str]]:
  """{"prompt", "completion"} rows: `round1_rows` round-1 rows, then
  `debate_rows` debate-round rows showing `num_others` + 1 solutions with
  per-step noise `shown_noise`. Completions are solutions with per-step noise
  `step_noise` (round 1) and `debate_noise` (debate rounds)."""
  rows = []
  for i in range(s.round1_rows + s.debate_rows):
    problem = arithmetic.make_problem(s.corpus_seed, i, max_value)
    operands = problem.fields["operands"]
    rng = np.random.default_rng([s.corpus_seed, i, 1])
    if i < s.round1_rows:
      msgs, noise = prompts.round1(problem), s.step_noise
    else:
      shown = [noisy_solution(operands, rng, s.shown_noise) for _ in range(s.num_others + 1)]
      msgs, noise = prompts.debate_round(problem, own=shown[0], others=shown[1:]), s.debate_noise
    rows.append({"prompt": prompts.to_text(msgs, None)[0],
                 "completion": noisy_solution(operands, rng, noise)})
  return rows


# ----------------------------------------------------------------------------
# Tokenizer.


def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str):
  """Byte-level BPE (lossless), <s> prepended, no chat template; written as
  tokenizer.json + tokenizer_config.json (+ generation_config.json).

  Digits and punctuation are always single tokens: digits so arithmetic is
  learnable, punctuation so that text cut at any brace (the `\\boxed{}` stop)
  re-encodes to the very tokens that were sampled (no merges like '}.' or '{-')."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.Punctuation(behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "pad_token": PAD, "model_max_length": 1024, "clean_up_tokenization_spaces": False}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  ids = {name: tok.token_to_id(name) for name in (PAD, BOS, EOS)}
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]}, f)
  return tok


# ----------------------------------------------------------------------------
# Model.


def hf_config(s: DemoSettings, vocab_size: int, special: Mapping[str, int]) -> dict[str, Any]:
  """config.json of the tiny Llama; vocab rounded up to a multiple of 32."""
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": -(-vocab_size // 32) * 32, "hidden_size": s.hidden_size,
      "intermediate_size": s.intermediate_size, "num_hidden_layers": s.num_layers,
      "num_attention_heads": s.num_heads, "num_key_value_heads": s.num_kv_heads,
      "max_position_embeddings": s.max_position_embeddings, "rms_norm_eps": 1e-5,
      "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
      "bos_token_id": special[BOS], "eos_token_id": special[EOS], "pad_token_id": special[PAD],
      "torch_dtype": "float32"}


def _eval_batch(examples: Sequence[Mapping[str, Any]], s: DemoSettings, pad_id: int):
  """One fixed [1, b, T] batch (agent axis first) for before/after losses."""
  it = data.sft_batches(examples, batch_size=s.batch_size, seq_len=s.seq_len, seed=0,
                        pad_id=pad_id, num_epochs=1)
  return {k: jnp.asarray(v)[None] for k, v in next(it).items()}


# ----------------------------------------------------------------------------
# The build.


def _max_value(task_options: Mapping[str, Any]) -> int:
  return int(task_options.get("max_value", DEFAULT_MAX_VALUE))


def _identity(s: DemoSettings, task_options: Mapping[str, Any]) -> dict[str, Any]:
  """What the build depends on: the settings and the task's operand range
  (other task options, e.g. its size or seed, do not change the base)."""
  return json.loads(json.dumps({"version": FORMAT_VERSION, "settings": dataclasses.asdict(s),
                                "max_value": _max_value(task_options)}))


def read_info(out_dir: str) -> dict[str, Any] | None:
  """demo.json of a built directory (None if absent or unreadable)."""
  try:
    with open(os.path.join(out_dir, INFO_FILE)) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def build_base(out_dir: str, s: DemoSettings, *, task_options: dict,
               log: Callable[[str], None] = logging.info) -> str:
  """Build (or reuse, if out_dir already holds one built with the same
  settings) a tiny HF model directory: config.json + model.safetensors +
  tokenizer.json + tokenizer_config.json, written atomically (out_dir +
  '.partial' then rename). demo.json records the settings, the warm-start
  losses (`loss_before`, `loss_after` on a fixed batch) and timings."""
  identity = _identity(s, task_options)
  info = read_info(out_dir)
  if info is not None and {k: info.get(k) for k in identity} == identity:
    log(f"demo base: reusing {out_dir}")
    return out_dir
  max_value = _max_value(task_options)
  t0 = time.perf_counter()
  partial = out_dir + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)

  rows = corpus_rows(s, max_value)
  tok_raw = train_tokenizer([r["prompt"] + r["completion"] for r in rows], s.vocab_size, partial)
  from maft_jax.tokenizer import Tokenizer  # reads back exactly what the demo will load
  tok = Tokenizer(partial)
  special = {name: tok_raw.token_to_id(name) for name in (PAD, BOS, EOS)}
  config = hf_config(s, tok.vocab_size, special)
  cfg = hf.config_from_hf(config, dtype="float32", param_dtype="float32")
  examples = sft.tokenize_rows(rows, tok, where=lambda i: f"demo warm-start row {i}")
  lengths = [len(e["prompt_ids"]) + len(e["completion_ids"]) for e in examples]
  log(f"demo base: {len(rows)} warm-start rows, {sum(lengths):,} tokens (longest {max(lengths)}), "
      f"vocab {tok.vocab_size}, {model.count_params(model.param_shapes(cfg)):,} parameters")
  t_data = time.perf_counter() - t0

  pop = population.replicate(model.init_params(cfg, jax.random.key(s.seed)), 1)
  eval_batch = _eval_batch(examples, s, special[PAD])
  loss_before = float(finetune.eval_loss(pop, eval_batch, cfg=cfg)[0])
  settings = sft.Settings(
      hyper=finetune.Hyper(learning_rate=s.learning_rate, warmup_frac=0.05, b2=0.95),
      epochs=s.epochs, batch_size=s.batch_size, seq_len=s.seq_len, seed=s.seed)
  result = sft.run(pop, [examples], cfg=cfg, settings=settings, pad_id=special[PAD],
                   progress=False, log=log)
  loss_after = float(finetune.eval_loss(result.params, eval_batch, cfg=cfg)[0])
  log(f"demo base: warm start {result.steps[0]} steps in {result.seconds:.1f}s, "
      f"loss {loss_before:.3f} -> {loss_after:.3f}")

  hf.save(partial, population.select(result.params, 0), cfg, config, dtype="float32")
  info = dict(identity, loss_before=loss_before, loss_after=loss_after,
              train_loss_final=result.final_loss[0], steps=result.steps[0],
              seconds={"data": round(t_data, 2), "train": round(result.seconds, 2),
                       "total": round(time.perf_counter() - t0, 2)})
  with open(os.path.join(partial, INFO_FILE), "w") as f:
    json.dump(info, f, indent=2)
  _replace(partial, out_dir)
  log(f"demo base: built {out_dir} in {time.perf_counter() - t0:.1f}s")
  return out_dir


def _replace(src: str, dst: str):
  """Move the finished `src` into place at `dst`, removing an older `dst`."""
  old = dst + ".old"
  shutil.rmtree(old, ignore_errors=True)
  if os.path.exists(dst):
    os.rename(dst, old)
  os.rename(src, dst)
  shutil.rmtree(old, ignore_errors=True)
