"""launch.sample: greedy equals transformers' greedy generate; JSONL format."""

import gzip
import json

import pytest

from tests import cli

PROMPTS = ["The quick brown fox", "Alice has 3 apples and", "What is 12 + 7"]


def hf_greedy(hf_dir, prompts, max_new_tokens, chat=False):
  """transformers' greedy ids per prompt (EOS included); `chat`: each prompt
  as a user message through the chat template."""
  import torch
  import transformers as tf
  tok = tf.AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
  model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                  attn_implementation="eager")
  if chat:
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True) for p in prompts]
  enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
  with torch.no_grad():
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
  rows = []
  for row in out[:, enc["input_ids"].shape[1]:].tolist():
    if tok.eos_token_id in row:
      row = row[:row.index(tok.eos_token_id) + 1]
    rows.append(row)
  return rows


def cli_greedy(hf_dir, prompts, max_new_tokens, tmp_path, *flags, fast_compile=True):
  """The JSON lines of greedy float32 `launch.sample` on `prompts` (a file);
  `fast_compile` as in `cli.env`."""
  path, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
  path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  cli.run("sample", f"--hf_dir={hf_dir}", f"--prompts={path}",
          f"--max_new_tokens={max_new_tokens}", "--temperature=0", "--dtype=float32",
          f"--output={out}", *flags, fast_compile=fast_compile)
  return [json.loads(l) for l in out.read_text().splitlines()]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_equals_transformers_generate(family, hf_models, tmp_path):
  hf_dir = hf_models(family)
  lines = cli_greedy(hf_dir, PROMPTS, 12, tmp_path, "--agents=2")
  assert len(lines) == 2 * len(PROMPTS)
  expected = hf_greedy(hf_dir, PROMPTS, 12)
  for line in lines:
    assert {"agent", "prompt_index", "sample_index", "text", "token_ids"} <= set(line)
    assert line["token_ids"] == expected[line["prompt_index"]], line


def test_sampling_from_checkpoint(hf_models, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  cli.run("import_hf", f"--hf_dir={hf_models('llama')}", f"--out={ckpt}", "--agents=3")
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


def test_library_never_imports_torch(hf_models):
  import subprocess
  import sys
  code = ("import sys, jax; from launch import common, sample; "
          "from maft_jax import checkpoint, hf, model, population, sampling, sharding, presets, "
          "source; "
          f"s = source.describe('hf', {hf_models('gemma')!r}, dtype='float32'); "
          "source.load(s, 2); s.tokenizer().encode('hi'); "
          "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=cli.ROOT,
                 env={**__import__("os").environ, "PYTHONPATH": cli.ROOT})


def test_bench_sample_tiny_runs(tmp_path):
  hlo = tmp_path / "decode_hlo.txt.gz"
  proc = cli.run("bench", "--what=sample", "--tiny", "--agents=2", "--repeats=1",
                 f"--dump_hlo={hlo}")
  assert "ceilings:" in proc.stdout
  with gzip.open(hlo, "rt") as f:
    assert f.read().startswith("HloModule")
  row = [l for l in proc.stdout.splitlines() if l.strip().startswith("2 ")]
  assert len(row) == 1 and "%" in row[0] and "x" in row[0]
  assert "top-p draw of [16, 512] logits:" in proc.stdout


def test_bench_train_tiny_runs():
  proc = cli.run("bench", "--what=train", "--tiny", "--agents=1", "--repeats=1", "--seq=32")
  rows = [l.split() for l in proc.stdout.splitlines() if l.strip().startswith(("full", "LoRA"))]
  assert [r[0] for r in rows] == ["full", "LoRA"] and all(any(c.endswith("%") for c in r) for r in rows)
