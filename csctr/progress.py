"""Progress of a long loop: rate and ETA, and a self-overwriting stderr line.

One meter serves training's log lines (steps/s and ETA of the steps left,
csctr/training/loop.py) and the embedding export's progress line
(csctr/serving/export.py). Standard library only, so serving may use it.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Meter:
  """Work done since the start of a timing window -> rate and ETA.

  `restart` opens a new window, e.g. after an eval or a save, which are not
  part of the loop's own rate.
  """

  def __init__(self, total: float, done: float = 0, clock=time.perf_counter):
    self.total, self._clock = total, clock
    self.restart(done)

  def restart(self, done: float) -> None:
    self.t0, self.done0 = self._clock(), done

  def elapsed(self) -> float:
    """Seconds since the window opened (never 0: rates stay finite)."""
    return max(self._clock() - self.t0, 1e-9)

  def rate(self, done: float) -> float:
    """Units per second in this window."""
    return (done - self.done0) / self.elapsed()

  def eta(self, done: float) -> float:
    """Seconds left for the units left, at this window's rate."""
    return (self.total - done) / max(self.rate(done), 1e-9)


class ProgressLine:
  """A stderr line rewritten at most every `interval` s: done/total, rate, ETA."""

  def __init__(self, label: str, unit: str, total: int, enabled: bool = True,
               interval: float = 0.5, stream: TextIO | None = None,
               clock=time.perf_counter):
    self.label, self.unit, self.enabled = label, unit, enabled
    self.interval, self.stream = interval, stream or sys.stderr
    self.meter = Meter(total, clock=clock)
    self._clock, self._last = clock, clock()

  def update(self, done: int) -> None:
    now, total = self._clock(), self.meter.total
    if not self.enabled or (now - self._last < self.interval and done < total):
      return
    self._last = now
    self.stream.write(
        f"\r{self.label}: {done}/{total} {self.unit} "
        f"({100 * done / max(total, 1):.0f}%) {self.meter.rate(done):.0f} "
        f"{self.unit}/s ETA {self.meter.eta(done):.0f}s ")
    if done >= total:
      self.stream.write("\n")
    self.stream.flush()
