"""Impression logs in blocks: CSV or Parquet, one file, a directory or a glob.

Both prepare paths read impressions through this module: the in-process
loader (csctr.data.byod) walks the blocks in order, the Beam pipeline
(csctr.data.beam_prepare) hands one block to each worker. A block is a unit
a worker reads on its own: one Parquet row group, or one whole CSV file (a
CSV cannot be split without knowing where its rows start; give Beam many
files, or Parquet, to read in parallel).

Rows come out as lists of strings, whatever the file type, so one parser
(byod._Reader) validates them with the same rules and messages: Parquet
numbers are formatted as Python formats them, booleans as 0/1, timestamps
as Unix seconds, lists (behaviour) joined by spaces, nulls as ''.

Row ids: an impression's id is its 0-based data row over all files in name
order (blank CSV lines skipped). Errors name the file and, for CSV, the
1-based line (header = line 1); for Parquet, the 1-based data row.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Iterator, Sequence

import numpy as np

from csctr.data import byod_items
from csctr.data.byod_items import DataError

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# (1-based line numbers, rows of strings: lists from CSV, tuples from Parquet)
Rows = tuple[list[int], list[Sequence[str]]]


@dataclasses.dataclass(frozen=True)
class Block:
  """One unit of reading: a Parquet row group or a whole CSV file."""
  index: int
  path: str
  row_group: int  # -1: the whole CSV file


def _format(path: str) -> str:
  fmt = FORMATS.get(os.path.splitext(path)[1].lower())
  if fmt is None:
    raise DataError(path, f"unknown file type: want one of {sorted(FORMATS)}")
  return fmt


def find_files(spec: str) -> list[str]:
  """A file, a directory (its *.parquet, else *.csv files) or a glob."""
  if os.path.isdir(spec):
    for ext in (".parquet", ".pq", ".csv"):
      files = sorted(glob.glob(os.path.join(spec, "*" + ext)))
      if files:
        return files
    raise DataError(spec, "directory holds no .parquet or .csv files")
  if any(c in spec for c in "*?["):
    files = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
    if not files:
      raise DataError(spec, "glob matches no files")
    return files
  if not os.path.isfile(spec):
    raise DataError(spec, "file not found")
  return [spec]


class Table:
  """The impression files of one log, with one header checked across files.

  Args:
    spec: a file, a directory or a glob (see find_files).
    required: columns that must be present.
  """

  def __init__(self, spec: str, required: Sequence[str]):
    self.files = find_files(spec)
    formats = {_format(f) for f in self.files}
    if len(formats) > 1:
      raise DataError(spec, "mixes CSV and Parquet files")
    self.format = formats.pop()
    self.header = self._header(self.files[0], required)
    for f in self.files[1:]:
      if (h := self._header(f, required)) != self.header:
        raise DataError(f, f"columns {h} differ from {self.files[0]}'s "
                        f"{self.header}", line=1)
    self.stamp = [_stamp(f) for f in self.files]

  def _header(self, path: str, required: Sequence[str]) -> list[str]:
    if self.format == "csv":
      return byod_items.read_header(path, required)
    header = list(_parquet(path).schema_arrow.names)
    for name in required:
      if name not in header:
        raise DataError(path, f"missing required column (columns: {header})",
                        field=name)
    return header

  def blocks(self) -> list[Block]:
    out = []
    for path in self.files:
      groups = (range(_parquet(path).num_row_groups)
                if self.format == "parquet" else [-1])
      out.extend(Block(len(out) + i, path, g) for i, g in enumerate(groups))
    return out

  def check_unchanged(self) -> None:
    """Raises if a file changed since the table was opened (two passes must
    read the same data)."""
    for f, stamp in zip(self.files, self.stamp):
      if _stamp(f) != stamp:
        raise DataError(f, "changed since make_source read it")

  def count(self, block: Block) -> int:
    """Data rows of a block (Parquet: from the footer, CSV: by reading)."""
    if self.format == "parquet":
      return _parquet(block.path).metadata.row_group(block.row_group).num_rows
    return sum(len(rows) for _, rows in self.rows(block, 1 << 16))

  def types(self, path: str, names: Sequence[str]) -> list[Any]:
    """Arrow types of columns of a Parquet file ([] for CSV)."""
    if self.format != "parquet":
      return []
    schema = _parquet(path).schema_arrow
    return [schema.field(n).type for n in names]

  def batches(self, block: Block, names: Sequence[str],
              chunk_size: int) -> Iterator[Any]:
    """A Parquet block's Arrow record batches of the columns `names`."""
    yield from _parquet(block.path).iter_batches(
        chunk_size, row_groups=[block.row_group], columns=list(names),
        use_threads=False)

  def rows(self, block: Block, chunk_size: int) -> Iterator[Rows]:
    """Streams a block's (line numbers, string rows), chunk_size at a time."""
    if self.format == "csv":
      yield from byod_items.csv_chunks(block.path, self.header, chunk_size)
      return
    f = _parquet(block.path)
    first = sum(f.metadata.row_group(g).num_rows
                for g in range(block.row_group))
    for batch in f.iter_batches(chunk_size, row_groups=[block.row_group],
                                columns=self.header, use_threads=False):
      cols = [column_strings(batch.column(i), block.path, name)
              for i, name in enumerate(self.header)]
      n = batch.num_rows
      yield list(range(first + 1, first + n + 1)), list(zip(*cols))
      first += n


def _stamp(path: str) -> tuple[int, int]:
  st = os.stat(path)
  return st.st_size, st.st_mtime_ns


def _parquet(path: str):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    return pq.ParquetFile(path)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(path, f"unreadable Parquet file: {e}") from e


def is_numeric(t: Any) -> bool:
  """An Arrow number, timestamp or date type (read by `seconds`)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  return (pa.types.is_integer(t) or pa.types.is_floating(t)
          or pa.types.is_timestamp(t) or pa.types.is_date(t))


def seconds(column) -> np.ndarray:
  """A number/timestamp/date column as float64 (timestamps: Unix seconds,
  as column_strings formats them); nulls are NaN."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  t = column.type
  if pa.types.is_timestamp(t) or pa.types.is_date(t):
    us = column.cast(pa.timestamp("us", tz=getattr(t, "tz", None))).cast(
        pa.int64())
    return us.cast(pa.float64(), safe=False).to_numpy(
        zero_copy_only=False) / 1e6
  return column.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)


def column_strings(column, path: str, name: str) -> list[str]:
  """A Parquet column as the strings a CSV would hold."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  t = column.type
  if pa.types.is_timestamp(t) or pa.types.is_date(t):
    seconds = column.cast(pa.timestamp("us", tz=getattr(t, "tz", None))
                          ).cast(pa.int64()).to_pylist()
    return ["" if v is None else repr(v / 1e6) for v in seconds]
  if pa.types.is_list(t) or pa.types.is_large_list(t):
    return ["" if v is None else " ".join(str(x) for x in v)
            for v in column.to_pylist()]
  if pa.types.is_boolean(t):
    return ["" if v is None else str(int(v)) for v in column.to_pylist()]
  if pa.types.is_string(t) or pa.types.is_large_string(t):
    return ["" if v is None else v.strip() for v in column.to_pylist()]
  if pa.types.is_integer(t) or pa.types.is_floating(t):
    return ["" if v is None else str(v) for v in column.to_pylist()]
  raise DataError(path, f"column type {t} is not a string, number, boolean, "
                  "timestamp or list", field=name)
