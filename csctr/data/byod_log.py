"""BYOD impressions in passes that both prepare paths share.

  0. (split by timestamp only) csctr.data.split_boundary: three passes over
     `Reader.key_chunks` (item and timestamp columns only) find the
     timestamp where the latest test_fraction of impressions starts, in
     bounded memory. Split columns and row hashes need no pass 0 (their
     boundary is 0.5).
  1. `Reader.parse` validates a block of rows (file, line and field in every
     error) and `summarize` condenses it into a `Summary`: train counts of
     every user, item and extra value, the first row of every user.
     Summaries merge (`Summary.merge`) in any order.
  2. `plan` turns the merged Summary into a `Plan`: the vocabularies
     (csctr.data.vocab: min_count, hash buckets), the GAUC user index.
  3. `emit` (pass 2) turns a parsed block into impression chunks of one
     split.

The in-process loader (csctr.data.byod) runs them over the blocks in order;
the Beam pipeline (csctr.data.beam_prepare) runs them on workers, merging
with CombineFns and handing boundary and Plan on as side inputs. Same
functions, so both produce the same impressions.

Memory: a Summary holds every distinct user and extra value with a count;
never the rows themselves, nor anything per row.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
from typing import Any, Iterator, Sequence

import numpy as np

from csctr.data import byod_items
from csctr.data import source as source_lib
from csctr.data import tables
from csctr.data import vocab as vocab_lib
from csctr.data.byod_items import DataError

REQUIRED_COLUMNS = ("user_id", "item_id", "label")
OPTIONAL_COLUMNS = ("timestamp", "split", "behavior")
_LABELS = {"0": 0.0, "1": 1.0}
_SPLITS = {"train": 0.0, "test": 1.0}


def _parse_time(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    t = datetime.datetime.fromisoformat(text)  # ValueError if not ISO.
    if t.tzinfo is None:  # Naive dates are UTC, not the machine's zone.
      t = t.replace(tzinfo=datetime.timezone.utc)
    return t.timestamp()


def _hash_uniform(index: np.ndarray, seed: int) -> np.ndarray:
  """splitmix64(row number, seed) -> uniform [0, 1): independent of chunks."""
  z = index.astype(np.uint64) + np.uint64(
      ((seed + 1) * 0x9E3779B97F4A7C15) % 2**64)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  z ^= z >> np.uint64(31)
  return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


# (item rows, -1 where unknown or the key is missing; split keys) of rows.
KeyChunk = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass
class Chunk:
  """Parsed rows of a block: first row id, rows, item rows, labels, keys.

  Split key: the timestamp (mode 'time'), else 0 = train, 1 = test.
  """
  start: int
  rows: list[list[str]]
  items: np.ndarray
  labels: np.ndarray
  keys: np.ndarray


class Reader:
  """Parses and validates impression rows (CSV or Parquet, see tables)."""

  def __init__(self, table: tables.Table, options: Any,
               items: byod_items.Items):
    self.table, self.header = table, table.header
    col = {h: i for i, h in enumerate(self.header)}
    if "category_id" in col:
      raise DataError(table.files[0], "category_id comes from items.csv; "
                      "rename this column", line=1, field="category_id")
    self.user, self.item, self.label = (col[c] for c in REQUIRED_COLUMNS)
    self.time, self.split, self.behavior = (
        col.get(c) for c in OPTIONAL_COLUMNS)
    self.extras = tuple(h for h in self.header
                        if h not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    self.extra_cols = [col[h] for h in self.extras]
    self.mode = ("column" if self.split is not None else
                 "time" if self.time is not None else "hash")
    self.chunk_size = int(options["chunk_size"])
    self.seed = int(options["seed"])
    self.test_fraction = float(options["test_fraction"])
    if not 0.0 < self.test_fraction < 1.0 or self.chunk_size < 1:
      raise ValueError("need 0 < config.byod.test_fraction < 1 and "
                       f"chunk_size >= 1, got {self.test_fraction}, "
                       f"{self.chunk_size}")
    self.items = items
    self.unit = "row" if table.format == "parquet" else "line"

  def error(self, path: str, message: str, line: int,
            field: str | None = None) -> DataError:
    return DataError(path, message, line, field, self.unit)

  def block_chunks(self, block: tables.Block, start: int) -> Iterator[Chunk]:
    """Parsed chunks of one block whose first row id is `start`."""
    for lines, rows in self.table.rows(block, self.chunk_size):
      yield self.parse(block.path, start, lines, rows)
      start += len(rows)

  def block_keys(self, block: tables.Block, start: int
                 ) -> Iterator[KeyChunk]:
    """(item rows, split keys) of a block, for the boundary passes.

    A Parquet block with a string item_id and a numeric or timestamp
    timestamp column is read vectorised, those two columns only (same keys
    as parse: float(str(v)) == v). Elsewhere rows go through parse. Rows
    the fast path cannot use (unknown item, null key) get item -1: pass 1
    parses every row and raises on them.
    """
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.compute as pc  # pylint: disable=g-import-not-at-top
    names = [self.header[self.item], self.header[self.time]]
    types = self.table.types(block.path, names) if self.mode == "time" else ()
    if not types or not (pa.types.is_string(types[0]) and (
        tables.is_numeric(types[1]))):
      for chunk in self.block_chunks(block, start):
        yield chunk.items, chunk.keys
      return
    ids = pa.array(self.items.ids)
    for batch in self.table.batches(block, names, self.chunk_size):
      rows = np.array(pc.index_in(pc.utf8_trim_whitespace(batch.column(0)),
                                  value_set=ids).fill_null(-1), np.int64)
      keys = tables.seconds(batch.column(1))
      rows[~np.isfinite(keys)] = -1
      yield rows, np.nan_to_num(keys)

  def key_chunks(self) -> Iterator[KeyChunk]:
    """block_keys of every block in order (the in-process path)."""
    self.table.check_unchanged()
    start = 0
    for block in self.table.blocks():
      yield from self.block_keys(block, start)
      start += self.table.count(block)

  def chunks(self) -> Iterator[Chunk]:
    """Every block in order (the in-process path)."""
    self.table.check_unchanged()
    start = 0
    for block in self.table.blocks():
      for chunk in self.block_chunks(block, start):
        yield chunk
        start = chunk.start + len(chunk.rows)

  def parse(self, path: str, start: int, lines: Sequence[int],
            rows: list[list[str]]) -> Chunk:
    n = len(rows)
    if start + n > 2**31 - 1:
      raise self.error(path, "over 2^31-1 rows: impression_id is int32",
                      lines[-1])
    fast = self._parse_fast(rows)
    if fast is not None:
      items, labels, keys = fast
      if keys is None:
        keys = self._hash_keys(start, n)
      return Chunk(start, rows, items, labels, keys)
    # Something is off in this chunk: row by row, to say where and what.
    items, labels = np.empty(n, np.int64), np.empty(n, np.float32)
    keys = np.empty(n, np.float64)
    for j, (line, row) in enumerate(zip(lines, rows)):
      items[j] = self._item(path, row[self.item], line)
      labels[j] = self._label(path, row[self.label], line)
      if not row[self.user]:
        raise self.error(path, "empty user_id", line, "user_id")
      if self.mode != "hash":
        keys[j] = self._key(path, row, line)
    if self.mode == "hash":
      keys = self._hash_keys(start, n)
    return Chunk(start, rows, items, labels, keys)

  def _hash_keys(self, start: int, n: int) -> np.ndarray:
    u = _hash_uniform(np.arange(start, start + n), self.seed)
    return (u < self.test_fraction).astype(np.float64)

  def _parse_fast(self, rows: list[Sequence[str]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """parse's columns of a clean chunk, with C-speed loops (list
    comprehensions, numpy's float parsing); None if any value needs the
    row-by-row path (an error, a label like '1.0', an ISO date)."""
    get = self.items.rows.get
    items = [get(r[self.item]) for r in rows]
    labels = [_LABELS.get(r[self.label]) for r in rows]
    if None in items or None in labels or not all(r[self.user]
                                                  for r in rows):
      return None
    if self.mode == "hash":
      return (np.array(items, np.int64), np.array(labels, np.float32),
              None)
    if self.mode == "column":
      keys = [_SPLITS.get(r[self.split].lower()) for r in rows]
      if None in keys:
        return None
    else:
      try:
        keys = np.array([r[self.time] for r in rows], np.float64)
      except ValueError:
        return None
      if not np.isfinite(keys).all():
        return None
    return (np.array(items, np.int64), np.array(labels, np.float32),
            np.asarray(keys, np.float64))

  def _item(self, path: str, item: str, line: int) -> int:
    r = self.items.rows.get(item)
    if r is None:
      raise self.error(path, f"item {item!r} is not in items.csv", line,
                      "item_id")
    return r

  def _label(self, path: str, text: str, line: int) -> float:
    value = _LABELS.get(text)
    if value is None:
      try:
        value = float(text)  # "1.0" is fine; "nan", "2", "yes" are not.
      except ValueError:
        value = math.nan
      if value not in (0.0, 1.0):
        raise self.error(path, f"label {text!r} is not 0 or 1", line, "label")
    return value

  def _key(self, path: str, row: list[str], line: int) -> float:
    if self.mode == "column":
      key = _SPLITS.get(row[self.split].lower())
      if key is None:
        raise self.error(path, f"split {row[self.split]!r} is not train or "
                        "test", line, "split")
      return key
    try:
      t = _parse_time(row[self.time])
    except ValueError:
      t = math.nan
    if not math.isfinite(t):
      raise self.error(path, f"timestamp {row[self.time]!r} is not a number "
                      "or an ISO date", line, "timestamp")
    return t

  def behavior_rows(self, row: list[str], good: np.ndarray
                    ) -> tuple[list[int], int, int]:
    """Usable item rows of a behaviour list; counts of unknown, bad-image."""
    rows, unknown, bad = [], 0, 0
    for x in row[self.behavior].split():
      r = self.items.rows.get(x)
      if r is None:
        unknown += 1
      elif not good[r]:
        bad += 1
      else:
        rows.append(r)
    return rows, unknown, bad


@dataclasses.dataclass
class Summary:
  """Pass 1 over usable rows (image ok), for a known boundary; mergeable.

  users: raw user -> [train count, first row id]; extras: per extra column,
  value -> train count; item_train / item_count: impressions per item row.
  """
  users: dict[str, list[int]]
  extras: list[dict[str, int]]
  item_train: np.ndarray
  item_count: np.ndarray
  counts: dict[str, int]

  @classmethod
  def empty(cls, num_extras: int, num_items: int) -> "Summary":
    return cls({}, [{} for _ in range(num_extras)],
               np.zeros(num_items, np.int64), np.zeros(num_items, np.int64),
               dict(dropped_impressions=0, dropped_behavior_ids=0,
                    dropped_behavior_ids_bad_image=0,
                    truncated_behavior_lists=0))

  def merge(self, other: "Summary") -> "Summary":
    """Folds `other` into self (in place) and returns self."""
    for u, (count, row) in other.users.items():
      mine = self.users.get(u)
      if mine is None:
        self.users[u] = [count, row]
      else:
        mine[0], mine[1] = mine[0] + count, min(mine[1], row)
    for mine, theirs in zip(self.extras, other.extras):
      for v, count in theirs.items():
        mine[v] = mine.get(v, 0) + count
    self.item_train += other.item_train
    self.item_count += other.item_count
    for k, v in other.counts.items():
      self.counts[k] += v
    return self


def summarize(reader: Reader, chunk: Chunk, good: np.ndarray,
              num_behaviors: int, split_at: float) -> Summary:
  """Pass 1 of one chunk: only rows whose item image is usable count."""
  s = Summary.empty(len(reader.extras), len(good))
  kept = good[chunk.items]
  s.counts["dropped_impressions"] = int((~kept).sum())
  idx = np.flatnonzero(kept)
  train, items = chunk.keys[idx] < split_at, chunk.items[idx]
  rows = [chunk.rows[j] for j in idx]
  users = [r[reader.user] for r in rows]
  # C-speed counting: the first row of each user (a reversed dict keeps the
  # earliest), its train count (Counter).
  first = dict(zip(reversed(users), reversed((chunk.start + idx).tolist())))
  trained = collections.Counter(u for u, t in zip(users, train.tolist()) if t)
  s.users = {u: [trained.get(u, 0), row] for u, row in first.items()}
  train_rows = [r for r, t in zip(rows, train.tolist()) if t]
  s.extras = [dict(collections.Counter(r[c] for r in train_rows))
              for c in reader.extra_cols]
  s.item_train += np.bincount(items[train], minlength=len(good))
  s.item_count += np.bincount(items, minlength=len(good))
  if num_behaviors and reader.behavior is not None:
    for r in rows:
      b, u, x = reader.behavior_rows(r, good)
      s.counts["dropped_behavior_ids"] += u
      s.counts["dropped_behavior_ids_bad_image"] += x
      s.counts["truncated_behavior_lists"] += len(b) > num_behaviors
  return s


@dataclasses.dataclass
class Plan:
  """Everything pass 2 needs: boundary, vocabularies, user index."""
  boundary: float
  good: np.ndarray  # bool [num_items]: usable image
  users: dict[str, int]  # raw user -> GAUC index (first-appearance order)
  vocabs: dict[str, vocab_lib.Vocabulary]  # user_id, item_id, category_id..
  item_vocab: np.ndarray  # item row -> item_id vocabulary row
  item_category: np.ndarray  # item row -> category row
  is_cold: np.ndarray  # bool [num_items]: no train impression
  stats: dict[str, int]


def plan(reader: Reader, s: Summary, good: np.ndarray, split_at: float,
         min_count: int = 1, hash_buckets: int = 0) -> Plan:
  """The merged Summary -> Plan (raises DataError on an empty split).

  Vocabularies (csctr.data.vocab) count train impressions: ids seen fewer
  than min_count times share the OOV row 0; with hash_buckets, unknown ids
  hash into extra rows. A category's count is its items' train impressions.
  """
  train, total = int(s.item_train.sum()), int(s.item_count.sum())
  for split, count in (("train", train), ("test", total - train)):
    if not count:
      raise DataError(reader.table.files[0], f"the {split} split is empty "
                      f"({total} usable impressions, split by {reader.mode}, "
                      f"test_fraction={reader.test_fraction})",
                      field={"column": "split", "time": "timestamp"}.get(
                          reader.mode))
  items = reader.items
  users = {u: i for i, u in enumerate(
      sorted(s.users, key=lambda u: s.users[u][1]))}
  build = lambda name, counts: vocab_lib.Vocabulary.build(  # noqa: E731
      name, {k: c for k, c in counts.items() if k and c}, min_count,
      hash_buckets)
  vocabs = {"user_id": build("user_id",
                             {u: v[0] for u, v in s.users.items()})}
  vocabs["item_id"] = build("item_id", dict(zip(items.ids,
                                                s.item_train.tolist())))
  # Categories: the train ones, sorted (categories are few and the image
  # tower's category tables are sized by them); count = train items.
  cats: dict[str, int] = {}
  for c, n in zip(items.categories, s.item_train.tolist()):
    if c and n:
      cats[c] = cats.get(c, 0) + 1
  names = tuple(sorted(cats))
  vocabs["category_id"] = vocab_lib.Vocabulary(
      "category_id", names, np.array([cats[c] for c in names], np.int64))
  for name, counts in zip(reader.extras, s.extras):
    vocabs[name] = build(name, counts)
  item_vocab = vocabs["item_id"].lookup(items.ids)
  item_category = np.array([vocabs["category_id"].row(c) if c else 0
                            for c in items.categories], np.int32)
  is_cold = s.item_train == 0
  stats = dict(s.counts)
  stats.update(
      train_impressions=train, test_impressions=total - train,
      cold_test_impressions=int(s.item_count[is_cold].sum()),
      users=len(users),
      items_without_category=sum(not c for c in items.categories))
  return Plan(split_at, good, users, vocabs, item_vocab, item_category,
              is_cold, stats)


def emit(reader: Reader, p: Plan, chunk: Chunk, split: str,
         num_behaviors: int) -> source_lib.ImpressionChunk | None:
  """Pass 2: the chunk's impressions of `split` (None if it has none)."""
  idx = np.flatnonzero(p.good[chunk.items] &
                       ((chunk.keys >= p.boundary) == (split == "test")))
  if not len(idx):
    return None
  sel, it = [chunk.rows[j] for j in idx], chunk.items[idx]
  sparse = np.zeros((len(idx), 3 + len(reader.extras)), np.int32)
  sparse[:, 0] = p.vocabs["user_id"].lookup(r[reader.user] for r in sel)
  sparse[:, 1] = p.item_vocab[it]
  sparse[:, 2] = p.item_category[it]
  for f, (name, c) in enumerate(zip(reader.extras, reader.extra_cols)):
    vocab = p.vocabs[name]
    sparse[:, 3 + f] = [vocab.row(r[c]) if r[c] else 0 for r in sel]
  out = {
      "item": it.astype(np.int32),
      "sparse": sparse,
      "dense": np.zeros((len(idx), 0), np.float32),
      "label": chunk.labels[idx],
      "user_id": np.array([p.users[r[reader.user]] for r in sel], np.int32),
      "is_cold": p.is_cold[it],
      "impression_id": (chunk.start + idx).astype(np.int32),
  }
  if num_behaviors:
    behavior = np.full((len(idx), num_behaviors), -1, np.int32)
    if reader.behavior is not None:
      for j, r in enumerate(sel):
        b = reader.behavior_rows(r, p.good)[0][-num_behaviors:]
        behavior[j, :len(b)] = b
    out["behavior"] = behavior
  return out
