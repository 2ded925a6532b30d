"""Run untrusted Python programs (e.g. HumanEval completions) one process each.

**This is not a container and not a security boundary against a determined
attacker** (no seccomp filter, shared kernel, the whole host filesystem is
readable where its permissions allow). It is a set of kernel limits that keeps
buggy or mischievous generated code from hurting the training host: it cannot
write outside its own scratch directory, reach the network, fork-bomb, allocate
or compute without bound, fill the disk or flood the trainer with output.

How one program runs (everything is Linux, standard library only, needs root):

    trainer thread --Popen--> launcher (root, host PID namespace)
      unshare(NEWNS|NEWPID|NEWIPC|NEWUTS) and unshare(NEWNET), then fork:
        init (root, PID 1 of a new PID namespace): builds the mount namespace,
          forks and reaps; reports the program's exit status and rusage on a pipe
          program (uid U, no groups, no_new_privs, rlimits): python3 -I main.py

* **Processes**: RLIMIT_NPROC is not enforced for uid 0, so the program runs
  as an unprivileged uid U that no other process uses: a uid from a pool
  (`_UID_BASE`...) reserved with an flock on a file in a root-only directory,
  so parallel sandboxes -- threads or separate processes such as pytest-xdist
  workers -- never share a uid and so never share a process count (or can
  signal each other). RLIMIT_NPROC = `max_processes` then caps the program's
  processes and threads. Everything runs in a new PID namespace whose init is
  our own process: when the program exits, is killed on a limit, or the
  launcher dies, init exits and the kernel kills every process left in the
  namespace (including ones that called setsid or double-forked), so nothing
  outlives a run. If the trainer dies, PR_SET_PDEATHSIG kills the launcher
  and then init. (cgroups are not used: on the machine this was written on the
  pids hierarchy is read-only and the memory one is v1.) `hold_uid` lets an
  audit (the tests) check that no process of a finished run's uid is left.
* **Network**: a fresh network namespace (only a loopback device, down), made
  with unshare(2) through ctypes (os.unshare is Python 3.12+). If it cannot be
  created, `SandboxUnavailable` is raised unless `Limits(allow_network=True)`.
  Abstract unix sockets are per network namespace and so unreachable too.
* **Filesystem**: a private mount namespace in which every mount is remounted
  read-only and nosuid, except the scratch directory: a size-capped tmpfs
  (`max_disk_bytes`) owned by U, mounted where the host's empty, root-only
  temporary directory is, holding `main.py` and `tmp/`; it is the program's
  cwd, HOME and TMPDIR. The temporary-files directory (/tmp), /dev/shm and
  /run are covered with empty read-only tmpfs mounts (other runs' scratch
  directories and unix sockets are invisible). A directory on the way to the
  interpreter that U could not traverse (e.g. a pyenv build under /root, mode
  0700) is covered the same way and only the interpreter's prefix is
  bind-mounted back, read-only. The mount namespace and the tmpfs vanish with
  the run; the host directory is removed afterwards.
* **Limits** (set in the program's process before exec): RLIMIT_CPU
  (`cpu_seconds`, SIGXCPU then SIGKILL one second later), RLIMIT_AS and
  RLIMIT_DATA (`memory_bytes`, per process), RLIMIT_FSIZE (`max_file_bytes`),
  RLIMIT_NPROC (counts threads too), RLIMIT_NOFILE, RLIMIT_CORE=0; the wall clock
  (`wall_seconds`, counted from the launch) is enforced by the parent, which
  kills the namespace's init. stdout and stderr are read incrementally and at
  most `max_output_bytes` of each is kept; more kills the program
  (`output_limit`). stdin is a file, so a program that does not read it cannot
  block the parent.

Verdicts: `passed` (exit 0), `failed` (non-zero exit or a signal; `detail` is
the last stderr line, e.g. `AssertionError: ...`), `timeout` (CPU or wall
clock), `memory` (MemoryError, or SIGKILL near the memory limit), `output_limit`,
`error` (the sandbox itself failed; the program's fault is never `error`).
`SandboxUnavailable` is raised, not returned, when isolation cannot be set up.

Not provided: a seccomp syscall filter; protection from kernel bugs; hiding
world-readable files (the program can read what any unprivileged user can,
except /tmp, /dev/shm and /run); a global memory cap (RLIMIT_AS is per
process, so up to `max_processes` x `memory_bytes` in total); CPU or I/O
bandwidth shares; loopback networking inside the sandbox (programs that serve
and connect to themselves fail); multiprocessing's shared-memory semaphores
(/dev/shm is read-only). The interpreter is the running one's (`-I`: no
site-packages of the trainer's venv, standard library only). Each run costs
two interpreter start-ups (launcher and program), about 0.1-0.2 s; the uid
lock directory keeps up to `_UID_COUNT` empty files.
"""

from __future__ import annotations

import ctypes
import errno
import marshal
import math
import os
import resource
import sys

_UID_BASE = 2_100_000_000  # unused by any account; below 2**31 for old tools
_UID_COUNT = 4096
_SCRIPT = "main.py"
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_SIGKILL = 9  # the same on every Linux architecture

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_NOATIME = 1024
_MS_NODIRATIME = 2048
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_RELATIME = 1 << 21
_MOUNT_OPTION_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
                       "noatime": _MS_NOATIME, "nodiratime": _MS_NODIRATIME,
                       "relatime": _MS_RELATIME}

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38


# ------------------------------------------------- launcher and init (children)
# Run as `python -I -S sandbox.py CONFIG` (root, single-threaded). Only the
# cheap imports above are loaded there: this part runs once per program.


def _libc():
  return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
  if result == -1:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source, target, fstype, flags, data=None) -> None:
  enc = lambda s: None if s is None else s.encode()
  _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
         f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r})")


def _report(fd: int, **message) -> None:
  os.write(fd, (repr(message) + "\n").encode())  # one literal_eval-able dict per line


def _mountinfo() -> list[tuple[str, set[str]]]:
  """(mount point, per-mount options) of every mount, in mount order."""
  out = []
  with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
    for line in f:
      fields = line.split(" ")
      point = fields[4]
      for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"),
                            ("\\134", "\\")):
        point = point.replace(escaped, char)
      out.append((point, set(fields[5].split(","))))
  return out


def _build_mounts(libc, cfg: dict) -> None:
  """In the new mount namespace: hide, expose, scratch tmpfs, everything else read-only."""
  workdir, uid = cfg["workdir"], cfg["uid"]
  limits = cfg["limits"]
  _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)
  try:  # this PID namespace's own /proc (best effort: only hides host pids)
    _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
  except OSError:
    pass
  with open(os.path.join(workdir, _SCRIPT), "rb") as f:
    script = f.read()
  keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in cfg["expose"]}
  for directory in cfg["hide"]:
    os.makedirs(directory, exist_ok=True)
    _mount(libc, "tmpfs", directory, "tmpfs", _MS_NOSUID | _MS_NODEV,
           "mode=755,size=1m,nr_inodes=4096")
  for path, fd in keep.items():
    os.makedirs(path, exist_ok=True)
    _mount(libc, f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
    os.close(fd)
  os.makedirs(workdir, exist_ok=True)
  _mount(libc, "tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV,
         f"mode=700,uid={uid},gid={uid},size={limits['max_disk_bytes']},nr_inodes=65536")
  script_path = os.path.join(workdir, _SCRIPT)
  with open(script_path, "wb") as f:
    f.write(script)
  os.chown(script_path, uid, uid)
  os.mkdir(os.path.join(workdir, "tmp"), 0o700)
  os.chown(os.path.join(workdir, "tmp"), uid, uid)
  for point, options in _mountinfo():
    if point == workdir or "ro" in options:
      continue
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID
    for option in options:
      flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
    try:
      _mount(libc, None, point, None, flags)
    except OSError as e:
      if e.errno != errno.ENOENT:  # ENOENT: under a covered directory, unreachable
        raise


def _set_limits(limits: dict) -> None:
  cpu = max(1, math.ceil(limits["cpu_seconds"]))
  memory = limits["memory_bytes"]
  for which, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                       (resource.RLIMIT_AS, (memory, memory)),
                       (resource.RLIMIT_DATA, (memory, memory)),
                       (resource.RLIMIT_FSIZE, (limits["max_file_bytes"],) * 2),
                       (resource.RLIMIT_NPROC, (limits["max_processes"],) * 2),
                       (resource.RLIMIT_NOFILE, (256, 256)),
                       (resource.RLIMIT_CORE, (0, 0))):
    resource.setrlimit(which, value)


def _program_main(libc, cfg: dict, error_w: int) -> None:
  """The forked program process: drop to the private uid, apply limits, exec."""
  try:
    uid, workdir = cfg["uid"], cfg["workdir"]
    os.chdir(workdir)
    _set_limits(cfg["limits"])
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.umask(0o077)
    env = {"PATH": _CHILD_PATH, "HOME": workdir, "TMPDIR": os.path.join(workdir, "tmp"),
           "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    os.execve(cfg["python"], [cfg["python"], "-I", _SCRIPT], env)
  except BaseException as e:  # noqa: BLE001 -- reported to init, which reports it up
    os.write(error_w, f"{type(e).__name__}: {e}".encode()[:4000])
  os._exit(127)


def _init_main(libc, cfg: dict, result_fd: int) -> None:
  """PID 1 of the new namespace: set up mounts, run the program, reap, report."""
  try:
    _check(libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    _build_mounts(libc, cfg)
    error_r, error_w = os.pipe()  # close-on-exec: EOF without data means exec worked
    pid = os.fork()
    if pid == 0:
      os.close(error_r)
      _program_main(libc, cfg, error_w)
    os.close(error_w)
    error = b""
    while chunk := os.read(error_r, 4096):
      error += chunk
    os.close(error_r)
    while True:
      child, wstatus, usage = os.wait4(-1, 0)
      if child == pid:
        break
    if error:
      _report(result_fd, error=f"starting the program: {error.decode(errors='replace')}")
    else:
      _report(result_fd, exit={"wstatus": wstatus, "utime": usage.ru_utime,
                               "stime": usage.ru_stime, "maxrss_kb": usage.ru_maxrss})
  except BaseException as e:  # noqa: BLE001
    _report(result_fd, error=f"{type(e).__name__}: {e}")
  os._exit(0)  # as PID 1, this kills everything left in the namespace


def _launcher_main(argv: list[str]) -> None:
  cfg = marshal.loads(bytes.fromhex(argv[1]))
  result_fd = cfg["result_fd"]
  os.set_inheritable(result_fd, False)
  libc = _libc()
  _check(libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
  if os.getppid() != cfg["parent_pid"]:
    os._exit(1)  # the trainer is already gone
  try:
    _check(libc.unshare(_CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS),
           "unshare(CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWIPC|CLONE_NEWUTS)")
  except OSError as e:
    _report(result_fd, unavailable=f"cannot create the sandbox's namespaces ({e}); "
            "the sandbox needs root on Linux")
    os._exit(0)
  if cfg["unshare_net"]:
    try:
      _check(libc.unshare(cfg["net_flag"]), "unshare(CLONE_NEWNET)")
    except OSError as e:
      _report(result_fd, unavailable=f"cannot create a network namespace ({e}); refusing to "
              "run untrusted code with network access (pass Limits(allow_network=True) to "
              "run anyway)")
      os._exit(0)
  pid = os.fork()
  if pid == 0:
    _init_main(libc, cfg, result_fd)
  _report(result_fd, init_pid=pid)
  os.close(result_fd)
  os.waitpid(pid, 0)
  os._exit(0)


if __name__ == "__main__":
  _launcher_main(sys.argv)  # never returns: the trainer-side API follows

# ------------------------------------------------------------- trainer side

import ast  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import fcntl  # noqa: E402
import random  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent import futures  # noqa: E402
from typing import Iterator, Sequence  # noqa: E402

STATUSES = ("passed", "failed", "timeout", "memory", "output_limit", "error")
_KILL_GRACE_SECONDS = 5.0


class SandboxUnavailable(RuntimeError):
  """The isolation the limits ask for cannot be set up on this machine."""


@dataclasses.dataclass(frozen=True)
class Limits:
  cpu_seconds: float = 5.0
  wall_seconds: float = 10.0
  memory_bytes: int = 1 << 30
  max_processes: int = 32
  max_output_bytes: int = 1 << 16
  max_file_bytes: int = 1 << 24
  allow_network: bool = False
  max_disk_bytes: int = 1 << 26  # size of the scratch tmpfs (cwd, HOME, TMPDIR)

  def __post_init__(self):
    for name in ("cpu_seconds", "wall_seconds"):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"Limits.{name} must be a positive number of seconds, got {value!r}")
    for name in ("memory_bytes", "max_processes", "max_output_bytes", "max_file_bytes",
                 "max_disk_bytes"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Verdict:
  status: str           # one of STATUSES
  detail: str           # why: last stderr line, the limit hit, the sandbox error
  stdout: str           # at most max_output_bytes of it (decoded, errors replaced)
  stderr: str
  returncode: int | None  # the program's exit code, -signal if killed, None if unknown
  wall_seconds: float
  uid: int | None = None  # the unprivileged uid the program ran as

  @property
  def passed(self) -> bool:
    return self.status == "passed"


def run_program(source: str, *, limits: Limits = Limits(), stdin: str = "") -> Verdict:
  """Run one Python program in the sandbox and judge how it ended."""
  if not isinstance(source, str):
    raise TypeError(f"source must be a str, got {type(source).__name__}")
  if not isinstance(limits, Limits):
    raise TypeError(f"limits must be a sandbox.Limits, got {type(limits).__name__}")
  if not isinstance(stdin, str):
    raise TypeError(f"stdin must be a str, got {type(stdin).__name__}")
  _require_root()
  start = time.monotonic()
  with _reserved_uid() as uid, _host_workdir() as workdir:
    with open(os.path.join(workdir, _SCRIPT), "w", encoding="utf-8") as f:
      f.write(source)
    run = _launch(workdir, uid, limits, stdin.encode("utf-8"))
  return _judge(run, limits, uid, time.monotonic() - start)


def run_programs(sources: Sequence[str], *, limits: Limits = Limits(),
                 max_workers: int | None = None) -> list[Verdict]:
  """Run many programs in parallel (one thread waits on each); verdicts in input order."""
  sources = list(sources)
  if max_workers is not None and (isinstance(max_workers, bool) or
                                  not isinstance(max_workers, int) or max_workers < 1):
    raise ValueError(f"max_workers must be a positive int or None, got {max_workers!r}")
  if not sources:
    return []
  workers = min(len(sources), max_workers or os.cpu_count() or 1)
  if workers == 1:
    return [run_program(s, limits=limits) for s in sources]
  with futures.ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
    return list(pool.map(lambda s: run_program(s, limits=limits), sources))


@dataclasses.dataclass
class _Run:
  stdout: bytes = b""
  stderr: bytes = b""
  killed_for: str | None = None   # "wall" | "output"
  messages: list = dataclasses.field(default_factory=list)


def _require_root() -> None:
  if sys.platform != "linux":
    raise SandboxUnavailable(f"the sandbox needs Linux namespaces; this is {sys.platform!r}")
  if os.geteuid() != 0:
    raise SandboxUnavailable(
        f"the sandbox needs root (namespaces, mounts, a private uid); running as uid "
        f"{os.geteuid()}")
  if not sys.executable:
    raise SandboxUnavailable("sys.executable is empty: no interpreter to run programs with")


def _lock_dir() -> str:
  path = os.path.join(tempfile.gettempdir(), "maft_jax_sandbox_uids")
  try:
    os.mkdir(path, 0o700)
  except FileExistsError:
    pass
  st = os.lstat(path)
  if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
    raise SandboxUnavailable(
        f"uid lock directory {path} must be a root-owned directory not writable by others "
        f"(mode {oct(st.st_mode)}, owner {st.st_uid})")
  return path


@contextlib.contextmanager
def _reserved_uid() -> Iterator[int]:
  """A uid from the pool, held (flock on its lock file) until the run ends."""
  lock_dir = _lock_dir()
  first = random.randrange(_UID_COUNT)
  for i in range(_UID_COUNT):
    uid = _UID_BASE + (first + i) % _UID_COUNT
    fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      continue
    try:
      yield uid
    finally:
      os.close(fd)
    return
  raise SandboxUnavailable(f"all {_UID_COUNT} sandbox uids from {_UID_BASE} are in use")


@contextlib.contextmanager
def hold_uid(uid: int) -> Iterator[int]:
  """Wait until sandbox uid `uid` is free and keep it reserved (for audits: while
  it is held no run uses `uid`, so a process running as `uid` is a leak)."""
  if not _UID_BASE <= uid < _UID_BASE + _UID_COUNT:
    raise ValueError(f"uid {uid} is not a sandbox uid ({_UID_BASE}..{_UID_BASE + _UID_COUNT - 1})")
  fd = os.open(os.path.join(_lock_dir(), str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield uid
  finally:
    os.close(fd)


@contextlib.contextmanager
def _host_workdir() -> Iterator[str]:
  """A root-only empty directory; the program's tmpfs is mounted over it."""
  parent = os.path.realpath(tempfile.gettempdir())
  if parent == "/":
    raise SandboxUnavailable("the temporary directory is '/': set TMPDIR to a real directory")
  path = tempfile.mkdtemp(prefix="maft_sandbox_", dir=parent)
  try:
    yield path
  finally:
    shutil.rmtree(path, ignore_errors=True)


def _traversable_by_others(path: str) -> bool:
  try:
    return bool(os.stat(path).st_mode & stat.S_IXOTH)
  except OSError:
    return False


def _first_hidden_ancestor(path: str) -> str | None:
  """The shallowest directory on the way to `path` that others cannot enter."""
  parts = path.strip("/").split("/")
  for i in range(1, len(parts) + 1):
    prefix = "/" + "/".join(parts[:i])
    if not _traversable_by_others(prefix):
      return prefix
  return None


def _is_under(path: str, directory: str) -> bool:
  return path == directory or path.startswith(directory.rstrip("/") + "/")


def _mount_plan(workdir: str) -> tuple[list[str], list[str]]:
  """(directories to cover with an empty tmpfs, paths to bind back read-only)."""
  python = os.path.realpath(sys.executable)
  needed = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
                  | {os.path.dirname(python)})
  hide = {os.path.dirname(workdir)}
  for extra in ("/dev/shm", "/run"):
    if os.path.isdir(extra):
      hide.add(os.path.realpath(extra))
  for path in needed:
    ancestor = _first_hidden_ancestor(path)
    if ancestor is not None:
      hide.add(ancestor)
  if "/" in hide:
    raise SandboxUnavailable(f"cannot hide '/' (needed paths {needed})")
  expose = [p for p in needed if any(_is_under(p, h) for h in hide)]
  return sorted(hide, key=lambda p: (p.count("/"), p)), expose


def _launch(workdir: str, uid: int, limits: Limits, stdin: bytes) -> _Run:
  hide, expose = _mount_plan(workdir)
  result_r, result_w = os.pipe()
  config = {
      "parent_pid": os.getpid(), "result_fd": result_w, "workdir": workdir, "uid": uid,
      "python": os.path.realpath(sys.executable), "hide": hide, "expose": expose,
      "unshare_net": not limits.allow_network, "net_flag": _CLONE_NEWNET,
      "limits": dataclasses.asdict(limits),
  }
  run = _Run()
  with tempfile.TemporaryFile() as stdin_file:
    stdin_file.write(stdin)
    stdin_file.seek(0)
    try:
      proc = subprocess.Popen(
          [sys.executable, "-I", "-S", os.path.abspath(__file__),
           marshal.dumps(config).hex()],
          stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          pass_fds=(result_w,), start_new_session=True, env={"PATH": _CHILD_PATH})
    except OSError as e:
      os.close(result_r)
      os.close(result_w)
      raise SandboxUnavailable(f"cannot start the sandbox launcher {sys.executable}: {e}") from e
  os.close(result_w)
  init_pidfd = None
  try:
    init_pidfd = _pump(proc, result_r, limits, run)
  finally:
    os.close(result_r)
    if proc.poll() is None:
      _killpg(proc.pid)
    proc.wait()
    if init_pidfd is not None:
      poller = select.poll()  # a pidfd is readable once the process has exited,
      poller.register(init_pidfd, select.POLLIN)  # i.e. its namespace is torn down
      poller.poll(_KILL_GRACE_SECONDS * 1000)
      os.close(init_pidfd)
  return run


def _killpg(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def _pump(proc: subprocess.Popen, result_r: int, limits: Limits, run: _Run) -> int | None:
  """Read stdout, stderr and the launcher's reports until all close; enforce the
  wall-clock and output limits. Returns a pidfd of the namespace's init."""
  out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
  buffers = {out_fd: bytearray(), err_fd: bytearray()}
  reports = bytearray()
  open_fds = {out_fd, err_fd, result_r}
  poller = select.poll()  # not select.select: fd numbers may exceed 1023 in a busy trainer
  for fd in open_fds:
    poller.register(fd, select.POLLIN)
  deadline = time.monotonic() + limits.wall_seconds
  hard_deadline = None
  init_pidfd = None

  def kill(reason: str) -> None:
    nonlocal hard_deadline
    if run.killed_for is None:
      run.killed_for = reason
    if init_pidfd is not None:
      try:
        signal.pidfd_send_signal(init_pidfd, signal.SIGKILL)
      except ProcessLookupError:
        pass
    else:
      _killpg(proc.pid)
    hard_deadline = time.monotonic() + _KILL_GRACE_SECONDS

  try:
    while open_fds:
      now = time.monotonic()
      if hard_deadline is not None and now >= hard_deadline:
        _killpg(proc.pid)  # the launcher did not exit after init died: give up reading
        break
      if run.killed_for is None and now >= deadline:
        kill("wall")
        continue
      wait = (hard_deadline if hard_deadline is not None else deadline) - now
      for fd, _ in poller.poll(math.ceil(max(wait, 0.0) * 1000)):
        chunk = os.read(fd, 1 << 16)
        if not chunk:
          open_fds.discard(fd)
          poller.unregister(fd)
          continue
        if fd == result_r:
          reports += chunk
          while b"\n" in reports:
            line, _, rest = bytes(reports).partition(b"\n")
            reports[:] = rest
            message = ast.literal_eval(line.decode())
            run.messages.append(message)
            if "init_pid" in message and init_pidfd is None:
              try:
                init_pidfd = os.pidfd_open(message["init_pid"])
              except OSError:  # already gone, or no pidfds (Linux < 5.3): kill the group
                pass
              if run.killed_for is not None:
                kill(run.killed_for)
          continue
        buf = buffers[fd]
        room = limits.max_output_bytes - len(buf)
        buf += chunk[:max(room, 0)]
        if len(chunk) > room and run.killed_for is None:
          kill("output")
  finally:
    run.stdout, run.stderr = bytes(buffers[out_fd]), bytes(buffers[err_fd])
  return init_pidfd


def _last_line(text: str) -> str:
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1][:500] if lines else ""


def _judge(run: _Run, limits: Limits, uid: int, wall: float) -> Verdict:
  stdout = run.stdout.decode("utf-8", errors="replace")
  stderr = run.stderr.decode("utf-8", errors="replace")

  def verdict(status: str, detail: str, returncode: int | None = None) -> Verdict:
    return Verdict(status, detail, stdout, stderr, returncode, wall, uid)

  info = {}
  for message in run.messages:
    info.update(message)
  if "unavailable" in info:
    raise SandboxUnavailable(info["unavailable"])
  exit_info = info.get("exit")
  returncode = None if exit_info is None else os.waitstatus_to_exitcode(exit_info["wstatus"])
  if run.killed_for == "output":
    return verdict("output_limit",
                   f"more than {limits.max_output_bytes} bytes on stdout or stderr", returncode)
  if run.killed_for == "wall":
    return verdict("timeout", f"wall-clock limit of {limits.wall_seconds:g} s exceeded",
                   returncode)
  if "error" in info:
    return verdict("error", f"sandbox: {info['error']}")
  if exit_info is None:
    return verdict("error", "sandbox: the launcher ended without reporting an exit status "
                   f"(stderr: {_last_line(stderr)!r})")
  last = _last_line(stderr)
  cpu = exit_info["utime"] + exit_info["stime"]
  if returncode == 0:
    return verdict("passed", "", 0)
  if returncode < 0:
    sig = -returncode
    try:
      name = signal.Signals(sig).name
    except ValueError:  # e.g. a real-time signal
      name = f"signal {sig}"
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= math.ceil(limits.cpu_seconds)):
      return verdict("timeout", f"CPU limit of {limits.cpu_seconds:g} s exceeded", returncode)
    if sig == signal.SIGKILL and exit_info["maxrss_kb"] * 1024 >= 0.9 * limits.memory_bytes:
      return verdict("memory", f"killed near the memory limit of {limits.memory_bytes} bytes",
                     returncode)
    return verdict("failed", f"killed by {name}" + (f" ({last})" if last else ""), returncode)
  if "MemoryError" in last or "memory allocation failed" in last.lower():
    return verdict("memory", last, returncode)
  return verdict("failed", last or f"exit code {returncode}", returncode)


