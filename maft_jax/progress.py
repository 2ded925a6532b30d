"""One progress line on stderr, rewritten in place (sampling, training).

    bar = progress.Line("sampling", total=P, unit="prompts", enabled=True)
    bar.update(done, tokens, detail="...")   # "sampling: 3/8 prompts, ..., 120 tok/s, ETA 9s"
    bar.close()                              # ends the line
"""

from __future__ import annotations

import sys
import time


class Line:
  """`tokens` counts what the rate is of since the line began."""

  def __init__(self, label: str, *, total: int, unit: str, enabled: bool = True, start: int = 0):
    self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
    self.start, self.t0, self.shown = start, time.perf_counter(), False

  def update(self, done: int, tokens: int, detail: str = "") -> None:
    if not self.enabled:
      return
    elapsed = max(time.perf_counter() - self.t0, 1e-9)
    eta = elapsed / max(done - self.start, 1) * (self.total - done)
    sys.stderr.write(f"\r{self.label}: {done}/{self.total} {self.unit}"
                     f"{', ' + detail if detail else ''}, {tokens / elapsed:,.0f} tok/s, "
                     f"ETA {eta:.0f}s ")
    sys.stderr.flush()
    self.shown = True

  def close(self) -> None:
    if self.enabled and self.shown:
      sys.stderr.write("\n")
      sys.stderr.flush()
