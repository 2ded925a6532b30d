"""launch.finetune end to end: an empty data file leaves that agent untouched.
Checkpoints go in and out in process (`checkpoint.import_hf` / `export_hf`,
what launch.import_hf / export_hf run)."""

import json
import os

from maft_jax import checkpoint

from tests import cli
from tests.reference import assert_bit_identical, tensors


def test_finetune_cli_empty_file_means_no_update(hf_models, tmp_path):
  src = hf_models("qwen2")
  ckpt, out, exported = (str(tmp_path / n) for n in ("ckpt", "ckpt2", "hf"))
  checkpoint.import_hf(src, ckpt, agents=3)
  rows = [{"prompt": f"What is {i} + {i}?", "completion": f"It is {2 * i}."} for i in range(6)]
  files = []
  for a, n in enumerate([6, 0, 2]):
    path = tmp_path / f"agent{a}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    files.append(str(path))
  proc = cli.run("finetune", f"--checkpoint={ckpt}", f"--data={','.join(files)}", f"--out={out}",
                 "--epochs=2", "--lr=1e-3", "--batch_size=2", "--seq_len=32", "--dtype=float32",
                 f"--workdir={tmp_path / 'work'}", "--save_every=1")
  steps = json.loads(proc.stdout.rsplit("steps per agent ", 1)[1])
  assert steps[1] == 0 and steps[0] > steps[2] > 0, proc.stdout
  checkpoint.export_hf(out, exported)
  assert_bit_identical(src, os.path.join(exported, "agent_1"))
  before = tensors(src)
  for agent in ("agent_0", "agent_2"):
    after = tensors(os.path.join(exported, agent))
    assert any(before[k].tobytes() != after[k].tobytes() for k in before), agent
  # Rerunning with the same workdir resumes at the end: nothing left to do.
  again = cli.run("finetune", f"--checkpoint={ckpt}", f"--data={','.join(files)}",
                  f"--out={tmp_path / 'ckpt3'}", "--epochs=2", "--lr=1e-3", "--batch_size=2",
                  "--seq_len=32", "--dtype=float32", f"--workdir={tmp_path / 'work'}")
  assert "resumed" in again.stderr and f"steps per agent {steps}" in again.stdout
  # Resuming with a different schedule is refused, naming the settings.
  changed = cli.run("finetune", f"--checkpoint={ckpt}", f"--data={','.join(files)}",
                    f"--out={tmp_path / 'ckpt4'}", "--epochs=3", "--lr=1e-3", "--batch_size=2",
                    "--seq_len=32", "--dtype=float32", f"--workdir={tmp_path / 'work'}",
                    check=False)
  assert changed.returncode != 0 and "different settings" in changed.stderr


def test_finetune_cli_bad_input(hf_models, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  checkpoint.import_hf(hf_models("qwen2"), ckpt, agents=2)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n')
  proc = cli.run("finetune", f"--checkpoint={ckpt}", f"--data={bad},{bad}",
                 f"--out={tmp_path / 'o'}", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {bad}:2: missing field 'completion' (fields: ['prompt'])")
  proc = cli.run("finetune", f"--checkpoint={ckpt}", f"--data={bad}", f"--out={tmp_path / 'o'}",
                 check=False)
  assert proc.returncode != 0 and "population of 2 agents" in proc.stderr


def test_finetune_cli_lora_merges_and_leaves_idle_agent_identical(hf_models, tmp_path):
  src = hf_models("llama")
  ckpt, out, exported = (str(tmp_path / n) for n in ("ckpt", "ckpt2", "hf"))
  checkpoint.import_hf(src, ckpt, agents=2)
  rows = [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(4)]
  full, empty = tmp_path / "a0.jsonl", tmp_path / "a1.jsonl"
  full.write_text("".join(json.dumps(r) + "\n" for r in rows))
  empty.write_text("")
  cli.run("finetune", f"--checkpoint={ckpt}", f"--data={full},{empty}", f"--out={out}",
          "--epochs=1", "--lr=1e-2", "--batch_size=2", "--seq_len=32", "--dtype=float32",
          "--lora_rank=4")
  checkpoint.export_hf(out, exported)
  assert_bit_identical(src, os.path.join(exported, "agent_1"))
  before, after = tensors(src), tensors(os.path.join(exported, "agent_0"))
  changed = {k for k in before if before[k].tobytes() != after[k].tobytes()}
  # Only adapted projections change; embeddings, norms and the head stay frozen.
  assert changed and all(("proj" in k) for k in changed), sorted(changed)[:5]
