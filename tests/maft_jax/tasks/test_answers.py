"""maft_jax.tasks.answers: answer keys of free-form responses, the tricky cases."""

import pytest

from maft_jax.tasks import answers


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
