"""The sandbox contains what generated programs may do: each test runs a real
program and checks both its verdict and the host-side effect (file, socket,
leftover process) that isolation must prevent."""

import os
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest

from maft_jax.tasks import sandbox
from maft_jax.tasks.sandbox import Limits, SandboxUnavailable, run_program, run_programs

needs_root = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="the sandbox needs root on Linux (namespaces, mounts, a private uid)")


def _pids_of_uid(uid):
  """Host processes whose real uid is `uid` (from /proc, no psutil)."""
  pids = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/status") as f:
        for line in f:
          if line.startswith("Uid:"):
            if int(line.split()[1]) == uid:
              pids.append(int(entry))
            break
    except (FileNotFoundError, ProcessLookupError):
      pass
  return pids


def _assert_nothing_left(verdict):
  assert verdict.uid is not None and verdict.uid != 0
  with sandbox.hold_uid(verdict.uid):  # no other run can be using the uid meanwhile
    assert _pids_of_uid(verdict.uid) == []


@needs_root
def test_passing_program():
  v = run_program("print(6 * 7)")
  assert v.status == "passed" and v.passed
  assert (v.stdout, v.returncode, v.detail) == ("42\n", 0, "")


@needs_root
def test_assertion_failure_is_failed_and_named():
  v = run_program("def f(x):\n  return x + 1\n\nassert f(1) == 3, 'f(1) is wrong'\n")
  assert v.status == "failed" and not v.passed
  assert v.detail == "AssertionError: f(1) is wrong"
  assert v.returncode == 1 and "Traceback" in v.stderr


@needs_root
def test_runs_unprivileged_in_a_private_scratch_dir():
  v = run_program(
      "import os, tempfile\n"
      "print(os.getcwd()); print(os.environ['HOME']); print(tempfile.gettempdir())\n"
      "print(os.getuid(), os.getgid(), os.getgroups())\n"
      "open('a.txt', 'w').write('hello')\n"
      "open(os.path.join(tempfile.gettempdir(), 'b.txt'), 'w').write('x')\n"
      "print(open('a.txt').read(), sorted(os.listdir('.')))\n")
  assert v.passed, v
  cwd, home, tmp, ids, listing = v.stdout.splitlines()
  assert home == cwd and tmp == os.path.join(cwd, "tmp")
  assert ids == f"{v.uid} {v.uid} []"
  assert listing == "hello ['a.txt', 'main.py', 'tmp']"
  assert not os.path.exists(cwd)  # the scratch dir is gone afterwards


@needs_root
def test_infinite_loop_hits_the_cpu_limit():
  v = run_program("while True:\n  pass\n", limits=Limits(cpu_seconds=1, wall_seconds=30))
  assert v.status == "timeout" and "CPU" in v.detail, v


@needs_root
def test_sleeping_program_hits_the_wall_clock_limit():
  v = run_program("import time\ntime.sleep(60)\n", limits=Limits(wall_seconds=1))
  assert v.status == "timeout" and "wall-clock" in v.detail, v


@needs_root
def test_fork_bombs_are_contained():
  limits = Limits(max_processes=16, cpu_seconds=3, wall_seconds=3)
  crashing = run_program("import os\nwhile True:\n  os.fork()\n", limits=limits)
  assert not crashing.passed and "BlockingIOError" in crashing.detail, crashing
  persistent = run_program(
      "import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n", limits=limits)
  assert persistent.status == "timeout", persistent
  for v in (crashing, persistent):
    _assert_nothing_left(v)
  alive = subprocess.run([sys.executable, "-c", "print('alive')"], capture_output=True, timeout=60)
  assert alive.stdout == b"alive\n"


@needs_root
def test_process_limit_counts_and_escaped_children_die_with_the_run():
  # Children that leave the process group (setsid) and outlive the program
  # must still be killed; exactly max_processes - 1 forks succeed (the program
  # itself is the first process of its uid).
  v = run_program(
      "import os, time\npids = []\nfor _ in range(50):\n  try:\n    pid = os.fork()\n"
      "  except OSError:\n    break\n  if pid == 0:\n    os.setsid()\n    time.sleep(60)\n"
      "    os._exit(0)\n  pids.append(pid)\nprint(len(pids))\n",
      limits=Limits(max_processes=8))
  assert v.passed, v
  assert v.stdout == "7\n"
  _assert_nothing_left(v)


@needs_root
@pytest.mark.parametrize("source", [
    "x = bytearray(1 << 30)\n",
    "chunks = []\nwhile True:\n  chunks.append(bytearray(1 << 20))\n",
])
def test_memory_hog_hits_the_memory_limit(source):
  v = run_program(source, limits=Limits(memory_bytes=256 << 20))
  assert v.status == "memory" and "MemoryError" in v.detail, v


@needs_root
@pytest.mark.parametrize("where", ["tmp_path", "var_tmp", "root", "world_writable"])
def test_cannot_write_outside_its_scratch_dir(tmp_path, where):
  made = None
  if where == "tmp_path":
    outside = tmp_path / "outside"
    outside.mkdir()
  elif where == "var_tmp":
    outside = made = tempfile.mkdtemp(prefix="sandbox_test_", dir="/var/tmp")
  elif where == "root":
    outside = "/"
  else:
    outside = "/var/tmp"  # mode 1777: only the read-only mount stops it
  if where != "world_writable":
    os.chmod(outside, 0o755)
    assert os.stat(outside).st_uid == 0  # root-owned, not writable by others
  target = os.path.join(str(outside), f"sandbox_escape_{uuid.uuid4().hex}")
  try:
    v = run_program(f"open({target!r}, 'w').write('escaped')\n")
    assert v.status == "failed", v
    assert "Error" in v.detail  # PermissionError, read-only file system, not found
    assert not os.path.exists(target)
  finally:
    if os.path.exists(target):
      os.remove(target)
    if made:
      os.rmdir(made)


@needs_root
def test_no_network_even_to_the_hosts_loopback():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    source = (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5).close()\n"
              "print('connected')\n")
    v = run_program(source)
    assert v.status == "failed" and "connected" not in v.stdout, v
    with pytest.raises(BlockingIOError):
      server.accept()  # no connection arrived
    # Control: the same program does connect when the network is allowed.
    allowed = run_program(source, limits=Limits(allow_network=True))
    assert allowed.passed and allowed.stdout == "connected\n", allowed
    conn, _ = server.accept()
    conn.close()


@needs_root
@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_is_capped(stream):
  limit = 1000
  v = run_program(f"import sys\nfor _ in range(10 ** 6):\n  sys.{stream}.write('x' * 10 ** 6)\n",
                  limits=Limits(max_output_bytes=limit))
  assert v.status == "output_limit", v
  captured = getattr(v, stream)
  assert len(captured.encode()) <= limit and set(captured) == {"x"}
  assert len(v.stdout.encode()) <= limit and len(v.stderr.encode()) <= limit


@needs_root
def test_many_programs_in_parallel_keep_input_order():
  sources = []
  for i in range(10):
    if i % 3 == 0:
      sources.append(f"assert {i} < 0, 'no {i}'\n")
    else:  # the first programs finish last
      sources.append(f"import time\ntime.sleep({0.05 * (10 - i)})\nprint({i})\n")
  verdicts = run_programs(sources, max_workers=4)
  assert len(verdicts) == len(sources)
  for i, v in enumerate(verdicts):
    if i % 3 == 0:
      assert (v.status, v.detail) == ("failed", f"AssertionError: no {i}"), (i, v)
    else:
      assert v.passed and v.stdout == f"{i}\n", (i, v)
  assert run_programs([]) == []


@needs_root
def test_program_reads_stdin():
  v = run_program("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))\n",
                  stdin="1 2 3\n4\n")
  assert v.passed and v.stdout == "10\n", v
  empty = run_program("input()\n")
  assert empty.status == "failed" and empty.detail.startswith("EOFError"), empty


@needs_root
def test_refuses_to_run_without_a_network_namespace(monkeypatch):
  monkeypatch.setattr(sandbox, "_CLONE_NEWNET", 0x1)  # not a namespace flag: unshare fails
  with pytest.raises(SandboxUnavailable, match="network namespace"):
    run_program("print(1)")
  assert run_program("print(1)", limits=Limits(allow_network=True)).passed


def test_refuses_to_run_without_root(monkeypatch):
  monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
  with pytest.raises(SandboxUnavailable, match="uid 1000"):
    run_program("print(1)")


def test_limits_name_the_bad_value():
  with pytest.raises(ValueError, match=r"cpu_seconds.*-1"):
    Limits(cpu_seconds=-1)
  with pytest.raises(ValueError, match=r"max_processes.*0"):
    Limits(max_processes=0)
