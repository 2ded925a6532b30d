"""Files written whole or not at all, and readers that name what is wrong.

A writer writes a temporary file beside its target, flushes it to the disk
(fsync), and renames it over the target: a reader, or a run killed mid-write,
sees the old file or the new one, never half of one; after a power loss a
file that exists holds what was written. `commit_dir` does the same for a
directory written as `<dir>.partial`. Readers raise `FileError` naming the
path (and the line of a JSONL file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO


class FileError(ValueError):
  """A file that is missing or damaged; the message names it."""


def _sync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic(path: str) -> Iterator[BinaryIO]:
  """A binary file to write `path` through: it replaces `path` when the
  block ends without an error (flushed and fsynced first), and is removed
  otherwise."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _sync_dir(os.path.dirname(os.path.abspath(path)))


def write_bytes(path: str, data: bytes) -> None:
  with atomic(path) as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str, obj: Any, *, indent: int | None = 1) -> None:
  """`obj` as JSON, ending with a newline."""
  write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
  write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


_DIGESTS: dict = {}


def sha256(root: str, names: Iterable[str]) -> str:
  """sha256 of the named files under `root` (their names and bytes, in name
  order). Memoised on the files' sizes and modification times, so a process
  hashes an unchanged multi-GB base once, however often it checks it."""
  stats = []
  for name in sorted(names):
    st = os.stat(os.path.join(root, name))
    stats.append((name, st.st_size, st.st_mtime_ns))
  key = (os.path.abspath(root), tuple(stats))
  if key not in _DIGESTS:
    h = hashlib.sha256()
    for name, _, _ in stats:
      h.update(name.encode() + b"\0")
      with open(os.path.join(root, name), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):  # noqa: B023
          h.update(chunk)
    _DIGESTS[key] = h.hexdigest()
  return _DIGESTS[key]


def tree_files(root: str, *subdirs: str) -> list[str]:
  """Every file under root/<subdir> (each that exists), relative to `root`."""
  out = []
  for sub in subdirs:
    for d, _, names in os.walk(os.path.join(root, sub)):
      out += [os.path.relpath(os.path.join(d, n), root) for n in names]
  return sorted(out)


def commit_dir(partial: str, final: str) -> None:
  """Rename the finished directory `partial` to `final`. An older `final`
  is moved aside to `final.old` first and removed last, so at every moment
  one of the two is whole under its name."""
  _sync_dir(partial)
  old = final + ".old"
  shutil.rmtree(old, ignore_errors=True)
  if os.path.exists(final):
    os.replace(final, old)
  os.replace(partial, final)
  _sync_dir(os.path.dirname(os.path.abspath(final)))
  shutil.rmtree(old, ignore_errors=True)


def _open(path: str, error: type[Exception]):
  """`path` open for reading text; a missing or unreadable one raises `error` naming it."""
  try:
    return open(path, encoding="utf-8")
  except FileNotFoundError:
    raise error(f"{path}: missing") from None
  except OSError as e:  # a directory, no permission, ...
    raise error(f"{path}: cannot be read ({e.strerror or e})") from None


def read_json(path: str, *, error: type[Exception] = FileError) -> Any:
  """The JSON value in `path`; a missing or damaged file raises `error` naming it."""
  with _open(path, error) as f:
    try:
      return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise error(f"{path}: not valid JSON ({e}); the file is damaged") from None


def read_jsonl(path: str, *, on_bad_record: str = "error", error: type[Exception] = FileError
               ) -> Iterator[tuple[int, dict]]:
  """(line number, record) of every non-blank line; each must be a JSON
  object. A missing file or a malformed line raises `error` naming the file
  (and line); with on_bad_record="skip" malformed lines are skipped, counted
  and logged instead."""
  if on_bad_record not in ("error", "skip"):
    raise error(f"on_bad_record={on_bad_record!r}: 'error' or 'skip'")
  skipped = 0
  with _open(path, error) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        problem = None if isinstance(record, dict) else "not a JSON object"
      except json.JSONDecodeError as e:
        problem = f"not valid JSON: {e}"
      if problem is None:
        yield lineno, record
      elif on_bad_record == "skip":
        skipped += 1
      else:
        raise error(f"{path}:{lineno}: malformed record ({problem})")
  if skipped:
    logging.warning("%s: skipped %d malformed line(s) (on_bad_record='skip')", path, skipped)
