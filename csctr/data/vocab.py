"""Vocabularies: raw ids (as users log them) -> rows of an ID embedding table.

One rule for every ID feature, used by the in-process prepare, the Beam
prepare and the online scorer, so a model trained on raw ids is served on
raw ids:

    row 0                 OOV: ids never seen in train, and ids seen fewer
                          than `min_count` times (so the OOV row is trained
                          on real rare ids and cold items get a learned vector)
    rows 1 .. n           the kept ids, by train count (most frequent first,
                          ties by id), so row order is deterministic
    rows n+1 .. n+H       with `hash_buckets` = H > 0: an unknown id hashes
                          (stable across processes) into one of H extra rows
                          instead of sharing the OOV row

Raw ids are strings (an integer id 17 is "17"). A vocabulary is saved as a
TSV file, `raw_id<TAB>row<TAB>count` a line after one header line; a
prepared dataset keeps one per feature under `vocab/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from typing import Any, Iterable, Mapping

import numpy as np

VOCAB_DIR = "vocab"
OOV_ROW = 0
_HEADER = "# csctr-vocab "


_POW10 = 10 ** np.arange(1, 19, dtype=np.int64)  # 10 .. 10^18
_INT64_MAX = np.iinfo(np.int64).max


def decimal_ids(values: list[str]) -> np.ndarray | None:
  """int64 [n] of `values` if every one is a canonical decimal integer.

  Canonical means what str(int) writes ("7", "-3"; not "007", "+7", " 7",
  "-0"), so a caller that maps ints instead of strings maps exactly what the
  string path would; anything else returns None and the caller takes its
  exact (slower) string path. Why: the online scorer parses every
  candidate's ids; np.fromstring over the joined text parses them in C,
  ~4x faster than int() per id, and the length check proves canonicity (a
  leading zero, sign, blank or non-digit changes the text's length or count).
  """
  if not values:
    return np.zeros((0,), np.int64)
  text = " ".join(values)
  try:
    out = np.fromstring(text, dtype=np.int64, sep=" ")
  except ValueError:  # (numpy < 2.5 warns and stops at the bad value)
    return None
  magnitude = np.abs(out)  # int64's min stays negative
  if len(out) != len(values) or magnitude.min() < 0 or (
      magnitude.max() == _INT64_MAX):  # saturated: out-of-range text
    return None
  # Now a value's text is never shorter than str() of it, so the lengths
  # are equal only if every value is canonical.
  chars = 1 + np.searchsorted(_POW10, magnitude, side="right") + (out < 0)
  if int(chars.sum()) + len(values) - 1 != len(text):
    return None
  return out


def stable_hash(raw_id: str, buckets: int) -> int:
  """Bucket of `raw_id` in [0, buckets): the same in every process and run.

  Python's hash() is salted per process, so it cannot be used for ids that
  training and serving must map alike.
  """
  digest = hashlib.blake2b(raw_id.encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") % buckets


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """A raw-id -> row map with the counts it was built from.

  Attributes:
    name: the feature, e.g. 'user_id'.
    ids: the kept raw ids; ids[i] has row i + 1.
    counts: int64 [len(ids)] train count of each kept id.
    min_count: ids with a smaller train count were sent to OOV.
    hash_buckets: extra rows for unknown ids (0: unknown -> OOV).
    oov_count: train impressions whose id went to OOV (rare ids).
  """

  name: str
  ids: tuple[str, ...]
  counts: np.ndarray
  min_count: int = 1
  hash_buckets: int = 0
  oov_count: int = 0

  def __post_init__(self):
    if len(self.ids) != len(self.counts):
      raise ValueError(f"vocabulary {self.name!r}: {len(self.ids)} ids but "
                       f"{len(self.counts)} counts")
    object.__setattr__(self, "_rows",
                       {r: i + 1 for i, r in enumerate(self.ids)})
    object.__setattr__(self, "_int_index_cache", [])  # see _int_index

  @classmethod
  def build(cls, name: str, counts: Mapping[Any, int], min_count: int = 1,
            hash_buckets: int = 0) -> "Vocabulary":
    """The vocabulary of train counts `counts` (raw id -> impressions)."""
    if min_count < 1 or hash_buckets < 0:
      raise ValueError(f"vocabulary {name!r}: min_count={min_count} must be "
                       f">= 1 and hash_buckets={hash_buckets} >= 0")
    kept = sorted(((str(k), int(c)) for k, c in counts.items()
                   if c >= min_count), key=lambda kc: (-kc[1], kc[0]))
    oov = sum(int(c) for c in counts.values() if c < min_count)
    return cls(name, tuple(k for k, _ in kept),
               np.array([c for _, c in kept], np.int64), min_count,
               hash_buckets, oov)

  @property
  def size(self) -> int:
    """Rows of the embedding table: OOV + kept ids + hash buckets."""
    return 1 + len(self.ids) + self.hash_buckets

  def row(self, raw_id: Any) -> int:
    """The row of one raw id."""
    key = str(raw_id)
    row = self._rows.get(key)  # pytype: disable=attribute-error
    if row is not None:
      return row
    if self.hash_buckets:
      return 1 + len(self.ids) + stable_hash(key, self.hash_buckets)
    return OOV_ROW

  def lookup(self, raw_ids: Iterable[Any]) -> np.ndarray:
    """int32 rows of `raw_ids` (any iterable of ids; str() is applied)."""
    keys = raw_ids if isinstance(raw_ids, list) and set(
        map(type, raw_ids)) <= {str} else [str(r) for r in raw_ids]
    index = self._int_index()
    ints = decimal_ids(keys) if index is not None else None
    if ints is not None:
      sorted_ids, sorted_rows = index
      pos = np.minimum(np.searchsorted(sorted_ids, ints), len(sorted_ids) - 1)
      rows = np.where(sorted_ids[pos] == ints, sorted_rows[pos], -1)
      return self._unknown(rows.astype(np.int32), keys)
    # The known ids in one C-level pass (the scorer maps every request's
    # ids: a Python call per id was most of its CPU); the rest one by one.
    rows = np.fromiter(map(self._rows.get, keys, itertools.repeat(-1)),  # pytype: disable=attribute-error
                       np.int32, len(keys))
    return self._unknown(rows, keys)

  def _int_index(self) -> tuple[np.ndarray, np.ndarray] | None:
    """(sorted int ids, their rows) if every kept id is a decimal integer.

    Most logs' ids are; lookup() then maps them without a dict call per id.
    Built on the first lookup, not in __init__: training builds large
    vocabularies that it never looks up this way.
    """
    cache = self._int_index_cache  # pytype: disable=attribute-error
    if not cache:
      ints = decimal_ids(list(self.ids))
      if ints is not None and len(ints):
        order = np.argsort(ints, kind="stable")
        cache.append((ints[order], (order + 1).astype(np.int32)))
      else:
        cache.append(None)
    return cache[0]

  def _unknown(self, rows: np.ndarray, keys: list[str]) -> np.ndarray:
    """Fills rows < 0 (ids not kept): OOV, or their hash bucket."""
    if not self.hash_buckets:
      rows[rows < 0] = OOV_ROW
      return rows
    for i in np.flatnonzero(rows < 0):
      rows[i] = self.row(keys[i])
    return rows

  def save(self, path: str) -> None:
    """Writes the TSV file (atomically: a reader never sees half of it)."""
    header = {"name": self.name, "min_count": self.min_count,
              "hash_buckets": self.hash_buckets, "oov_count": self.oov_count,
              "size": self.size}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(_HEADER + json.dumps(header) + "\n")
      for i, (raw, count) in enumerate(zip(self.ids, self.counts)):
        if "\t" in raw or "\n" in raw:
          raise ValueError(f"vocabulary {self.name!r}: raw id {raw!r} holds "
                           "a tab or newline")
        f.write(f"{raw}\t{i + 1}\t{int(count)}\n")
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    """Reads a file written by save(); errors name the file and line."""
    with open(path, encoding="utf-8") as f:
      first = f.readline()
      if not first.startswith(_HEADER):
        raise ValueError(f"{path}:1: not a csctr vocabulary file")
      header = json.loads(first[len(_HEADER):])
      ids, counts = [], []
      for n, line in enumerate(f, start=2):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 3 or int(parts[1]) != len(ids) + 1:
          raise ValueError(f"{path}:{n}: expected raw_id<TAB>{len(ids) + 1}"
                           f"<TAB>count, got {line!r}")
        ids.append(parts[0])
        counts.append(int(parts[2]))
    return cls(header["name"], tuple(ids), np.array(counts, np.int64),
               header["min_count"], header["hash_buckets"],
               header["oov_count"])


def vocab_path(dataset_dir: str, name: str) -> str:
  return os.path.join(dataset_dir, VOCAB_DIR, f"{name}.tsv")


def save_vocabularies(dataset_dir: str,
                      vocabs: Mapping[str, Vocabulary]) -> None:
  """One file per feature under DATASET/vocab/."""
  os.makedirs(os.path.join(dataset_dir, VOCAB_DIR), exist_ok=True)
  for name, vocab in vocabs.items():
    vocab.save(vocab_path(dataset_dir, name))


def load_vocabularies(dataset_dir: str) -> dict[str, Vocabulary]:
  """Every saved vocabulary of a prepared dataset ({} if it saved none)."""
  folder = os.path.join(dataset_dir, VOCAB_DIR)
  if not os.path.isdir(folder):
    return {}
  return {f[:-len(".tsv")]: Vocabulary.load(os.path.join(folder, f))
          for f in sorted(os.listdir(folder)) if f.endswith(".tsv")}
