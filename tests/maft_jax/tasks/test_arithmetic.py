"""maft_jax.tasks.arithmetic: the generator and checker (hypothesis)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from maft_jax import tasks
from maft_jax.tasks import arithmetic


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
