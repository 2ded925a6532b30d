"""Run `python -m launch.<name>` in a subprocess, as a user would, and read
what a run wrote."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The `launch.*` subprocesses of the end-to-end tests share one persistent XLA
# compilation cache: the tests start the same programs many times (a run, its
# rerun, its resumes, launch.evaluate). Measured on 2 cores before the
# cheaper compile flags of conftest: the smoke train 31.8 s cold, 19.6 s warm.
# In-process tests do not use it: there, most programs compile once, and
# writing them cost ~10%. Entries are keyed by program, flags and jax version;
# a damaged entry is a warning and a recompile. MAFT_TEST_JAX_CACHE='' turns
# it off.
CACHE = os.environ.get("MAFT_TEST_JAX_CACHE", os.path.join(ROOT, ".cache", "jax"))


def env(devices: int = 1, fast_compile: bool = True, **extra: str) -> dict[str, str]:
  """The environment of a `launch.*` subprocess seeing `devices` fake CPU devices.

  `fast_compile`: XLA's cheap CPU backend (conftest.FAST_COMPILE). It halves
  the compiles of the tiny models, whose run time is nothing; a real model
  runs 3x slower under it (SmolLM2's 64 greedy tokens: 51 s against 18 s).
  """
  from tests.conftest import FAST_COMPILE
  flags = (FAST_COMPILE if fast_compile else "") + (
      f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
  out = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(), **extra)
  if CACHE:
    out.update(JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return out


def _command(module: str, *args: str) -> list[str]:
  return [sys.executable, "-m", f"launch.{module}", *args]


def start(module: str, *args: str, devices: int = 1, **popen) -> subprocess.Popen:
  """`python -m launch.<module>` started in the background (`run` waits)."""
  return subprocess.Popen(_command(module, *args), cwd=ROOT, env=env(devices), **popen)


def run(module: str, *args: str, check: bool = True, devices: int = 1, timeout: float = 300,
        fast_compile: bool = True) -> subprocess.CompletedProcess:
  """`devices`: how many (fake) CPU devices the program sees."""
  env_ = env(devices, fast_compile)
  proc = subprocess.run(_command(module, *args), cwd=ROOT, env=env_, capture_output=True,
                        text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"launch.{module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def records(workdir, timing: bool = True) -> list[dict]:
  """The stage records of a run (`metrics.jsonl`); `timing=False` drops the
  seconds, which differ between two runs of the same stages."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    out = [json.loads(line) for line in f]
  return out if timing else [{k: v for k, v in r.items() if k != "seconds"} for r in out]


def greedy(hf_dir, prompts, max_new_tokens, tmp_path, *flags, fast_compile=True):
  """The JSON lines of greedy float32 `launch.sample` on `prompts` (a file);
  `fast_compile` as in `cli.env`."""
  path, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
  path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  run("sample", f"--hf_dir={hf_dir}", f"--prompts={path}", f"--max_new_tokens={max_new_tokens}",
      "--temperature=0", "--dtype=float32", f"--output={out}", *flags, fast_compile=fast_compile)
  return [json.loads(l) for l in out.read_text().splitlines()]
