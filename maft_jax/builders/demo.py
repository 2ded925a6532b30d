"""The demo's base model: a tiny Llama the project builds and trains itself, on CPU.

`make demo` runs Multiagent Finetuning end to end without downloading
anything, so its base model is made here: a byte-level BPE tokenizer (digits
and punctuation always single tokens), a randomly initialised Llama, and a
short supervised warm start on arithmetic problems in exactly the prompt
formats the debate uses: round-1 prompts, and debate-round prompts showing the
agent's own and the other agents' solutions, some with wrong steps.

The base is deliberately weak but not useless, because that is where MAFT
has something to add: single samples are right only part of the time and
their errors differ from sample to sample, so the majority of a few samples
beats one and answers that agree with it are better data than single
samples. Two things make it so: the warm start is short (under two minutes of CPU), and its
round-1 completions slip now and then (`step_noise`: a step's result is off,
later steps carry the wrong value on). Debate-round completions are correct
(`debate_noise` 0): a critic learns to answer right from mixed advice.
Warm-start problems come from their own seed stream (`corpus_seed`), not the
task's, so held-out evaluation never sees memorised problems.

The result is a plain Hugging Face model directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json), written to `out_dir + '.partial'` and renamed into
place, plus `demo.json`: the settings it was built from (a later call with
the same settings reuses the directory, other settings rebuild it), the
warm-start losses and timings.

Measured on a 2-core CPU (max_value=3, the demo's defaults, 2026-11-29):
the build takes ~100 s (1800 round-1 rows and 1200 debate-round rows, ~630k
tokens; 384-token rows, where the attention's [heads, T, T] scores cost as
much as the matmuls). Sampling at T=0.8 on the demo's 96 held-out problems,
one sample is right on ~60% and the majority of three on ~67%; critics
answering the debate prompt on ~36% (they must find operands ~300 tokens
back), so the final round's consensus is right on ~44%, yet the round-1
responses that agree with it are right ~89% of the time: better data than
the base's own samples, which is what MAFT needs. The build sits near a
threshold (copying operands is learned late in the run): with 400 debate
rows critics were right on ~20% and consensus was noise (accuracy fell over
iterations); with 1200 round-1 rows instead of 1800 one sample was right on
~16%. Another jax version may land elsewhere. Solutions take at most 50
tokens + EOS at max_value=3; a round-1 prompt is 63 tokens, a debate prompt
with two others ~315. XLA's fast-compile flags
(`--xla_backend_optimization_level=0`, used by the tests) halve compile time
but double step time: they make this build ~2x slower (the smoke build,
compile-bound, ~20% faster).
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
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from maft_jax import checks, data, files, finetune, hf, model, population, sft
from maft_jax.tasks import arithmetic, prompts
from maft_jax.tokenizer import Tokenizer

FORMAT_VERSION = 1  # bump when the corpus or build changes what a setting means
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
INFO_FILE = "demo.json"
DEFAULT_MAX_VALUE = 30                 # arithmetic's own default
NUM_STEPS = 5                          # steps of a+b*c+d-e*f in a solution
ERROR_DELTAS = (-10, -2, -1, 1, 2, 10)  # slips of a noisy step


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSettings:
  """Sizes of the tiny model and its warm start. Defaults: the demo; `smoke()`: tests."""
  vocab_size: int = 448         # BPE target: 256 bytes + 3 special + merges (~413 suffice)
  hidden_size: int = 96
  intermediate_size: int = 288
  num_layers: int = 2
  num_heads: int = 8            # many small heads: copying operands over long debate prompts
  num_kv_heads: int = 8
  max_position_embeddings: int = 1024
  round1_rows: int = 1800       # warm-start rows answering a round-1 prompt
  debate_rows: int = 1200       # warm-start rows answering a debate-round prompt
  num_others: int = 2           # other agents' solutions shown in a debate row
  step_noise: float = 0.08      # chance each step of a round-1 completion slips
  debate_noise: float = 0.0     # the same for debate-round completions
  shown_noise: float = 0.12     # the same for the solutions a debate row shows
  batch_tokens: int = 768       # tokens per step (rows per step = batch_tokens // seq_len)
  learning_rate: float = 2e-3
  corpus_seed: int = 1000       # arithmetic seed stream of the warm start (not the task's)
  seed: int = 2                 # model init and data order (see the module docstring)

  @classmethod
  def preset(cls, name: str) -> "DemoSettings":
    """`config.model.demo_preset`: 'full' (the demo) or 'smoke' (tests)."""
    checks.check(name in ("full", "smoke"), "demo_preset", name, "must be full or smoke")
    return cls.smoke() if name == "smoke" else cls()

  @classmethod
  def smoke(cls) -> "DemoSettings":
    """Tiny everything, for tests: seconds to build, accuracy irrelevant."""
    return cls(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
               num_kv_heads=2, max_position_embeddings=512, round1_rows=32, debate_rows=8)


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


def _row(s: DemoSettings, index: int, max_value: int, debate: bool) -> dict[str, str]:
  """Warm-start row `index`: problem `index` of the corpus stream."""
  problem = arithmetic.make_problem(s.corpus_seed, index, max_value)
  operands = problem.fields["operands"]
  rng = np.random.default_rng([s.corpus_seed, index, 1])
  if debate:
    shown = [noisy_solution(operands, rng, s.shown_noise) for _ in range(s.num_others + 1)]
    msgs, noise = prompts.debate_round(problem, own=shown[0], others=shown[1:]), s.debate_noise
  else:
    msgs, noise = prompts.round1(problem), s.step_noise
  return {"prompt": prompts.to_text(msgs, None)[0],
          "completion": noisy_solution(operands, rng, noise)}


def corpus_rows(s: DemoSettings, max_value: int) -> list[dict[str, str]]:
  """{"prompt", "completion"} rows: `round1_rows` round-1 rows, then
  `debate_rows` debate-round rows showing `num_others` + 1 solutions with
  per-step noise `shown_noise`. Completions slip with per-step noise
  `step_noise` (round 1) and `debate_noise` (debate rounds). Every row is its
  own problem of the `corpus_seed` stream."""
  return [_row(s, i, max_value, debate=i >= s.round1_rows)
          for i in range(s.round1_rows + s.debate_rows)]


# ----------------------------------------------------------------------------
# Tokenizer.


def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str, *,
                    model_max_length: int) -> RawTokenizer:
  """Byte-level BPE (lossless), <s> prepended, no chat template; written as
  tokenizer.json + tokenizer_config.json (+ generation_config.json).

  Digits and punctuation are always single tokens: digits so arithmetic is
  learnable, punctuation so that text cut at any brace (the `\\boxed{}` stop)
  re-encodes to the very tokens that were sampled (no merges like '}.' or '{-')."""
  tok = RawTokenizer(models.BPE())
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
            "pad_token": PAD, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
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


def init_params(cfg: model.ModelConfig, seed: int, *, init_std: float = 0.02) -> model.Params:
  """`model.init_params`'s distribution (normal(0, init_std) matrices, unit
  norms; a Llama has no biases), drawn with NumPy: compiling the jitted
  initialiser takes ~6 s of this build's CPU budget, drawing ~0.3M numbers none."""
  rng = np.random.default_rng(seed)

  def leaf(path, shape):
    if str(path[-1].key).endswith("norm"):
      return np.ones(shape.shape, np.float32)
    return (init_std * rng.standard_normal(shape.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, model.param_shapes(cfg))


def _seq_len(lengths: Sequence[int]) -> int:
  """Rows as long as the longest example, rounded up to a multiple of 32."""
  return -(-max(lengths) // 32) * 32


def _eval_batch(examples: Sequence[Mapping[str, Any]], seq_len: int, pad_id: int):
  """One fixed [1, b, T] batch of warm-start rows (agent axis first): the
  before/after losses recorded in demo.json."""
  it = data.sft_batches(examples, batch_size=8, seq_len=seq_len, seed=0, pad_id=pad_id,
                        num_epochs=1)
  return {k: jnp.asarray(v)[None] for k, v in next(it).items()}


def _train(pop, examples: Sequence[Mapping[str, Any]], seq_len: int, cfg: model.ModelConfig,
           s: DemoSettings, pad_id: int, log: Callable[[str], None], progress: bool
           ) -> sft.Result:
  """One epoch over `examples`, packed into `batch_tokens`-token steps; Adam
  with b2=0.95 (a short run: the second moment must follow the loss quickly)."""
  settings = sft.Settings(
      hyper=finetune.Hyper(learning_rate=s.learning_rate, warmup_frac=0.05, b2=0.95),
      epochs=1, batch_size=max(1, s.batch_tokens // seq_len), seq_len=seq_len, seed=s.seed)
  return sft.run(pop, [examples], cfg=cfg, settings=settings, pad_id=pad_id, progress=progress,
                 log=log)


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
               log: Callable[[str], None] = logging.info, progress: bool = False) -> str:
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
  tok_raw = train_tokenizer([r["prompt"] + r["completion"] for r in rows], s.vocab_size, partial,
                            model_max_length=s.max_position_embeddings)
  tok = Tokenizer(partial)  # read back exactly as the demo will load it
  special = {name: tok_raw.token_to_id(name) for name in (PAD, BOS, EOS)}
  config = hf_config(s, tok.vocab_size, special)
  cfg = hf.config_from_hf(config, dtype="float32", param_dtype="float32")
  examples = sft.tokenize_rows(rows, tok, where=lambda i: f"demo warm-start row {i}")
  lengths = [len(e["prompt_ids"]) + len(e["completion_ids"]) for e in examples]
  seq_len = _seq_len(lengths)
  log(f"demo base: warm start on {len(rows)} rows, {sum(lengths):,} tokens (longest "
      f"{max(lengths)}), vocab {tok.vocab_size}, "
      f"{model.count_params(model.param_shapes(cfg)):,} parameters")
  t_data = time.perf_counter() - t0

  pop = population.replicate(init_params(cfg, s.seed), 1)
  eval_batch = _eval_batch(examples, seq_len, special[PAD])
  loss_before = float(finetune.eval_loss(pop, eval_batch, cfg=cfg)[0])
  result = _train(pop, examples, seq_len, cfg, s, special[PAD], log, progress)
  pop = result.params
  loss_after = float(finetune.eval_loss(pop, eval_batch, cfg=cfg)[0])
  log(f"demo base: warm start {result.steps[0]} steps in {result.seconds:.1f}s, loss "
      f"{loss_before:.3f} -> {loss_after:.3f}")

  hf.save(partial, population.select(pop, 0), cfg, config, dtype="float32")
  info = dict(identity, loss_before=loss_before, loss_after=loss_after, steps=result.steps[0],
              seq_len=seq_len, longest_row=max(lengths),
              seconds={"data": round(t_data, 2), "train": round(result.seconds, 2),
                       "total": round(time.perf_counter() - t0, 2)})
  files.write_json(os.path.join(partial, INFO_FILE), info, indent=2)
  files.commit_dir(partial, out_dir)
  log(f"demo base: built {out_dir} in {time.perf_counter() - t0:.1f}s")
  return out_dir


# ----------------------------------------------------------------------------- builder

def build(out_dir: str, preset: str, *, task_options: dict,
          log: Callable[[str], None] = logging.info, progress: bool = False) -> str:
  """The builder entry point (`maft_jax.builders`): `build_base` of a preset."""
  return build_base(out_dir, DemoSettings.preset(preset), task_options=task_options, log=log,
                    progress=progress)


def architecture(preset: str) -> dict[str, Any]:
  """config.json of a preset without building it: the vocabulary is at most
  the BPE target, rounded as the build rounds it."""
  s = DemoSettings.preset(preset)
  return hf_config(s, s.vocab_size, {PAD: 0, BOS: 1, EOS: 2})
