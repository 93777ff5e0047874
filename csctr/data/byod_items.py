"""BYOD building blocks: CSV reading with locations, items.csv, item images.

Split from `csctr.data.byod` (which holds the policy and the impressions) so each
module stays small. Everything raises `DataError`, which says where: file,
1-based line (the header is line 1) and field.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Callable, Iterator, Sequence

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


@dataclasses.dataclass
class Items:
  """items.csv; index = item row (file order)."""
  ids: list[str]
  rows: dict[str, int]  # item_id -> item row
  categories: list[str]  # raw category_id, '' = none
  paths: list[str]  # absolute image paths
  lines: list[int]


def load_items(root: str, path: str,
               allow_external_links: bool = False) -> Items:
  """Reads and validates items.csv (it is small enough to hold: one row per
  image, and the image table is the same size anyway)."""
  header = read_header(path, ITEM_COLUMNS)
  c_id, c_cat, c_img = (header.index(c) for c in ITEM_COLUMNS)
  items = Items([], {}, [], [], [])
  for lines, rows in csv_chunks(path, header, 65536):
    for line, row in zip(lines, rows):
      item = row[c_id]
      if not item:
        raise DataError(path, "empty item_id", line, "item_id")
      if item in items.rows:
        raise DataError(path, f"duplicate item {item!r} (first on line "
                        f"{items.lines[items.rows[item]]})", line, "item_id")
      items.rows[item] = len(items.ids)
      items.ids.append(item)
      items.categories.append(row[c_cat])
      items.paths.append(resolve_image(root, row[c_img], path, line,
                                       allow_external_links))
      items.lines.append(line)
  if not items.ids:
    raise DataError(path, "no items")
  return items


@dataclasses.dataclass
class ItemImages:
  """Result of decoding every item image once."""
  good: np.ndarray  # bool [num_items]: image usable
  stats: dict[str, int]
  iterate: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


def check_images(items: Items, items_path: str, size: int, resize: str,
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
  for r, out in enumerate(image_io.decode_images(items.paths, size, resize,
                                                 num_threads)):
    if isinstance(out, image_io.BadImageError):
      if not skip_bad:
        raise DataError(items_path, f"bad image {out.path}: {out.reason}",
                        items.lines[r], "image")
      if missing + corrupt < _LOGGED_SKIPS:
        logging.warning("byod: skipping item %r (line %d): %s", items.ids[r],
                        items.lines[r], out)
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
      decoded = image_io.decode_images([items.paths[r] for r in part], size,
                                       resize, num_threads)
      for j, (r, out) in enumerate(zip(part, decoded)):
        if isinstance(out, image_io.BadImageError):
          raise DataError(items_path, f"image went bad after validation: "
                          f"{out}", items.lines[r], "image")
        images[j] = out
      yield part, images

  stats = {"items": n, "skipped_images": missing + corrupt,
           "skipped_images_missing": missing,
           "skipped_images_corrupt": corrupt}
  return ItemImages(good, stats, iterate)
