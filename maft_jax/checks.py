"""One error for a setting out of range, raised by the settings dataclasses
of the library (`generation.Options`, `sft.Settings`, `finetune.Hyper`, ...).

Each rule is written once, where the setting is used; `config.validate`
builds those dataclasses and turns a `SettingError` into a `ConfigError` that
names the config field the setting came from.
"""

from __future__ import annotations

from typing import Any


class SettingError(ValueError):
  """`field` (the setting's own name) has `value`, which breaks the rule `why`."""

  def __init__(self, field: str, value: Any, why: str):
    super().__init__(f"{field}={value!r}: {why}")
    self.field, self.value, self.why = field, value, why


def check(ok: bool, field: str, value: Any, why: str) -> None:
  if not ok:
    raise SettingError(field, value, why)


def at_least(obj: Any, low: int, *fields: str) -> None:
  """Each of `obj`'s `fields` is >= low."""
  for name in fields:
    check(getattr(obj, name) >= low, name, getattr(obj, name), f"must be >= {low}")
