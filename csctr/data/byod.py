"""Bring your own data: a directory of CSV files and images -> `Source`.

config.byod_path holds (user guide: docs/byod.md):

  items.csv        item_id, category_id, image (a path relative to the
                   directory); further columns are ignored.
  impressions.csv  user_id, item_id, label (0/1); optional timestamp (number
                   or ISO date), split (train/test), behavior (space-separated
                   item ids, oldest first); every further column is a
                   categorical feature.
  images           JPEG/PNG/..., any size; resized to config.data.image_size
                   (csctr.data.image_io; config.byod.resize = pad|stretch|crop).

Rows. Every item of items.csv gets an item row (its line order) indexing the
image table; item rows are not the item_id vocabulary. Vocabularies (user_id,
item_id, category_id, extra columns) come from the train split only, sorted,
row 0 = OOV: a cold (test-only) item keeps its image row but gets item_id 0,
and its category only if some train item has it. Empty category_id or extra
values map to 0. Chunk `user_id` is a dense index over all users, not a vocab
row (GAUC groups by it; vocab rows would merge all cold users into one).
impression_id = 0-based data row of impressions.csv (blank lines skipped).
Behaviour lists keep the last L usable ids, right-padded with -1 (L = 0:
the behavior column is ignored).

Split. A split column wins; else timestamps: the latest
config.byod.test_fraction of impressions is test (ties at the boundary go to
test together); else a seeded hash (config.byod.seed) of the row number.
impressions.csv streams in chunks (config.byod.chunk_size): pass 1, in
make_source, validates every row and fixes the boundary and the train
vocabularies; each `impressions(split)` call is a pass 2 that emits.

Bad input. Errors raise `DataError` (a ValueError) naming file, 1-based line
and field: nothing is trained on data we know is wrong. Only unusable images
are skipped, because one dead link in 10^5 downloaded images should not stop
a run; every skip is counted in `Source.stats` (prepare reports them) and the
first few are logged with path and reason.

  input                                     action
  missing/duplicate column, wrong #fields   DataError (line 1 / that line)
  label not in {0, 1}                       DataError
  split not train/test, bad timestamp       DataError
  item in impressions.csv, not items.csv    DataError (an upstream join bug)
  empty or duplicate item_id, empty image   DataError
  image path escaping the directory         DataError, never a skip: it is a
    (../ or absolute outside; lexical,      security problem. Symlinks inside
    so symlinks inside are followed)        the directory are its owner's.
  empty train or test split                 DataError
  missing image file                        skip: skipped_images_missing
  corrupt / truncated / undecodable image   skip: skipped_images_corrupt
    (config.byod.skip_bad_images=False      (skipped_images = both)
    makes both a DataError)
  impressions of a skipped image's item     dropped: dropped_impressions
  unknown behaviour id                      dropped: dropped_behavior_ids
  behaviour id whose image was skipped      dropped_behavior_ids_bad_image
"""

from __future__ import annotations

import datetime
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np

from csctr.data import byod_items
from csctr.data import source as source_lib
from csctr.data.byod_items import DataError  # Re-exported: byod.DataError.

ITEMS_FILE = "items.csv"
IMPRESSIONS_FILE = "impressions.csv"
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


class _Reader:
  """Parses and validates impressions.csv chunks; both passes share it, so
  pass 2 re-checks what pass 1 checked (the file could change in between)."""

  def __init__(self, root: str, config: Any, items: byod_items.Items):
    self.path = os.path.join(root, IMPRESSIONS_FILE)
    self.header = byod_items.read_header(self.path, REQUIRED_COLUMNS)
    col = {h: i for i, h in enumerate(self.header)}
    if "category_id" in col:
      raise DataError(self.path, "category_id comes from items.csv; rename "
                      "this column", line=1, field="category_id")
    self.user, self.item, self.label = (col[c] for c in REQUIRED_COLUMNS)
    self.time, self.split, self.behavior = (
        col.get(c) for c in OPTIONAL_COLUMNS)
    self.extras = tuple(h for h in self.header
                        if h not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    self.extra_cols = [col[h] for h in self.extras]
    self.mode = ("column" if self.split is not None else
                 "time" if self.time is not None else "hash")
    self.chunk_size = config.byod.chunk_size
    self.seed = config.byod.seed
    self.test_fraction = config.byod.test_fraction
    if not 0.0 < self.test_fraction < 1.0 or self.chunk_size < 1:
      raise ValueError("need 0 < config.byod.test_fraction < 1 and "
                       f"chunk_size >= 1, got {self.test_fraction}, "
                       f"{self.chunk_size}")
    self.items = items
    st = os.stat(self.path)
    self.stamp = (st.st_size, st.st_mtime_ns)  # Pass 2 must read pass 1's.

  def chunks(self) -> Iterator[tuple[int, list[list[str]], np.ndarray,
                                     np.ndarray, np.ndarray]]:
    """Yields (first row id, rows, item rows, labels, split keys).

    Split key: the timestamp (mode 'time'), else 0 = train, 1 = test.
    """
    st = os.stat(self.path)
    if (st.st_size, st.st_mtime_ns) != self.stamp:
      raise DataError(self.path, "changed since make_source read it")
    start = 0
    for lines, rows in byod_items.csv_chunks(self.path, self.header,
                                             self.chunk_size):
      n = len(rows)
      if start + n > 2**31 - 1:
        raise DataError(self.path, "over 2^31-1 rows: impression_id is int32",
                        lines[-1])
      items, labels = np.empty(n, np.int64), np.empty(n, np.float32)
      keys = np.empty(n, np.float64)
      for j, (line, row) in enumerate(zip(lines, rows)):
        items[j] = self._item(row[self.item], line)
        labels[j] = self._label(row[self.label], line)
        if not row[self.user]:
          raise DataError(self.path, "empty user_id", line, "user_id")
        if self.mode != "hash":
          keys[j] = self._key(row, line)
      if self.mode == "hash":
        u = _hash_uniform(np.arange(start, start + n), self.seed)
        keys = (u < self.test_fraction).astype(np.float64)
      yield start, rows, items, labels, keys
      start += n

  def _item(self, item: str, line: int) -> int:
    r = self.items.rows.get(item)
    if r is None:
      raise DataError(self.path, f"item {item!r} is not in {ITEMS_FILE}",
                      line, "item_id")
    return r

  def _label(self, text: str, line: int) -> float:
    value = _LABELS.get(text)
    if value is None:
      try:
        value = float(text)  # "1.0" is fine; "nan", "2", "yes" are not.
      except ValueError:
        value = math.nan
      if value not in (0.0, 1.0):
        raise DataError(self.path, f"label {text!r} is not 0 or 1", line,
                        "label")
    return value

  def _key(self, row: list[str], line: int) -> float:
    if self.mode == "column":
      key = _SPLITS.get(row[self.split].lower())
      if key is None:
        raise DataError(self.path, f"split {row[self.split]!r} is not train "
                        "or test", line, "split")
      return key
    try:
      t = _parse_time(row[self.time])
    except ValueError:
      t = math.nan
    if not math.isfinite(t):
      raise DataError(self.path, f"timestamp {row[self.time]!r} is not a "
                      "number or an ISO date", line, "timestamp")
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


def _note_first(first: dict[str, float], values: Sequence[str],
                keys: Sequence[float]) -> None:
  for v, k in zip(values, keys):
    if k < first.get(v, math.inf):
      first[v] = k


def _vocab(first: dict[str, float], boundary: float) -> dict[str, int]:
  """Values seen in train (first key < boundary) -> rows 1.., sorted."""
  train = sorted(v for v, k in first.items() if k < boundary and v)
  return {v: i + 1 for i, v in enumerate(train)}


def make_source(config: Any) -> source_lib.Source:
  """Reads config.byod_path into a `Source` (see the module docstring).

  Validates everything up front (every image decoded, impressions.csv read
  once), so a bad dataset fails before prepare writes a shard, and the skip
  counts in `Source.stats` are final when prepare reports them.

  Args:
    config: the experiment config: byod_path, dataset, data.image_size,
      data.num_behaviors and the byod section (configs/default.py).

  Returns:
    The Source; `impressions(split)` re-reads impressions.csv each call.

  Raises:
    DataError: malformed data, naming file, line and field.
  """
  if not config.byod_path:
    raise ValueError("config.byod_path is empty: point it at a directory "
                     "with items.csv, impressions.csv and the images")
  root = os.path.normpath(os.path.abspath(config.byod_path))
  if not os.path.isdir(root):
    raise DataError(root, "not a directory")
  size, num_behaviors = config.data.image_size, config.data.num_behaviors
  items_path = os.path.join(root, ITEMS_FILE)
  items = byod_items.load_items(root, items_path)
  reader = _Reader(root, config, items)  # Header errors before decoding.
  images = byod_items.check_images(
      items, items_path, size, config.byod.resize,
      config.byod.skip_bad_images, config.byod.num_threads,
      config.byod.image_cache_mb * 2**20)
  good, n_items = images.good, len(items.ids)

  # Pass 1: validate every row; the first split key of every value decides
  # whether it is in the train vocabulary once the boundary is known.
  first_user, first_extra = {}, [{} for _ in reader.extras]
  item_first = np.full(n_items, math.inf)
  item_count = np.zeros(n_items, np.int64)
  times, train = [], 0
  dropped = unknown = bad = truncated = 0
  for _, rows, item_rows, _, keys in reader.chunks():
    kept = good[item_rows]
    dropped += int((~kept).sum())
    rows = [r for r, k in zip(rows, kept) if k]
    keys, item_rows = keys[kept], item_rows[kept]
    key_list = keys.tolist()
    _note_first(first_user, [r[reader.user] for r in rows], key_list)
    for first, c in zip(first_extra, reader.extra_cols):
      _note_first(first, [r[c] for r in rows], key_list)
    np.minimum.at(item_first, item_rows, keys)
    item_count += np.bincount(item_rows, minlength=n_items)
    if reader.mode == "time":
      times.append(keys)
    else:
      train += int((keys < 0.5).sum())
    if num_behaviors and reader.behavior is not None:
      for r in rows:
        b, u, x = reader.behavior_rows(r, good)
        unknown, bad, truncated = unknown + u, bad + x, truncated + (
            len(b) > num_behaviors)

  total, boundary = int(item_count.sum()), 0.5
  if reader.mode == "time":
    keys = np.sort(np.concatenate(times)) if times else np.zeros(0)
    k = int(total * (1.0 - reader.test_fraction))
    boundary = keys[k] if k < total else math.inf
    train = int(np.searchsorted(keys, boundary, side="left"))
  for split, count in (("train", train), ("test", total - train)):
    if not count:
      raise DataError(reader.path, f"the {split} split is empty ({total} "
                      f"usable impressions, split by {reader.mode}, "
                      f"test_fraction={reader.test_fraction})",
                      field={"column": "split", "time": "timestamp"}.get(
                          reader.mode))

  users = {u: i for i, u in enumerate(first_user)}  # GAUC ids, all users.
  user_vocab = _vocab(first_user, boundary)
  extra_vocabs = [_vocab(first, boundary) for first in first_extra]
  train_items = np.flatnonzero(item_first < boundary)
  item_vocab = np.zeros(n_items, np.int32)  # item row -> item_id vocab row
  order = sorted(train_items.tolist(), key=lambda r: items.ids[r])
  item_vocab[order] = np.arange(1, len(order) + 1)
  cats = sorted({items.categories[r] for r in train_items} - {""})
  cat_vocab = {c: i + 1 for i, c in enumerate(cats)}
  item_category = np.array([cat_vocab.get(c, 0) for c in items.categories],
                           np.int32)
  cold = int(item_count[item_first >= boundary].sum())
  stats = dict(images.stats)
  stats.update(
      train_impressions=train, test_impressions=total - train,
      cold_test_impressions=cold, dropped_impressions=dropped,
      dropped_behavior_ids=unknown, dropped_behavior_ids_bad_image=bad,
      truncated_behavior_lists=truncated, users=len(users),
      items_without_category=sum(not c for c in items.categories))

  def impressions(split: str) -> Iterator[source_lib.ImpressionChunk]:
    if split not in ("train", "test"):
      raise ValueError(f"split {split!r} not in ('train', 'test')")
    want_test = split == "test"
    for start, rows, item_rows, labels, keys in reader.chunks():
      idx = np.flatnonzero(good[item_rows] & ((keys >= boundary) == want_test))
      if not len(idx):
        continue
      sel, it = [rows[j] for j in idx], item_rows[idx]
      sparse = np.zeros((len(idx), 3 + len(reader.extras)), np.int32)
      sparse[:, 0] = [user_vocab.get(r[reader.user], 0) for r in sel]
      sparse[:, 1] = item_vocab[it]
      sparse[:, 2] = item_category[it]
      for f, (vocab, c) in enumerate(zip(extra_vocabs, reader.extra_cols)):
        sparse[:, 3 + f] = [vocab.get(r[c], 0) for r in sel]
      chunk = {
          "item": it.astype(np.int32),
          "sparse": sparse,
          "dense": np.zeros((len(idx), 0), np.float32),
          "label": labels[idx],
          "user_id": np.array([users[r[reader.user]] for r in sel], np.int32),
          "is_cold": item_vocab[it] == 0,
          "impression_id": (start + idx).astype(np.int32),
      }
      if num_behaviors:
        behavior = np.full((len(idx), num_behaviors), -1, np.int32)
        if reader.behavior is not None:
          for j, r in enumerate(sel):
            b = reader.behavior_rows(r, good)[0][-num_behaviors:]
            behavior[j, :len(b)] = b
        chunk["behavior"] = behavior
      yield chunk

  return source_lib.Source(
      name=config.dataset,
      image_size=size, item_category=item_category,
      num_categories=len(cat_vocab) + 1,
      sparse_features=("user_id", "item_id", "category_id", *reader.extras),
      vocab_sizes=(len(user_vocab) + 1, len(order) + 1, len(cat_vocab) + 1,
                   *(len(v) + 1 for v in extra_vocabs)),
      num_dense=0, num_behaviors=num_behaviors,
      item_images=images.iterate, impressions=impressions, stats=stats)
