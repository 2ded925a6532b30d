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


def made(path: str, make: Callable[[str], None]) -> str:
  """`path`, made by `make(path)` unless it exists. `make` leaves `path` whole
  or absent (it writes elsewhere and renames). A failure is raised again to
  every later caller of this test session, instead of being retried by each
  (a later session tries again)."""
  with _locked(path + ".lock"):
    failed = f"{path}.failed-{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"
    if os.path.exists(failed):
      with open(failed) as f:
        raise AssertionError(f"made once and failed: {f.read()}")
    if not os.path.exists(path):
      try:
        make(path)
      except BaseException as e:
        with open(failed, "w") as f:
          f.write(f"{type(e).__name__}: {e}")
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
    os.replace(partial, work)  # nothing in a workdir holds its own path
  return made(os.path.join(session_dir(tmp_path_factory), f"run-{name}"), make)
