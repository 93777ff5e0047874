"""BYOD building blocks: CSV reading with locations, the items, item images.

The items are items.csv, or items.parquet whose `image` column holds either
paths (strings, as in the CSV) or the encoded image bytes themselves
(binary: JPEG/PNG/WebP...). Bytes are read one Parquet row group at a time
(`ParquetImages`), never the whole column, and decode exactly as the same
bytes in a file would (a test compares both).

Split from `csctr.data.byod` (which holds the policy and the impressions) so each
module stays small. Everything raises `DataError`, which says where: file,
1-based line (the header is line 1) and field.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import os
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import numpy as np

from csctr.data import image_io

ITEM_COLUMNS = ("item_id", "category_id", "image")
_LOGGED_SKIPS = 10  # bad images logged by path; the rest only counted


class DataError(ValueError):
  """Malformed user data; says where (file, 1-based line, field) and what.

  unit: 'line' (CSV; the header is line 1) or 'row' (Parquet: data rows).
  """

  def __init__(self, path: str, message: str, line: int | None = None,
               field: str | None = None, unit: str = "line"):
    where = path + (f", {unit} {line}" if line else "")
    where += f", field {field!r}" if field else ""
    super().__init__(f"{where}: {message}")
    self.path, self.line, self.field = path, line, field


def read_header(path: str, required: Sequence[str]) -> list[str]:
  """The stripped header of a CSV file, checked for required columns."""
  if not os.path.isfile(path):
    raise DataError(path, "file not found")
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      header = [h.strip() for h in next(csv.reader(f), [])]
  except (csv.Error, UnicodeDecodeError) as e:
    raise DataError(path, f"unreadable CSV: {e}", line=1) from e
  for name in required:
    if name not in header:
      raise DataError(path, f"missing required column (header: {header})",
                      line=1, field=name)
  dup = sorted({h for h in header if header.count(h) > 1})
  if dup or "" in header:
    raise DataError(path, f"duplicate or empty column names {dup}", line=1)
  return header


def csv_chunks(path: str, header: list[str], chunk_size: int
               ) -> Iterator[tuple[list[int], list[list[str]]]]:
  """Streams (1-based line numbers, stripped rows), chunk_size rows at a time.

  Blank lines are skipped; a row with the wrong number of fields is an error
  (a stray comma shifts every later field, which is worse than failing).
  """
  n, line = len(header), 1
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f, skipinitialspace=True)
      if [h.strip() for h in next(reader, [])] != header:
        raise DataError(path, "header changed while reading", line=1)
      lines, rows = [], []
      for row in reader:
        line = reader.line_num
        if not any(v.strip() for v in row):
          continue
        if len(row) != n:
          raise DataError(path, f"expected {n} fields, found {len(row)}",
                          line=line)
        lines.append(line)
        rows.append([v.strip() for v in row])
        if len(rows) == chunk_size:
          yield lines, rows
          lines, rows = [], []
      if rows:
        yield lines, rows
  except (csv.Error, UnicodeDecodeError) as e:
    raise DataError(path, f"unreadable CSV: {e}", line=line + 1) from e


def resolve_image(root: str, rel: str, path: str, line: int,
                  allow_external_links: bool = False) -> str:
  """root/rel, refusing paths that leave root (../, absolute elsewhere).

  A CSV must not make us read ~/.ssh: neither by its text (checked
  lexically) nor through a symlink inside the directory that resolves
  outside it, unless allow_external_links (config.byod.allow_external_links:
  the Amazon converter links downloaded images by default). A link to a file
  that does not exist yet is checked where it points.
  """
  if not rel or "\0" in rel:
    raise DataError(path, f"empty or invalid image path {rel!r}", line,
                    "image")
  full = os.path.normpath(os.path.join(root, rel))
  if os.path.commonpath([root, full]) != root:
    raise DataError(path, f"image path {rel!r} escapes the dataset "
                    f"directory {root}", line, "image")
  if not allow_external_links:
    real, real_root = os.path.realpath(full), os.path.realpath(root)
    if os.path.commonpath([real_root, real]) != real_root:
      raise DataError(path, f"image path {rel!r} is a link to {real}, outside "
                      f"the dataset directory {root} (set "
                      "config.byod.allow_external_links=True to follow it)",
                      line, "image")
  return full


class ParquetImages:
  """The binary `image` column of items.parquet, read a row group at a time.

  Picklable without its cache, so Beam workers reopen the file.
  """

  def __init__(self, path: str, column: str = "image"):
    f = _parquet_file(path)
    self.path, self.column = path, column
    sizes = [f.metadata.row_group(g).num_rows
             for g in range(f.num_row_groups)]
    self.starts = np.cumsum([0, *sizes]).tolist()
    self._cache: tuple[int, list[Any]] | None = None

  def __getstate__(self):
    return {**self.__dict__, "_cache": None}

  def get(self, row: int) -> bytes | None:
    """The bytes of item row `row` (None for a null)."""
    g = int(np.searchsorted(self.starts, row, side="right")) - 1
    if self._cache is None or self._cache[0] != g:
      table = _parquet_file(self.path).read_row_group(g, [self.column])
      self._cache = (g, table.column(0).to_pylist())
    return self._cache[1][row - self.starts[g]]


@dataclasses.dataclass
class Items:
  """The items; index = item row (file order).

  paths: absolute image paths, or (image bytes in Parquet) 'FILE#row N'
  names for messages, with the bytes in `images`.
  """
  ids: list[str]
  rows: dict[str, int]  # item_id -> item row
  categories: list[str]  # raw category_id, '' = none
  paths: list[str]
  lines: list[int]  # 1-based CSV line, or Parquet data row
  source: str = ""  # the items file
  unit: str = "line"  # of `lines`: 'line' (CSV) or 'row' (Parquet)
  images: ParquetImages | None = None

  def error(self, message: str, r: int, field: str) -> DataError:
    return DataError(self.source, message, self.lines[r], field, self.unit)

  def image_bytes(self, r: int) -> bytes:
    """The encoded image of item row r, as stored ('original' storage)."""
    if self.images is not None:
      return self.images.get(r) or b""
    with open(self.paths[r], "rb") as f:
      return f.read()


def load_items(root: str, path: str,
               allow_external_links: bool = False) -> Items:
  """Reads and validates items.csv or items.parquet (small enough to hold:
  one row per image; image bytes stay in the file, see ParquetImages)."""
  if path.endswith(".parquet"):
    items, chunks = _parquet_items(path)
  else:
    header = read_header(path, ITEM_COLUMNS)
    cols = [header.index(c) for c in ITEM_COLUMNS]
    items = Items([], {}, [], [], [], path)
    chunks = ((lines, [[row[c] for c in cols] for row in rows])
              for lines, rows in csv_chunks(path, header, 65536))
  for lines, rows in chunks:
    for line, (item, category, image) in zip(lines, rows):
      if not item:
        raise DataError(path, "empty item_id", line, "item_id", items.unit)
      if item in items.rows:
        raise DataError(path, f"duplicate item {item!r} (first on "
                        f"{items.unit} {items.lines[items.rows[item]]})",
                        line, "item_id", items.unit)
      items.rows[item] = len(items.ids)
      items.ids.append(item)
      items.categories.append(category)
      items.paths.append(
          f"{path}#row {line}" if items.images is not None else
          resolve_image(root, image, path, line, allow_external_links))
      items.lines.append(line)
  if not items.ids:
    raise DataError(path, "no items")
  return items


def _parquet_file(path: str):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(path, f"unreadable Parquet file: {e}") from e


def _parquet_items(path: str) -> tuple[Items, Iterator[tuple[list[int],
                                                            list[Any]]]]:
  """items.parquet: the Items to fill, and its (rows, [id, category,
  image path]) chunks; a binary `image` column stays in the file."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  from csctr.data import tables  # pylint: disable=g-import-not-at-top
  f = _parquet_file(path)
  names = f.schema_arrow.names
  for name in ITEM_COLUMNS:
    if name not in names:
      raise DataError(path, f"missing required column (columns: {names})",
                      field=name)
  kind = f.schema_arrow.field("image").type
  binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
  items = Items([], {}, [], [], [], path, "row",
                ParquetImages(path) if binary else None)
  columns = list(ITEM_COLUMNS[:2] if binary else ITEM_COLUMNS)

  def chunks():
    first = 1
    for batch in f.iter_batches(65536, columns=columns, use_threads=False):
      cols = [tables.column_strings(batch.column(i), path, name)
              for i, name in enumerate(columns)]
      if binary:
        cols.append([""] * batch.num_rows)
      yield list(range(first, first + batch.num_rows)), list(zip(*cols))
      first += batch.num_rows

  return items, chunks()


def _decode_blob(data: bytes | None, name: str, size: int, resize: str
                 ) -> np.ndarray | image_io.BadImageError:
  if not data:
    return image_io.MissingImageError(name, "null or empty image bytes")
  try:
    return image_io.decode_image_bytes(data, size, resize, name)
  except image_io.BadImageError as e:
    return e


def decode_items(items: Items, rows: Sequence[int], size: int, resize: str,
                 num_threads: int = 0
                 ) -> Iterator[np.ndarray | image_io.BadImageError]:
  """Decodes the images of item rows in order (files or Parquet bytes);
  yields each image or its BadImageError, as image_io.decode_images."""
  if items.images is None:
    yield from image_io.decode_images([items.paths[r] for r in rows], size,
                                      resize, num_threads)
    return
  threads = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for start in range(0, len(rows), 256):  # bounded: 256 blobs at a time
      part = rows[start:start + 256]
      blobs = [items.images.get(r) for r in part]
      yield from pool.map(_decode_blob, blobs, [items.paths[r] for r in part],
                          [size] * len(part), [resize] * len(part))


@dataclasses.dataclass
class ItemImages:
  """Result of decoding every item image once."""
  good: np.ndarray  # bool [num_items]: image usable
  stats: dict[str, int]
  iterate: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


def check_images(items: Items, size: int, resize: str,
                 skip_bad: bool, num_threads: int,
                 cache_bytes: int) -> ItemImages:
  """Decodes every image (a truncated JPEG only fails on a full decode).

  The decoded images are kept when they fit in cache_bytes, so prepare does
  not decode twice; otherwise `iterate` decodes again and a file that went
  bad in between is an error (its impressions were already counted as kept).
  """
  n = len(items.ids)
  cache = (np.empty((n, size, size, 3), np.uint8)
           if n * size * size * 3 <= cache_bytes else None)
  good = np.zeros(n, bool)
  missing = corrupt = 0
  for r, out in enumerate(decode_items(items, range(n), size, resize,
                                       num_threads)):
    if isinstance(out, image_io.BadImageError):
      if not skip_bad:
        raise items.error(f"bad image {out.path}: {out.reason}", r, "image")
      if missing + corrupt < _LOGGED_SKIPS:
        logging.warning("byod: skipping item %r (%s %d): %s", items.ids[r],
                        items.unit, items.lines[r], out)
      missing += isinstance(out, image_io.MissingImageError)
      corrupt += not isinstance(out, image_io.MissingImageError)
    else:
      good[r] = True
      if cache is not None:
        cache[r] = out
  if missing + corrupt:
    logging.warning("byod: skipped %d missing and %d corrupt images of %d",
                    missing, corrupt, n)

  def iterate(block: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rows = np.flatnonzero(good).astype(np.int64)
    for start in range(0, len(rows), block):
      part = rows[start:start + block]
      if cache is not None:
        yield part, cache[part]
        continue
      images = np.empty((len(part), size, size, 3), np.uint8)
      decoded = decode_items(items, part.tolist(), size, resize, num_threads)
      for j, (r, out) in enumerate(zip(part, decoded)):
        if isinstance(out, image_io.BadImageError):
          raise items.error(f"image went bad after validation: {out}", r,
                            "image")
        images[j] = out
      yield part, images

  stats = {"items": n, "skipped_images": missing + corrupt,
           "skipped_images_missing": missing,
           "skipped_images_corrupt": corrupt}
  return ItemImages(good, stats, iterate)
