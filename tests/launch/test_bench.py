"""launch.bench: the tiny sampling and training benchmarks run and report."""

import gzip

from tests import cli


def test_bench_sample_tiny_runs(tmp_path):
  hlo = tmp_path / "decode_hlo.txt.gz"
  proc = cli.run("bench", "--what=sample", "--tiny", "--agents=2", "--repeats=1", "--lora",
                 f"--dump_hlo={hlo}")
  assert "ceilings:" in proc.stdout
  with gzip.open(hlo, "rt") as f:
    assert f.read().startswith("HloModule")
  full, adapted = proc.stdout.split("LoRA populations:")
  for table in (full, adapted):  # the full copies, then one base + adapters
    row = [l for l in table.splitlines() if l.strip().startswith("2 ")]
    assert len(row) == 1 and "%" in row[0] and "x" in row[0], table
  assert "top-p draw of [16, 512] logits:" in proc.stdout


def test_bench_train_tiny_runs():
  proc = cli.run("bench", "--what=train", "--tiny", "--agents=1", "--repeats=1", "--seq=32")
  rows = [l.split() for l in proc.stdout.splitlines() if l.strip().startswith(("full", "LoRA"))]
  assert [r[0] for r in rows] == ["full", "LoRA"] and all(any(c.endswith("%") for c in r) for r in rows)
