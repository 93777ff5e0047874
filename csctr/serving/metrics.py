"""Prometheus text-format counters and histograms, thread-safe, no dependency.

The scorer service updates them from two threads (the HTTP event loop and
the batching thread); one lock guards every update and the rendering, so a
scrape never sees half of an update. Exposition format 0.0.4:
https://prometheus.io/docs/instrumenting/exposition_formats/
"""

from __future__ import annotations

import bisect
import threading
from typing import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(labels: dict[str, str]) -> str:
  if not labels:
    return ""
  esc = lambda v: str(v).replace("\\", r"\\").replace('"', r"\"").replace(
      "\n", r"\n")
  return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(
      labels.items())) + "}"


class Registry:
  """Counters, gauges and histograms by (name, labels), one lock."""

  def __init__(self):
    self.lock = threading.Lock()
    self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
    self._values: dict[str, dict[str, float]] = {}  # name -> labels -> v
    self._hist: dict[str, tuple[list[float], dict[str, list[float]]]] = {}

  def counter(self, name: str, help_text: str) -> None:
    self._help[name] = ("counter", help_text)
    self._values.setdefault(name, {})

  def gauge(self, name: str, help_text: str) -> None:
    self._help[name] = ("gauge", help_text)
    self._values.setdefault(name, {})

  def histogram(self, name: str, help_text: str,
                buckets: Sequence[float]) -> None:
    self._help[name] = ("histogram", help_text)
    self._hist[name] = (sorted(buckets), {})

  def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
    key = _labels(labels)
    with self.lock:
      series = self._values[name]
      series[key] = series.get(key, 0.0) + value

  def set(self, name: str, value: float, **labels: str) -> None:
    with self.lock:
      self._values[name][_labels(labels)] = value

  def replace(self, name: str, value: float, **labels: str) -> None:
    """Sets one series and drops the others (an info metric's new labels)."""
    with self.lock:
      self._values[name] = {_labels(labels): value}

  def observe(self, name: str, value: float, **labels: str) -> None:
    bounds, series = self._hist[name]
    key = _labels(labels)
    with self.lock:
      # [count per bucket..., +Inf count, sum]
      h = series.setdefault(key, [0.0] * (len(bounds) + 2))
      h[bisect.bisect_left(bounds, value)] += 1
      h[-1] += value

  def get(self, name: str, **labels: str) -> float:
    with self.lock:
      return self._values[name].get(_labels(labels), 0.0)

  def render(self) -> bytes:
    out = []
    with self.lock:
      for name, (kind, help_text) in self._help.items():
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        if kind != "histogram":
          out += [f"{name}{k} {v:g}" for k, v in self._values[name].items()]
          continue
        bounds, series = self._hist[name]
        for key, h in series.items():
          inner = key[1:-1]
          sep = "," if inner else ""
          total = 0.0
          for bound, count in zip([*bounds, float("inf")], h[:-1]):
            total += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{{inner}{sep}le="{le}"}} {total:g}')
          out.append(f"{name}_sum{key} {h[-1]:g}")
          out.append(f"{name}_count{key} {total:g}")
    return ("\n".join(out) + "\n").encode()
