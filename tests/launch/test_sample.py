"""launch.sample: greedy equals transformers' greedy generate; sampling from a
checkpoint; the JSONL format and a malformed prompt file named by line."""

import json

import pytest

from maft_jax import checkpoint

from tests import cli
from tests.reference import hf_greedy


PROMPTS = ["The quick brown fox", "Alice has 3 apples and", "What is 12 + 7"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_equals_transformers_generate(family, hf_models, tmp_path):
  hf_dir = hf_models(family)
  lines = cli.greedy(hf_dir, PROMPTS, 12, tmp_path, "--agents=2")
  assert len(lines) == 2 * len(PROMPTS)
  expected = hf_greedy(hf_dir, PROMPTS, 12)
  for line in lines:
    assert {"agent", "prompt_index", "sample_index", "text", "token_ids"} <= set(line)
    assert line["token_ids"] == expected[line["prompt_index"]], line


def test_sampling_from_checkpoint(hf_models, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  checkpoint.import_hf(hf_models("llama"), ckpt, agents=3)
  proc = cli.run("sample", f"--checkpoint={ckpt}", "--prompt=The quick", "--max_new_tokens=6",
                 "--temperature=0.9", "--top_p=0.9", "--top_k=20", "--num_samples=4", "--seed=3",
                 "--agents=2")
  lines = [json.loads(l) for l in proc.stdout.splitlines()]
  assert [(l["agent"], l["prompt_index"], l["sample_index"]) for l in lines] == [
      (a, 0, s) for a in range(2) for s in range(4)]
  assert all(1 <= len(l["token_ids"]) <= 6 for l in lines)
  # Different agents draw from different streams.
  assert [l["token_ids"] for l in lines[:4]] != [l["token_ids"] for l in lines[4:]]


def test_malformed_prompt_file_names_line(hf_models, tmp_path):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
  proc = cli.run("sample", f"--hf_dir={hf_models('llama')}", f"--prompts={prompts}",
                 "--max_new_tokens=2", check=False)
  assert proc.returncode != 0 and f"{prompts}:2:" in proc.stderr
