"""Answer extraction and canonical answer keys.

A key is a string and `None` means "no answer" (no vote). For the numeric
tasks two answers are the same iff their keys are equal (`Task.same_answer`;
MATH widens the relation with math-verify). Numbers are canonicalised exactly with
`fractions.Fraction`, so `1,000`, `1000.0` and `$1000` share a key, and
`\\frac{1}{2}`, `1/2` and `0.5` share the key `1/2`.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\d(?:[\d,]*\d)?(?:\.\d+)?|-?\.\d+")
# In free text, a number may carry a sign before `$` and be a simple fraction.
_FREE_NUMBER = re.compile(r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_FRAC = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")


_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")


def boxed_spans(text: str) -> list[tuple[int, int | None]]:
  """For every `\\boxed{` (or `\\fbox{`) opening: (start of its contents,
  index just past its balanced closing brace, or None if it never closes)."""
  spans = []
  for m in _BOX_OPEN.finditer(text):
    depth, i = 1, m.end()
    while i < len(text) and depth:
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      i += 1
    spans.append((m.end(), i if depth == 0 else None))
  return spans


def boxed_contents(text: str) -> list[str]:
  """Contents of every complete `\\boxed{...}` (or `\\fbox{...}`), braces balanced."""
  return [text[start:end - 1] for start, end in boxed_spans(text) if end is not None]


def last_boxed(text: str) -> str | None:
  """The contents of the last box: when a response boxes several times, the
  last wins. A last box that never closes (a response cut mid-answer) is no
  answer, even when an earlier box closed."""
  spans = boxed_spans(text)
  if not spans or spans[-1][1] is None:
    return None
  start, end = spans[-1]
  return text[start:end - 1].strip()


def number_key(s: str) -> str | None:
  """Canonical key of a string that is one number, or None.

  Accepts thousands separators, a leading `$`, trailing units or a period,
  `\\frac{a}{b}`, `a/b`, percent signs and LaTeX spacing; rejects anything
  holding more than one number.
  """
  s = s.strip()
  s = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", s)
  s = s.replace("{,}", ",").replace("\\$", "$").replace("\\!", "").replace("\\,", "").replace("\\%", "%")
  s = s.strip().rstrip(".").strip()
  m = _FRAC.match(s)
  if m:
    num, den = number_key(m.group(1)), number_key(m.group(2))
    if num is None or den is None or Fraction(den) == 0:
      return None
    return _key(Fraction(num) / Fraction(den))
  s = s.lstrip("$").strip()
  s = re.sub(r"^(-?)\s*\$", r"\1", s)
  m = re.fullmatch(r"(-?\d+)\s*/\s*(\d+)", s)
  if m:
    return None if int(m.group(2)) == 0 else _key(Fraction(int(m.group(1)), int(m.group(2))))
  numbers = _NUMBER.findall(s)
  if len(numbers) != 1:
    return None
  rest = s.replace(numbers[0], "", 1).strip()
  # What may surround the number: a unit word or a percent sign, not more maths.
  if rest and not re.fullmatch(r"%|[A-Za-z][A-Za-z .]*", rest):
    return None
  raw = numbers[0].replace(",", "")
  if "," in numbers[0] and not re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", numbers[0]):
    return None  # "1,2" is a list, not a thousands separator
  return _key(Fraction(raw))


def _key(x: Fraction) -> str:
  return str(x)  # "1000", "-3", "1/2": exact, unique per value


def last_number(text: str) -> str | None:
  """Key of the last number in free text (the fallback when nothing is boxed)."""
  numbers = _FREE_NUMBER.findall(text)
  for raw in reversed(numbers):
    key = number_key(raw)
    if key is not None:
      return key
  return None


def numeric_answer(text: str) -> str | None:
  """Key of a response's numeric answer: the last box if it boxed, else the
  last number."""
  if boxed_spans(text):  # boxed: the last box decides (an unclosed one is no answer)
    box = last_boxed(text)
    return None if box is None else number_key(box)
  return last_number(text)
