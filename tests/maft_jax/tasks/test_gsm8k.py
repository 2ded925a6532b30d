"""maft_jax.tasks.gsm8k: JSONL and parquet files load and verify; bad records are
named by file and line."""

import json

import pytest

from maft_jax import tasks
from maft_jax.tasks.base import TaskError


def _gsm8k_file(tmp_path, lines):
  path = tmp_path / "gsm8k.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


GOOD = [json.dumps({"question": f"Q{i}: what is {i}+{i}?",
                    "answer": f"{i}+{i}={2 * i}\n#### {2 * i:,}"}) for i in range(400, 440)]


def test_gsm8k_loads_and_verifies(tmp_path):
  task = tasks.load("gsm8k", path=_gsm8k_file(tmp_path, GOOD))
  problems = task.problems()
  assert len(problems) == 40 and problems[0].reference == "800"
  assert task.is_correct(r"... \boxed{800}", problems[0])
  assert task.is_correct("so that's $800.00 in total", problems[0])
  assert not task.is_correct(r"\boxed{801}", problems[0])


def test_gsm8k_bad_records(tmp_path):
  bad = GOOD[:3] + ['{"question": "broken', json.dumps({"question": "no answer"})] + GOOD[3:]
  path = _gsm8k_file(tmp_path, bad)
  with pytest.raises(TaskError, match=f"{path}:4: malformed record"):
    tasks.load("gsm8k", path=path).problems()
  fixed = bad[:3] + bad[4:]
  path2 = _gsm8k_file(tmp_path, fixed)
  with pytest.raises(TaskError, match=r"gsm8k.jsonl:4: missing field 'answer'"):
    tasks.load("gsm8k", path=path2).problems()
  task = tasks.load("gsm8k", path=path, on_bad_record="skip")
  assert len(task.problems()) == 40 and task.skipped == 1  # json skipped in read_jsonl
  with pytest.raises(TaskError, match="need at least 2"):
    tasks.load("gsm8k", path=_gsm8k_file(tmp_path, GOOD[:1])).split(10, 10)
  dup = _gsm8k_file(tmp_path, GOOD[:2] + GOOD[:1])
  with pytest.raises(TaskError, match="occurs more than once"):
    tasks.load("gsm8k", path=dup).split(1, 1)


def test_gsm8k_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [json.loads(l) for l in GOOD[:5]] + [{"question": "q", "answer": "no marker"}]
  path = str(tmp_path / "gsm8k.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)
  with pytest.raises(TaskError, match=r"gsm8k.parquet: row 6: field 'answer' does not end"):
    tasks.load("gsm8k", path=path).problems()
  task = tasks.load("gsm8k", path=path, on_bad_record="skip")
  assert [p.reference for p in task.problems()] == ["800", "802", "804", "806", "808"]
