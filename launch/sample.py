r"""Sample completions from every agent of a population.

    python -m launch.sample (--hf_dir=DIR | --checkpoint=CKPT) \
        (--prompt=TEXT | --prompts=FILE.jsonl) --max_new_tokens=K --temperature=T \
        [--top_p=P] [--top_k=K] [--num_samples=S] [--seed=X] [--agents=N] \
        [--output=FILE.jsonl] [--chat] [--min_p=P] [--stop=STR ...] [--stop_after_boxed] \
        [--batch_size=N] [--dtype=bfloat16|float32]

Writes one JSON line per (agent, prompt, sample) with agent, prompt_index,
sample_index, text, token_ids (generated ids, the stop token included) and
finish ("stop", "stop_string" or "length").
--temperature=0 is greedy. Prompts are tokenised as given unless --chat wraps
each in the tokenizer's chat template as a user message. A prompts file has
one JSON object per line with a "prompt" string.
"""

import json
import sys

import jax
from absl import app, flags, logging

from maft_jax import checkpoint, generation, hf, sampling, source
from maft_jax.tasks.base import read_jsonl, require

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Local HF model directory.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Population checkpoint.")
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt.")
_PROMPTS = flags.DEFINE_string("prompts", None, "JSONL file, one {\"prompt\": ...} per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0 means greedy.", lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).", lower_bound=0)
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p x the top probability.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (host side; repeatable).")
_STOP_BOXED = flags.DEFINE_bool("stop_after_boxed", False,
                                "End each completion after its first complete \\boxed{...}.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Prompts per device call.", lower_bound=1)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt per agent.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_AGENTS = flags.DEFINE_integer("agents", None, "Agents (HF dir: copies, default 1; "
                               "checkpoint: first N, default all).", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL (default: stdout).")
_CHAT = flags.DEFINE_bool("chat", False, "Apply the tokenizer's chat template.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")


def read_prompts(path: str) -> list[str]:
  """The "prompt" of every line; a bad line fails naming file and line."""
  prompts = [require(rec, "prompt", f"{path}:{lineno}") for lineno, rec in read_jsonl(path)]
  if not prompts:
    raise ValueError(f"{path}: no prompts")
  return prompts


def main(argv):
  del argv
  if (_PROMPT.value is None) == (_PROMPTS.value is None):
    raise app.UsageError("give exactly one of --prompt or --prompts")
  if (_HF_DIR.value is None) == (_CHECKPOINT.value is None):
    raise app.UsageError("give exactly one of --hf_dir or --checkpoint")
  method = sampling.from_flags(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                               top_p=_TOP_P.value, min_p=_MIN_P.value)
  prompts = [_PROMPT.value] if _PROMPT.value is not None else read_prompts(_PROMPTS.value)
  kind, path = ("hf", _HF_DIR.value) if _HF_DIR.value else ("checkpoint", _CHECKPOINT.value)
  try:
    src = source.describe(kind, path, dtype=_DTYPE.value)
    pop = source.load(src, _AGENTS.value)
  except (source.SourceError, checkpoint.CheckpointError, hf.HFError) as e:
    raise SystemExit(f"error: {e}") from None
  tok = src.tokenizer()
  if _CHAT.value:
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
  options = generation.Options(max_new_tokens=_MAX_NEW.value, method=method,
                               num_samples=_NUM_SAMPLES.value, batch_size=_BATCH.value,
                               stop_strings=tuple(_STOP.value),
                               stop_after_boxed=_STOP_BOXED.value)
  gen = generation.Generator(src.cfg, tok, log=logging.info)
  # A chat template already holds its special tokens.
  out = gen.generate(pop, prompts, options=options, key=jax.random.key(_SEED.value),
                     add_special_tokens=not _CHAT.value)
  sink = open(_OUTPUT.value, "w") if _OUTPUT.value else sys.stdout
  try:
    for a, per_prompt in enumerate(out):
      for p, per_sample in enumerate(per_prompt):
        for s, c in enumerate(per_sample):
          sink.write(json.dumps({"agent": a, "prompt_index": p, "sample_index": s,
                                 "text": c.text, "token_ids": list(c.token_ids),
                                 "finish": c.finish}) + "\n")
  finally:
    if sink is not sys.stdout:
      sink.close()


if __name__ == "__main__":
  app.run(main)
