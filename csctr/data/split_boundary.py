"""The time split's boundary in bounded memory, for both prepare paths.

Split by timestamp, the latest config.byod.test_fraction of the usable
impressions is test, ties at the boundary all in test: the boundary is the
k-th smallest timestamp, k = int(total * (1 - test_fraction)). A histogram
of every distinct timestamp finds it in one pass but holds 16 bytes per row
of a log whose timestamps are unique, so peak memory would grow with the
log. Three passes over the keys (csctr.data.byod_log.Reader.key_chunks or
block_keys: two columns, vectorised for Parquet) find it exactly instead:

  pass 0a  key_range: min and max usable key (merged by merge_ranges),
  pass 0b  coarse_histogram: counts in BINS equal bins over that range
           (merged by +) -> target(): the bin holding the boundary row and
           its rank there,
  pass 0c  fine_histogram: the exact histogram of that bin's keys only
           (merged by merge_histograms) -> boundary().

Memory: BINS counters plus the distinct keys of one bin. Every merge is
order-free, so Beam's CombineFns (csctr.data.beam_prepare) give the same
boundary as the in-process loop (time_boundary).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

KeyChunk = tuple[np.ndarray, np.ndarray]  # as byod_log.KeyChunk


def merge_histograms(*hists: tuple[np.ndarray, np.ndarray]
                     ) -> tuple[np.ndarray, np.ndarray]:
  keys = np.concatenate([k for k, _ in hists])
  counts = np.concatenate([c for _, c in hists])
  uniq, inverse = np.unique(keys, return_inverse=True)
  return uniq, np.bincount(inverse.reshape(-1), counts, len(uniq)).astype(
      np.int64)


BINS = 1 << 16


def _usable_keys(keys: KeyChunk, good: np.ndarray) -> np.ndarray:
  items, k = keys
  ok = items >= 0
  ok[ok] = good[items[ok]]
  return k[ok]


def key_range(keys: KeyChunk, good: np.ndarray) -> np.ndarray:
  k = _usable_keys(keys, good)
  return np.array([k.min(), k.max()] if len(k) else [np.inf, -np.inf])


def merge_ranges(*ranges: np.ndarray) -> np.ndarray:
  r = np.stack([np.array([np.inf, -np.inf]), *ranges])
  return np.array([r[:, 0].min(), r[:, 1].max()])


def _bins(k: np.ndarray, key_range_: np.ndarray) -> np.ndarray:
  lo, hi = key_range_
  width = (hi - lo) / BINS if hi > lo else 1.0
  return np.clip(((k - lo) / width).astype(np.int64), 0, BINS - 1)


def coarse_histogram(keys: KeyChunk, good: np.ndarray,
                     key_range_: np.ndarray) -> np.ndarray:
  return np.bincount(_bins(_usable_keys(keys, good), key_range_),
                     minlength=BINS).astype(np.int64)


def target(reader: Any, coarse: np.ndarray) -> tuple[int, int]:
  """(bin holding the first test row, its rank in the bin); (-1, 0): no
  test row (test_fraction rounds to none)."""
  cum = np.cumsum(coarse)
  total = int(cum[-1]) if len(cum) else 0
  k = int(total * (1.0 - reader.test_fraction))
  if k >= total:
    return -1, 0
  b = int(np.searchsorted(cum, k, side="right"))
  return b, k - (int(cum[b - 1]) if b else 0)


def fine_histogram(keys: KeyChunk, good: np.ndarray,
                   key_range_: np.ndarray, bin_: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Distinct usable keys in coarse bin `bin_`, with counts."""
  k = _usable_keys(keys, good)
  return np.unique(k[_bins(k, key_range_) == bin_], return_counts=True)


def boundary(reader: Any, goal: tuple[int, int] | None = None,
             fine: tuple[np.ndarray, np.ndarray] | None = None) -> float:
  """Split key at which test starts: the latest test_fraction by timestamp
  (ties at the boundary all go to test); 0.5 for split columns and hashes.

  For 'time' only, which is why that mode reads the log more than the
  others: `goal` = target(coarse), `fine` = the merged fine_histogram.
  """
  if reader.mode != "time":
    return 0.5
  if goal[0] < 0:
    return math.inf
  keys, counts = fine
  cum = np.cumsum(counts)
  return float(keys[np.searchsorted(cum, goal[1], side="right")])


def time_boundary(reader: Any, good: np.ndarray) -> float:
  """The three key passes of a time split, in order (the in-process path)."""
  rng = np.array([np.inf, -np.inf])
  for keys in reader.key_chunks():
    rng = merge_ranges(rng, key_range(keys, good))
  coarse = np.zeros(BINS, np.int64)
  for keys in reader.key_chunks():
    coarse += coarse_histogram(keys, good, rng)
  goal = target(reader, coarse)
  fine = (np.zeros(0), np.zeros(0, np.int64))
  for keys in reader.key_chunks() if goal[0] >= 0 else ():
    fine = merge_histograms(fine, fine_histogram(keys, good, rng, goal[0]))
  return boundary(reader, goal, fine)
