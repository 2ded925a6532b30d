"""Run `python -m launch.<name>` in a subprocess, as a user would."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module: str, *args: str, check: bool = True, devices: int = 1
        ) -> subprocess.CompletedProcess:
  """`devices`: how many (fake) CPU devices the program sees."""
  from tests.conftest import FAST_COMPILE
  flags = FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}"
                          if devices > 1 else "")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  proc = subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  if check and proc.returncode != 0:
    raise AssertionError(f"launch.{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc
