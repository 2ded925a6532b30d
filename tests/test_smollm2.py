"""The real model, SmolLM2-135M-Instruct (tests/real_model.py), against
transformers on what a debate feeds it, and one MAFT iteration of it through
launch.train. One xdist group: one worker converts the model and runs them all."""

import os

import numpy as np
import pytest

from tests import cli
from tests.reference import hf_greedy, hf_logits, our_logits


pytestmark = pytest.mark.xdist_group("smollm2")

OWN = "First, 3*4 = 12. Then 2+12 = 14, so the answer is \\boxed{14}."
OTHERS = ["We get 2+3*4+1-0*5 = 15. \\boxed{15}", "Step by step: 5-2 = 3, so \\boxed{3}."]


def _debate_messages():
  """What the debate asks: round 1, a critic's round 2, STaR's hinted round 1."""
  from maft_jax import tasks
  from maft_jax.tasks import prompts
  task = tasks.load("arithmetic", size=50, seed=0, max_value=5)
  problems, fmt = task.problems()[:2], task.answer_format
  return ([prompts.round1(p, fmt) for p in problems]
          + [prompts.debate_round(p, OWN, OTHERS, fmt) for p in problems]
          + [prompts.with_hint(problems[0], fmt)])


def test_chat_template_renders_debate_messages_like_transformers(smollm2_dir):
  import transformers as tf

  from maft_jax.sft import tokenize_rows
  from maft_jax.tokenizer import Tokenizer
  ours, ref = Tokenizer(smollm2_dir), tf.AutoTokenizer.from_pretrained(smollm2_dir)
  assert ours.eos_ids == (ref.eos_token_id,) and ours.pad_id == ref.pad_token_id
  for msgs in _debate_messages():
    text = ours.apply_chat_template(msgs)
    assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                  return_dict=False)
    assert ours.encode(text, add_special_tokens=False) == list(ids)
    # A training row (the prompt as sampled, the answer, EOS) is the
    # conversation with that answer as transformers renders it, up to the
    # template's newline after the end-of-turn token.
    (row,) = tokenize_rows([{"prompt": text, "completion": OWN, "add_special_tokens": False}],
                           ours, where=str)
    conversation = ref.apply_chat_template(msgs + [{"role": "assistant", "content": OWN}],
                                           tokenize=True, return_dict=False)
    assert row["prompt_ids"] + row["completion_ids"] == list(conversation)[:-1]


def _padded_debate_batch(smollm2_dir):
  """Round-1 and round-2 prompts, left- and right-padded in one batch."""
  from maft_jax.tokenizer import Tokenizer
  tok = Tokenizer(smollm2_dir)
  msgs = _debate_messages()
  ids = [tok.encode(tok.apply_chat_template(m), add_special_tokens=False)
         for m in (msgs[0], msgs[2], msgs[3])]
  T = max(map(len, ids)) + 5
  tokens, mask = np.full((3, T), tok.pad_id), np.zeros((3, T), bool)
  for b, (row, left) in enumerate(zip(ids, (True, False, True))):
    sl = slice(T - len(row), T) if left else slice(0, len(row))
    tokens[b, sl], mask[b, sl] = row, True
  return tokens, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def test_logits_match_transformers_on_padded_debate_prompts(smollm2_dir):
  tokens, mask, positions = _padded_debate_batch(smollm2_dir)
  ref = hf_logits(smollm2_dir, tokens, mask, positions)
  ours = our_logits(smollm2_dir, tokens, mask, positions)
  assert np.abs(ours - ref)[mask].max() <= 1e-3  # measured 1.7e-4
  # bfloat16 compute (float32 parameters, as a run holds them), measured on
  # 2026-12-02: max |dlogit| 2.22 over logits up to 41, mean 0.113, the same
  # argmax at 97.2% of positions, mean NLL of the prompts 2.679 against 2.688.
  bf16 = our_logits(smollm2_dir, tokens, mask, positions, dtype="bfloat16")
  err = np.abs(bf16 - ref)[mask]
  assert err.max() <= 3.0 and err.mean() <= 0.2
  assert (bf16.argmax(-1) == ref.argmax(-1))[mask].mean() >= 0.95
  assert abs(_mean_nll(bf16, tokens, mask) - _mean_nll(ref, tokens, mask)) <= 0.05


def _mean_nll(logits, tokens, mask):
  """Mean NLL of each real token after a real token."""
  z = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  return float(nll[mask[:, 1:] & mask[:, :-1]].mean())


def test_greedy_chat_sampling_equals_transformers_generate(smollm2_dir, tmp_path):
  prompts = ["What is the result of 2+3*4+1-0*5?", "Name the capital of France.",
             "Write a haiku about gradient descent."]
  lines = cli.greedy(smollm2_dir, prompts, 32, tmp_path, "--chat", fast_compile=False)
  expected = hf_greedy(smollm2_dir, prompts, 32, chat=True)
  assert [l["token_ids"] for l in lines] == expected
  assert "Paris" in lines[1]["text"]  # a real model, not random weights


def test_one_maft_iteration_of_the_real_model(smollm2_dir, tmp_path):
  """debate -> select -> finetune -> eval through launch.train, and the select
  stage's records follow from the debate's transcripts."""
  from maft_jax.tokenizer import Tokenizer
  from tests.maft_jax.test_selection import check_stage_records
  work = str(tmp_path / "run")
  cli.run("train", "--config=configs/smollm2.py:smoke", f"--config.model.path={smollm2_dir}",
          f"--workdir={work}", "--noprogress", "--noreport", timeout=900, fast_compile=False)
  records = cli.records(work)
  assert [(r["iteration"], r["stage"]) for r in records] == [
      (0, "eval"), (1, "debate"), (1, "select"), (1, "finetune"), (1, "eval")]
  check_stage_records(work, 1, critic_weight=0.5, tokenizer=Tokenizer(smollm2_dir))
  finetune = records[3]
  assert [s > 0 for s in finetune["steps"]] == [e > 0 for e in finetune["examples"]]
  # LoRA-native: the iteration's checkpoint is the 4 agents' adapters over the
  # one base, referenced (not 4 merged copies of 135M parameters).
  from maft_jax import checkpoint
  pop_dir = os.path.join(work, "iter_01", "finetune", "population")
  meta = checkpoint.read_meta(pop_dir)
  assert meta.lora["rank"] == 8 and meta.base_ref.path == os.path.abspath(smollm2_dir)
  adapters = sum(os.path.getsize(os.path.join(r, n))
                 for r, _, ns in os.walk(os.path.join(pop_dir, "params")) for n in ns)
  assert adapters < 50e6  # 4 x 2.4M adapter parameters x 4 bytes, and orbax's files
