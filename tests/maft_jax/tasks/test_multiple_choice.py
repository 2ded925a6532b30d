"""maft_jax.tasks.multiple_choice: JSONL and CSV files."""

import json

import pytest

from maft_jax import tasks
from maft_jax.tasks.base import TaskError


def test_multiple_choice_jsonl_and_csv(tmp_path):
  jl = tmp_path / "mc.jsonl"
  jl.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1})
                + "\n" + json.dumps({"question": "Sky?", "choices": ["blue", "red"],
                                     "answer": "a"}) + "\n")
  task = tasks.load("multiple_choice", path=str(jl))
  p0, p1 = task.problems()
  assert p0.reference == "B" and p1.reference == "A" and "B) 4" in p0.question
  for text, key in [(r"\boxed{B}", "B"), (r"\boxed{(c)}", "C"), (r"\boxed{\text{D}}", "D"),
                    ("The answer is (B).", "B"), ("I pick (A) ... no, (C)", "C"),
                    ("answer: D", "D"), ("no idea", None), (r"\boxed{42}", None)]:
    assert task.extract_answer(text) == key, text
  assert task.is_correct(r"\boxed{B}", p0) and not task.is_correct(r"\boxed{A}", p0)
  csv_path = tmp_path / "mmlu.csv"
  csv_path.write_text('"What, exactly?",w,x,y,z,D\nQ2,a,b,c,d,A\n')
  c0, c1 = tasks.load("multiple_choice", path=str(csv_path)).problems()
  assert c0.reference == "D" and c0.question.startswith("What, exactly?")
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "E"}) + "\n")
  with pytest.raises(TaskError, match=r"bad.jsonl:1: field 'answer'='E' is not one of AB"):
    tasks.load("multiple_choice", path=str(bad)).problems()
