"""Tasks: answer keys, verification, splits, prompts, bad input."""

import dataclasses
import json
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from maft_jax import tasks
from maft_jax.tasks import answers, arithmetic, base, prompts
from maft_jax.tasks.base import TaskError

# (response text, expected key): the tricky cases.
NUMERIC = [
    (r"so the answer is \boxed{\frac{1}{2}}", "1/2"),
    ("0.5", "1/2"),
    (r"\boxed{\dfrac{3}{6}}", "1/2"),
    ("1/2", "1/2"),
    (r"\boxed{1,000}", "1000"),
    ("The total is 1000.", "1000"),
    (r"\boxed{1{,}000}", "1000"),
    ("$18.00", "18"),
    (r"\boxed{\$18}", "18"),
    (r"\boxed{18 dollars}", "18"),
    ("It costs -$5.", "-5"),
    (r"\boxed{-0.50}", "-1/2"),
    (r"\boxed{7.0}", "7"),
    (r"first \boxed{3}, on reflection \boxed{4}", "4"),            # several boxes: last wins
    (r"\boxed{\text{a } \boxed{12}} then \boxed{\text{13}}", "13"),  # nested braces
    (r"\boxed{x + 1}", None),                                        # not a number
    ("no numbers here", None),
    ("", None),
    ("1,2", None),                                                   # a list, not 12
]


@pytest.mark.parametrize("text,key", NUMERIC)
def test_numeric_answer_table(text, key):
  assert answers.numeric_answer(text) == key


def test_boxed_contents_balances_braces():
  assert answers.boxed_contents(r"\boxed{\frac{a}{b}} x \boxed{{1}}") == [r"\frac{a}{b}", "{1}"]
  assert answers.last_boxed(r"\boxed{unclosed") is None


@given(seed=st.integers(0, 2**31 - 1), index=st.integers(0, 10**6))
@settings(max_examples=200, deadline=None)
def test_arithmetic_generator_and_checker(seed, index):
  p = arithmetic.make_problem(seed, index)
  a, b, c, d, e, f = p.fields["operands"]
  assert all(0 <= x <= 30 for x in (a, b, c, d, e, f))
  assert p.question == f"What is the result of {a}+{b}*{c}+{d}-{e}*{f}?"
  value = a + b * c + d - e * f
  assert p.reference == str(value)
  task = tasks.load("arithmetic", size=1, seed=seed)
  assert task.is_correct(f"... so \\boxed{{{value}}}", p)
  assert task.is_correct(f"The answer is {value}.", p)
  assert not task.is_correct(f"\\boxed{{{value + 1}}}", p)
  assert not task.is_correct("I don't know", p)
  assert arithmetic.make_problem(seed, index) == p  # deterministic


def test_split_sizes_are_exact_disjoint_seeded_and_the_same_in_another_process():
  task = tasks.load("arithmetic", size=1200, seed=3)
  split = task.split(train_size=500, test_size=500)
  train, test = [p.id for p in split.train], [p.id for p in split.test]
  assert len(train) == 500 and len(test) == 500 and not set(train) & set(test)
  code = ("from maft_jax import tasks; import json; s = tasks.load('arithmetic', size=1200, "
          "seed=3).split(500, 500); print(json.dumps([[p.id for p in s.train], "
          "[p.id for p in s.test]]))")
  other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert json.loads(other.stdout) == [train, test]
  assert task.split(500, 500) == split                     # a second run
  # A shuffle, not the file order; its seed is a task option.
  assert test != [p.id for p in task.problems()[:500]]
  reseeded = tasks.load("arithmetic", size=1200, seed=3, split_seed=1).split(500, 500)
  assert [p.id for p in reseeded.test] != test
  # The file's order does not matter: the order is a hash of (seed, id).
  reversed_split = base.split_problems(task.problems()[::-1], 500, 500, seed=0)
  assert reversed_split == split
  # A source smaller than both: divided in the ratio, at least one each.
  small = tasks.load("arithmetic", size=10).split(train_size=500, test_size=500)
  assert (len(small.train), len(small.test)) == (5, 5)
  small = tasks.load("arithmetic", size=10).split(train_size=8, test_size=1)
  assert (len(small.train), len(small.test)) == (8, 1)


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


def test_unknown_task_and_option():
  with pytest.raises(TaskError, match="unknown task 'nope'; tasks: arithmetic, gsm8k, humaneval, math"):
    tasks.load("nope")
  with pytest.raises(TaskError, match="task 'arithmetic' has no option colour; its options: "
                     "max_value, seed, size, split_seed"):
    tasks.load("arithmetic", colour=1)


def test_prompts(tokenizer_dir):
  from maft_jax.tokenizer import Tokenizer
  p = arithmetic.make_problem(0, 0)
  r1 = prompts.round1(p)
  assert p.question in r1[0]["content"] and "\\boxed{answer}" in r1[0]["content"]
  r2 = prompts.debate_round(p, own="I think 3", others=["agent says 4", "agent says 5"])
  assert r2[1] == {"role": "assistant", "content": "I think 3"}
  assert r2[2]["content"].count("One agent solution:") == 2
  text, special = prompts.to_text(r2, Tokenizer(tokenizer_dir))
  assert not special and text.endswith("assistant:") and "agent says 5" in text
  plain, special = prompts.to_text(r1)
  assert special and plain.startswith("Can you solve")


# --- math ---------------------------------------------------------------------

MATH_RECORDS = [
    {"problem": "Compute 1/2.", "solution": r"It is $\boxed{\frac{1}{2}}$.", "level": "Level 1",
     "type": "Algebra"},
    {"problem": "Simplify sqrt(8).", "solution": r"$\sqrt{8} = \boxed{2\sqrt{2}}$",
     "level": "Level 3", "type": "Algebra"},
    {"problem": "Solve x+1=3.", "solution": r"So $x = \boxed{2}$.", "level": "Level 5",
     "type": "Algebra"},
    {"problem": "Interval?", "solution": r"$\boxed{\left(1, 2\right)}$", "level": "Level ?",
     "type": "Algebra"},
]


@pytest.fixture
def math_task(tmp_path):
  path = tmp_path / "math.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in MATH_RECORDS))
  return tasks.load("math", path=str(path))


@pytest.mark.parametrize("index,response,correct", [
    (0, r"... \boxed{0.5}", True),
    (0, r"... \boxed{\dfrac{1}{2}}", True),
    (0, r"... \boxed{\frac{2}{4}}", True),
    (0, r"\boxed{\frac{1}{2}} no wait \boxed{\frac{1}{3}}", False),  # last box wins
    (1, r"\boxed{\sqrt{8}}", True),
    (1, r"\boxed{2 \sqrt 2}", True),
    (1, r"\boxed{3\sqrt{2}}", False),
    (2, "x equals 2 but I never boxed it", False),
    (3, r"\boxed{(1,2)}", True),
])
def test_math_equivalence(math_task, index, response, correct):
  problem = math_task.problems()[index]
  assert math_task.is_correct(response, problem) is correct


@pytest.mark.parametrize("a,b,same", [
    ("3x", "3", False), ("3i", "3", False), ("x=5", "5", True), ("2(x+1)", "2x+2", True),
    (r"\frac{1}{2}", "0.5", True), (r"\dfrac12", "1/2", True), ("1,000", "1000", True),
    (r"2\sqrt{2}", r"3\sqrt{2}", False), (r"2\sqrt{2}", r"\sqrt{8}", True),
])
def test_math_votes_and_grades_in_one_relation(math_task, a, b, same):
  """Two boxed answers vote together exactly when grading calls them the same."""
  key = math_task.extract_answer
  ka, kb = key(rf"so \boxed{{{a}}}"), key(rf"\boxed {{{b}}}.")
  assert (math_task.answer_classes([ka, kb]) == [0, 0]) is same
  problem = dataclasses.replace(math_task.problems()[0], reference=a)
  assert math_task.is_correct(rf"\boxed{{{b}}}", problem) is same


def test_math_keys_levels_and_threads(math_task, tmp_path):
  key = math_task.extract_answer
  assert key("nothing boxed") is None and key(r"\boxed{}") is None
  assert key(r"\boxed {5}") == "5"
  # A last box that never closes is no answer, even after a closed one.
  assert key(r"\boxed{4} no, it is \boxed{\frac{5}{") is None
  assert answers.numeric_answer(r"\boxed{4} no, it is \boxed{5") is None
  path = tmp_path / "m.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in MATH_RECORDS))
  assert [p.fields["level"] for p in tasks.load("math", path=str(path), levels="1,5")
          .problems()] == [1, 5]
  # math-verify's default timeout uses signals: it must work off the main thread.
  from concurrent.futures import ThreadPoolExecutor
  problems = math_task.problems()
  with ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda p: math_task.is_correct(r"\boxed{0.5}", p), problems))
  assert results == [True, False, False, False]


def test_math_bad_records(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"problem": "p", "solution": "no box", "level": "Level 1"}) + "\n")
  with pytest.raises(TaskError, match=r"bad.jsonl:1: field 'solution' has no \\boxed"):
    tasks.load("math", path=str(path)).problems()
  with pytest.raises(TaskError, match="levels are 1..5"):
    tasks.load("math", path=str(path), levels="7")


# --- multiple choice ------------------------------------------------------------

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


# --- reasoning-gym --------------------------------------------------------------

def test_reasoning_gym_uses_its_scorer():
  task = tasks.load("reasoning_gym:basic_arithmetic", size=20, seed=1)
  problems = task.problems()
  assert len(problems) == 20 and len({p.id for p in problems}) == 20
  p = problems[0]
  assert task.is_correct(f"so \\boxed{{{p.reference}}}", p)
  assert not task.is_correct(r"\boxed{not a number}", p)
  assert not task.is_correct(p.reference, p)  # unboxed: no answer
  with pytest.raises(TaskError, match="reasoning_gym:no_such_dataset"):
    tasks.load("reasoning_gym:no_such_dataset")


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


# --- humaneval (runs completions in maft_jax.tasks.sandbox) ---------------------------

def test_humaneval_canonical_passes_and_wrong_fails():
  from maft_jax.tasks import sandbox
  try:
    task = tasks.load("humaneval", limits=sandbox.Limits(wall_seconds=20))
  except sandbox.SandboxUnavailable as e:
    pytest.skip(str(e))
  problems = task.problems()
  assert len(problems) == 164
  chosen = problems[:6]
  # Base-model style (continue the prompt) and chat style (a fenced whole function).
  texts = [p.reference for p in chosen]
  p0 = chosen[0]
  fenced = f"Here you go:\n```python\n{p0.question}{p0.reference}\n```\nDone."
  wrong = "    return None\n"
  verdicts = task.verdicts(texts + [fenced, wrong], chosen + [p0, p0])
  assert [v.passed for v in verdicts] == [True] * 7 + [False]
  assert verdicts[-1].status == "failed"
  assert task.is_correct_many([wrong, p0.reference], [p0, p0]) == [False, True]
  assert task.extract_answer("x = 1  # comment\n\n") == "x = 1"
