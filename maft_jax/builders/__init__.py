"""Base models that a run builds itself instead of reading (`model.source`).

A builder is a module with two functions:

    build(out_dir, preset, *, task_options, log, progress) -> HF model directory
    architecture(preset) -> the config.json it would write (for `--dry_run`)

`build` reuses `out_dir` when it already holds what the same settings build.
The driver builds it on the primary process into `<workdir>/<source>_base`
and then reads it as any HF directory; nothing else in the library knows a
builder by name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BUILDERS = {"demo": "maft_jax.builders.demo"}   # model.source -> module


def get(name: str) -> ModuleType:
  return importlib.import_module(BUILDERS[name])
