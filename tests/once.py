"""Things several tests read, made once: by the first process that asks (an
xdist worker, or the only one), while the others wait on a file lock."""

import contextlib
import fcntl
import os
import shutil
from typing import Callable

from tests import cli


@contextlib.contextmanager
def _locked(path: str):
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


_FAILED: dict[str, str] = {}  # path -> error, in this process


def made(path: str, make: Callable[[str], None]) -> str:
  """`path`, made by `make(path)` unless it exists. `make` leaves `path` whole
  or absent (it writes elsewhere and renames). A failure is raised again to
  every later caller of this test session, instead of being retried by each
  (a later session tries again)."""
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # shared by the workers of one run
  failed = f"{path}.failed-{run}" if run else None
  with _locked(path + ".lock"):
    if path in _FAILED or (failed and os.path.exists(failed)):
      message = _FAILED.get(path) or open(failed).read()
      raise AssertionError(f"made once and failed: {message}")
    if not os.path.exists(path):
      try:
        make(path)
      except Exception as e:  # not an interrupt: a later session tries again
        _FAILED[path] = f"{type(e).__name__}: {e}"
        if failed:
          with open(failed, "w") as f:
            f.write(_FAILED[path])
        raise
  return path


def session_dir(tmp_path_factory) -> str:
  """A directory every process of this test session sees (under xdist, each
  worker's base temporary directory is a child of the session's)."""
  base = tmp_path_factory.getbasetemp()
  return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


def finished_run(tmp_path_factory, name: str, *args: str, devices: int = 1) -> str:
  """The workdir of a finished `launch.train *args` run, made once per session;
  its stdout is `<workdir>/stdout.txt`. Tests read it; one that would write
  to it (a rerun, a resume) works on a copy."""
  def make(work: str):
    partial = work + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    proc = cli.run("train", *args, f"--workdir={partial}", devices=devices)
    with open(os.path.join(partial, "stdout.txt"), "w") as f:
      f.write(proc.stdout)
    # Nothing the tests read depends on the path (report.md names the .partial one).
    os.replace(partial, work)
  return made(os.path.join(session_dir(tmp_path_factory), f"run-{name}"), make)
