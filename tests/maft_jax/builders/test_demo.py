"""The demo's self-built base model: loadable, tokenised as the debate needs,
warm-started, and cached by settings (smoke sizes: seconds on CPU)."""

import dataclasses
import os
import time

import numpy as np
import pytest

from maft_jax import hf
from maft_jax.builders import demo
from maft_jax.tasks import arithmetic, prompts
from maft_jax.tokenizer import Tokenizer

TASK_OPTIONS = {"max_value": 3}


# One xdist worker builds the module's demo base (~15 s) once.
pytestmark = pytest.mark.xdist_group("demo")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo") / "base")
  return demo.build_base(out, demo.DemoSettings.smoke(), task_options=TASK_OPTIONS)


def _debate_prompt() -> str:
  problem = arithmetic.make_problem(0, 3, TASK_OPTIONS["max_value"])
  ops = problem.fields["operands"]
  return prompts.to_text(prompts.debate_round(
      problem, own=demo.solution(ops), others=[demo.solution(ops, {1: -2}), demo.solution(ops)]),
      None)[0]


def test_directory_is_a_loadable_hf_model(base):
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               demo.INFO_FILE):
    assert os.path.isfile(os.path.join(base, name)), name
  assert not os.path.exists(base + ".partial")
  m = hf.load(base, dtype="float32")
  tok = Tokenizer(base)
  assert m.hf_config["architectures"] == ["LlamaForCausalLM"]
  assert m.cfg.hidden_size == demo.DemoSettings.smoke().hidden_size
  assert tok.vocab_size <= m.cfg.vocab_size
  assert np.isfinite(m.params["embed"]).all()


def test_tokenizer_splits_digits_and_round_trips_debate_prompts(base):
  tok = Tokenizer(base)
  assert tok.chat_template is None
  assert None not in (tok.eos_id, tok.pad_id, tok.bos_id)
  assert len({tok.eos_id, tok.pad_id, tok.bos_id}) == 3
  ids = tok.encode("x=12345-678", add_special_tokens=False)
  assert [tok.decode([i]) for i in ids][-9:] == list("12345-678")
  text = _debate_prompt()
  ids = tok.encode(text)
  assert ids[0] == tok.bos_id
  assert tok.decode(ids) == text
  # A solution cut at its box re-encodes to the same tokens as a prefix of the whole.
  sol = demo.solution((1, 2, 3, 0, 3, 3))
  assert sol.endswith("\\boxed{-2}")
  assert tok.encode(sol + " more", add_special_tokens=False)[:len(
      tok.encode(sol, add_special_tokens=False))] == tok.encode(sol, add_special_tokens=False)


def test_solutions_and_slips():
  ops = (1, 2, 3, 4, 5, 6)  # 1+2*3+4-5*6 = -19
  assert demo.solution(ops) == (" 2*3=6. 5*6=30. 1+6=7. 7+4=11. 11-30=-19. "
                                "The answer is \\boxed{-19}")
  # A slip in step 2 (1+6) is carried on by the later steps.
  assert demo.solution(ops, {2: 1}).endswith("1+6=8. 8+4=12. 12-30=-18. The answer is \\boxed{-18}")
  rows = demo.corpus_rows(dataclasses.replace(demo.DemoSettings.smoke(), round1_rows=2,
                                              debate_rows=1), 3)
  assert rows[0]["prompt"].endswith("Answer:") and "agent solution" in rows[2]["prompt"]
  seed = demo.DemoSettings.smoke().corpus_seed  # its own stream, not the task's (seed 0)
  assert arithmetic.make_problem(seed, 1, 3).question in rows[1]["prompt"]


def test_warm_start_lowered_the_loss(base):
  info = demo.read_info(base)
  assert info["loss_after"] < info["loss_before"] - 0.25  # smoke: 10 steps, ~6.0 -> ~5.5
  assert info["steps"] > 0


def test_second_call_reuses_and_changed_settings_rebuild(base):
  weights = os.path.join(base, "model.safetensors")
  mtime = os.stat(weights).st_mtime_ns
  t0 = time.perf_counter()
  assert demo.build_base(base, demo.DemoSettings.smoke(), task_options=TASK_OPTIONS) == base
  assert time.perf_counter() - t0 < 1.0
  assert os.stat(weights).st_mtime_ns == mtime
  # Another seed keeps every shape, so this rebuild reuses the compiled steps.
  changed = dataclasses.replace(demo.DemoSettings.smoke(), seed=1)
  demo.build_base(base, changed, task_options=TASK_OPTIONS)
  assert os.stat(weights).st_mtime_ns != mtime
  assert demo.read_info(base)["settings"]["seed"] == 1
  assert not os.path.exists(base + ".partial") and not os.path.exists(base + ".old")
