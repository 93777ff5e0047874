"""Bring your own data: a directory of CSV files and images -> `Source`.

config.byod_path holds (user guide: docs/byod.md):

  items.csv        item_id, category_id, image (a path relative to the
                   directory); further columns are ignored. Or
                   items.parquet, whose image column holds paths or the
                   encoded image bytes (csctr.data.byod_items).
  impressions.csv  user_id, item_id, label (0/1); optional timestamp (number
                   or ISO date), split (train/test), behavior (space-separated
                   item ids, oldest first); every further column is a
                   categorical feature. Or impressions.parquet, or a folder
                   impressions/ of Parquet files, or config.byod.impressions
                   (a file, folder or glob): csctr.data.tables.
  images           JPEG/PNG/..., any size; resized to config.data.image_size
                   (csctr.data.image_io; config.byod.resize = pad|stretch|crop).

Rows. Every item of items.csv gets an item row (its line order) indexing the
image table; item rows are not the item_id vocabulary. Vocabularies (user_id,
item_id, category_id, extra columns) come from the train split only
(csctr.data.vocab: rows by train count, row 0 = OOV, config.data.min_count
and hash_buckets; category_id rows: the train categories, sorted): a cold (test-only) item keeps its image row but gets
item_id 0, and its category only if some train item has it. Empty category_id or extra
values map to 0. Chunk `user_id` is a dense index over all users, not a vocab
row (GAUC groups by it; vocab rows would merge all cold users into one).
impression_id = 0-based data row over the impression files (blank lines
skipped).
Behaviour lists keep the last L usable ids, right-padded with -1 (L = 0:
the behavior column is ignored).

Split. A split column wins; else timestamps: the latest
config.byod.test_fraction of impressions is test (ties at the boundary go to
test together); else a seeded hash (config.byod.seed) of the row number.
The impressions stream in chunks (config.byod.chunk_size) through the
passes of csctr.data.byod_log, shared with the Beam path: in make_source
pass 0 (timestamps only: the boundary, csctr.data.split_boundary) and
pass 1 (validates every row, counts train ids -> vocabularies); each
`impressions(split)` call is a pass 2 that emits.

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
    (../, absolute outside, or a symlink    security problem (links out are
    resolving outside)                      followed only with
                                            byod.allow_external_links).
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

import hashlib
import os
from typing import Any, Iterator

from csctr.data import byod_items
from csctr.data import byod_log
from csctr.data import source as source_lib
from csctr.data import split_boundary
from csctr.data import tables
from csctr.data.byod_items import DataError  # Re-exported: byod.DataError.

ITEMS_FILE = "items.csv"
ITEMS_FILES = (ITEMS_FILE, "items.parquet")  # in order of preference
# Where the impressions are, in order of preference when
# config.byod.impressions is empty: one CSV, one Parquet file, a directory.
IMPRESSIONS_FILES = ("impressions.csv", "impressions.parquet", "impressions")
REQUIRED_COLUMNS = byod_log.REQUIRED_COLUMNS


def impressions_spec(root: str, config: Any) -> str:
  """The impressions file, directory or glob of a BYOD directory."""
  spec = config.byod.impressions
  if spec:
    return spec if os.path.isabs(spec) else os.path.join(root, spec)
  found = [f for f in IMPRESSIONS_FILES
           if os.path.exists(os.path.join(root, f))]
  if len(found) != 1:
    raise DataError(root, f"want exactly one of {IMPRESSIONS_FILES}, found "
                    f"{found or 'none'} (or set config.byod.impressions)")
  return os.path.join(root, found[0])


def items_path(root: str) -> str:
  """items.csv, else items.parquet (the first that exists)."""
  for name in ITEMS_FILES:
    if os.path.isfile(os.path.join(root, name)):
      return os.path.join(root, name)
  return os.path.join(root, ITEMS_FILE)  # load_items: "file not found"


def open_dataset(config: Any) -> tuple[str, byod_items.Items,
                                       byod_log.Reader]:
  """Checks config.byod_path; reads items.csv and the impressions header."""
  if not config.byod_path:
    raise ValueError("config.byod_path is empty: point it at a directory "
                     "with items.csv, impressions.csv and the images")
  root = os.path.normpath(os.path.abspath(config.byod_path))
  if not os.path.isdir(root):
    raise DataError(root, "not a directory")
  items = byod_items.load_items(root, items_path(root),
                                config.byod.allow_external_links)
  table = tables.Table(impressions_spec(root, config), REQUIRED_COLUMNS)
  return root, items, byod_log.Reader(table, config.byod, items)


def file_stamps(config: Any) -> dict[str, Any]:
  """(size, mtime) of items.csv and the impression files, and a digest of
  every item image's: the cache key changes when any of them is edited."""
  root = os.path.normpath(os.path.abspath(config.byod_path))
  items_file = items_path(root)
  stamps = {os.path.basename(items_file): _stamp(items_file)}
  try:
    files = tables.find_files(impressions_spec(root, config))
  except DataError:
    files = []  # make_source reports it
  stamps.update((os.path.relpath(f, root), _stamp(f)) for f in files)
  digest = hashlib.sha256()
  if os.path.isfile(items_file):
    for p in byod_items.load_items(
        root, items_file, config.byod.allow_external_links).paths:
      digest.update(f"{p}\0{_stamp(p)}\0".encode())
  stamps["images"] = digest.hexdigest()[:16]
  return stamps


def _stamp(path: str) -> list[int]:
  try:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]
  except OSError:
    return []


def source_fields(reader: byod_log.Reader, plan: byod_log.Plan,
                  num_behaviors: int) -> dict[str, Any]:
  """The Source fields a Plan decides (shared with the Beam path)."""
  features = ("user_id", "item_id", "category_id", *reader.extras)
  return dict(
      item_category=plan.item_category,
      num_categories=plan.vocabs["category_id"].size,
      sparse_features=features,
      vocab_sizes=tuple(plan.vocabs[f].size for f in features),
      num_dense=0, num_behaviors=num_behaviors)


def make_source(config: Any) -> source_lib.Source:
  """Reads config.byod_path into a `Source` (see the module docstring).

  Validates everything up front (every image decoded, the impressions read
  once), so a bad dataset fails before prepare writes a shard, and the skip
  counts in `Source.stats` are final when prepare reports them.

  Args:
    config: the experiment config: byod_path, dataset, data.image_size,
      data.num_behaviors, data.min_count, data.hash_buckets and the byod
      section (configs/default.py).

  Returns:
    The Source; `impressions(split)` re-reads the impressions each call.

  Raises:
    DataError: malformed data, naming file, line and field.
  """
  root, items, reader = open_dataset(config)
  size, num_behaviors = config.data.image_size, config.data.num_behaviors
  images = byod_items.check_images(
      items, size, config.byod.resize,
      config.byod.skip_bad_images, config.byod.num_threads,
      config.byod.image_cache_mb * 2**20)
  if reader.mode == "time":  # pass 0
    split_at = split_boundary.time_boundary(reader, images.good)
  else:
    split_at = split_boundary.boundary(reader)
  summary = byod_log.Summary.empty(len(reader.extras), len(items.ids))
  for chunk in reader.chunks():  # pass 1
    summary.merge(byod_log.summarize(reader, chunk, images.good,
                                     num_behaviors, split_at))
  plan = byod_log.plan(reader, summary, images.good, split_at,
                       config.data.min_count, config.data.hash_buckets)

  def impressions(split: str) -> Iterator[source_lib.ImpressionChunk]:
    if split not in ("train", "test"):
      raise ValueError(f"split {split!r} not in ('train', 'test')")
    for chunk in reader.chunks():  # pass 2
      out = byod_log.emit(reader, plan, chunk, split, num_behaviors)
      if out is not None:
        yield out

  return source_lib.Source(
      name=config.dataset,
      image_size=size, item_images=images.iterate, impressions=impressions,
      stats={**images.stats, **plan.stats}, vocabularies=plan.vocabs,
      **source_fields(reader, plan, num_behaviors))
