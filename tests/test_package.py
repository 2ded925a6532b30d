"""The package as a whole: the library never imports torch, not even through
tensorboardX, which imports it whenever it is installed."""

import os

from tests import cli


def test_library_never_imports_torch(hf_models, tmp_path):
  import subprocess
  import sys
  code = ("import sys, jax; from launch import common, sample; "
          "from maft_jax import checkpoint, hf, model, population, sampling, sharding, presets, "
          "source; "
          f"s = source.describe('hf', {hf_models('gemma')!r}, dtype='float32'); "
          "source.load(s, 2); s.tokenizer().encode('hi'); "
          f"from maft_jax import report; assert report.write_tensorboard({str(tmp_path)!r}, []); "
          "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=cli.ROOT,
                 env={**os.environ, "PYTHONPATH": cli.ROOT})
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tb"))
