"""The I/O layer: writes are whole or absent, readers name what is wrong."""

import json
import os

import pytest

from maft_jax import files


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = str(tmp_path / "s.json")
  files.write_json(path, {"x": 1})
  with pytest.raises(TypeError):
    files.write_json(path, {"x": object()})     # fails while writing
  assert files.read_json(path) == {"x": 1} and os.listdir(tmp_path) == ["s.json"]
  files.write_jsonl(str(tmp_path / "r.jsonl"), [{"a": 1}, {"a": 2}])
  assert list(files.read_jsonl(str(tmp_path / "r.jsonl"))) == [(1, {"a": 1}), (2, {"a": 2})]
  with pytest.raises(RuntimeError):
    with files.atomic(str(tmp_path / "b.bin")) as f:
      f.write(b"half")
      raise RuntimeError("killed mid-write")
  assert sorted(os.listdir(tmp_path)) == ["r.jsonl", "s.json"]


def test_commit_dir_replaces_an_older_directory_whole(tmp_path):
  final, partial = str(tmp_path / "d"), str(tmp_path / "d.partial")
  for version in (1, 2):
    os.makedirs(partial)
    files.write_json(os.path.join(partial, "v.json"), version)
    files.commit_dir(partial, final)
    assert files.read_json(os.path.join(final, "v.json")) == version
  assert sorted(os.listdir(tmp_path)) == ["d"]


def test_readers_name_the_file_and_line(tmp_path):
  with pytest.raises(files.FileError, match=r"nope\.json: missing"):
    files.read_json(str(tmp_path / "nope.json"))
  (tmp_path / "cut.json").write_text('{"a": ')
  with pytest.raises(files.FileError, match=r"cut\.json: not valid JSON .*damaged"):
    files.read_json(str(tmp_path / "cut.json"))
  (tmp_path / "r.jsonl").write_text(json.dumps({"a": 1}) + "\n\n{oops\n")
  with pytest.raises(files.FileError, match=r"r\.jsonl:3: malformed record \(not valid JSON"):
    list(files.read_jsonl(str(tmp_path / "r.jsonl")))
  # A directory where a file should be is named as unreadable, not a traceback.
  (tmp_path / "adir").mkdir()
  for read in (files.read_json, lambda p: list(files.read_jsonl(p))):
    with pytest.raises(files.FileError, match=r"adir: cannot be read"):
      read(str(tmp_path / "adir"))
