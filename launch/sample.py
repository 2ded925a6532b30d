r"""Sample completions from every agent of a population.

    python -m launch.sample (--hf_dir=DIR | --checkpoint=CKPT) \
        (--prompt=TEXT | --prompts=FILE.jsonl) --max_new_tokens=K --temperature=T \
        [--top_p=P] [--top_k=K] [--num_samples=S] [--seed=X] [--agents=N] \
        [--output=FILE.jsonl] [--chat]

Writes one JSON line per (agent, prompt, sample) with agent, prompt_index,
sample_index, text and token_ids (generated ids, the stop token included).
--temperature=0 is greedy. Prompts are tokenised as given unless --chat wraps
each in the tokenizer's chat template as a user message. A prompts file has
one JSON object per line with a "prompt" string.
"""

import json
import sys

import jax
import numpy as np
from absl import app, flags

from launch import common
from maft_jax import sampling

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Local HF model directory.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Population checkpoint.")
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt.")
_PROMPTS = flags.DEFINE_string("prompts", None, "JSONL file, one {\"prompt\": ...} per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0 means greedy.", lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).", lower_bound=0)
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt per agent.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_AGENTS = flags.DEFINE_integer("agents", None, "Agents (HF dir: copies, default 1; "
                               "checkpoint: first N, default all).", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL (default: stdout).")
_CHAT = flags.DEFINE_bool("chat", False, "Apply the tokenizer's chat template.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")


def read_prompts(path: str) -> list[str]:
  prompts = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise ValueError(f"{path}:{lineno}: expected an object with a string field \"prompt\"")
      prompts.append(record["prompt"])
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
                               top_p=_TOP_P.value)
  prompts = [_PROMPT.value] if _PROMPT.value is not None else read_prompts(_PROMPTS.value)
  loaded = common.load(hf_dir=_HF_DIR.value, checkpoint_dir=_CHECKPOINT.value,
                       agents=_AGENTS.value, dtype=_DTYPE.value)
  tok = loaded.tokenizer
  if _CHAT.value:
    texts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    ids = tok.encode_batch(texts, add_special_tokens=False)
  else:
    ids = tok.encode_batch(prompts)
  pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_ids[0] if tok.eos_ids else 0)
  S = _NUM_SAMPLES.value
  tokens, mask = sampling.left_pad(ids, pad_id)
  out = sampling.sample(loaded.pop, tokens, mask, jax.random.key(_SEED.value), cfg=loaded.cfg,
                        method=method, max_new_tokens=_MAX_NEW.value,
                        stop_ids=tuple(tok.eos_ids), pad_id=pad_id, num_samples=S)
  gen, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  sink = open(_OUTPUT.value, "w") if _OUTPUT.value else sys.stdout
  try:
    for a in range(gen.shape[0]):
      for row in range(gen.shape[1]):
        token_ids = gen[a, row, :lengths[a, row]].tolist()
        sink.write(json.dumps({"agent": a, "prompt_index": row // S, "sample_index": row % S,
                               "text": tok.decode(token_ids), "token_ids": token_ids}) + "\n")
  finally:
    if sink is not sys.stdout:
      sink.close()


if __name__ == "__main__":
  app.run(main)
