"""Reading an embedding table (written by csctr/serving/export.py).

The format is described in export.py's docstring and docs/serving.md. This
half has no writing code and no model, so the scorer imports only it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from csctr import storage
from csctr.data import vocab as vocab_lib

FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.npy"
CATEGORIES_FILE = "categories.npy"
CATEGORY_MEAN_FILE = "category_mean.npy"
META_FILE = "meta.json"
# Optional: str [N], the raw item id of each row (as requests name items).
RAW_IDS_FILE = "raw_ids.npy"
TABLES_DIR = "embedding_tables"


class EmbeddingTable:
  """A table written by write_table, embeddings memory-mapped (read-only)."""

  def __init__(self, path: str):
    if storage.is_remote(path):  # memmapped: read from a local mirror
      path = storage.local_mirror(path, META_FILE)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f"{meta_path} not found: not an embedding table "
                              "(write one with python -m csctr.export)")
    with open(meta_path) as f:
      self.meta: dict[str, Any] = json.load(f)
    if self.meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{path}: table format "
                       f"{self.meta.get('format_version')}, this code reads "
                       f"{FORMAT_VERSION}")
    self.path = path
    self.embeddings = np.load(os.path.join(path, EMBEDDINGS_FILE),
                              mmap_mode="r")
    self.ids = np.load(os.path.join(path, IDS_FILE))
    self.categories = np.load(os.path.join(path, CATEGORIES_FILE))
    self.category_mean = np.load(os.path.join(path, CATEGORY_MEAN_FILE))
    # Ids 0..N-1 (a prepared dataset's items): the row is the id itself.
    n = len(self.ids)
    self._dense = bool(n == 0 or (self.ids[0] == 0 and self.ids[-1] == n - 1))
    raw_path = os.path.join(path, RAW_IDS_FILE)
    self.raw_ids = np.load(raw_path) if os.path.exists(raw_path) else None
    if self.raw_ids is not None:  # sorted once: lookups are a searchsorted
      order = np.argsort(self.raw_ids, kind="stable")
      self._raw_sorted, self._raw_keys = self.raw_ids[order], self.ids[order]

  @property
  def dim(self) -> int:
    return int(self.meta["d"])

  def __len__(self) -> int:
    return len(self.ids)

  def lookup(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row int64 [n], found bool [n]); rows of missing ids are 0."""
    image_ids = np.asarray(image_ids, np.int64)
    if self._dense:
      found = (image_ids >= 0) & (image_ids < len(self.ids))
      return np.where(found, image_ids, 0), found
    pos = np.searchsorted(self.ids, image_ids)
    pos = np.minimum(pos, max(len(self.ids) - 1, 0))
    found = self.ids[pos] == image_ids if len(self.ids) else pos < 0
    return np.where(found, pos, 0), found

  def raw_keys(self, raw_ids: Sequence[str]) -> np.ndarray:
    """The keys (image ids) of raw item ids, -1 where not in the table.

    With raw_ids.npy the mapping is that file; without it (a prepared
    dataset's items) an item's raw id is its key written in decimal.
    """
    if not len(raw_ids):
      return np.zeros((0,), np.int64)
    if self.raw_ids is None:
      keys = vocab_lib.decimal_ids(list(raw_ids))
      if keys is not None:
        return keys
      try:
        return np.fromiter(map(int, raw_ids), np.int64, len(raw_ids))
      except ValueError:  # some ids are not integers: one by one
        return np.array([int(r) if r.isdecimal() else -1 for r in raw_ids],
                        np.int64)
    query = np.asarray(raw_ids, np.str_)
    pos = np.minimum(np.searchsorted(self._raw_sorted, query),
                     len(self._raw_sorted) - 1)
    return np.where(self._raw_sorted[pos] == query, self._raw_keys[pos], -1)

  def check(self, expected_config_hash: str, expected_encoder_hash: str,
            step: int | None = None, allow_other_checkpoint: bool = False
            ) -> None:
    """Refuses a table of another model (or, by default, checkpoint)."""
    if self.meta["config_hash"] != expected_config_hash:
      raise ValueError(
          f"embedding table {self.path} was built from another model: its "
          f"config hash {self.meta['config_hash'][:12]} != this model's "
          f"{expected_config_hash[:12]} (model config or dataset vocabulary "
          "differ); rebuild it with python -m csctr.export --workdir=...")
    if (self.meta["encoder_hash"] != expected_encoder_hash
        and not allow_other_checkpoint):
      raise ValueError(
          f"embedding table {self.path} holds the embeddings of another "
          f"checkpoint (table step {self.meta['step']}, model step {step}; "
          "encoder parameters differ): re-export it for this step, or pass "
          "allow_other_checkpoint=True to accept stale embeddings")


def created_time(table_path: str) -> float:
  """When a table was written: meta.json's mtime (tables older than
  `created_unix` lack that field; an --overwrite rewrites the file)."""
  return os.path.getmtime(os.path.join(table_path, META_FILE))


def pick_table(where: str, config_hash: str, encoder_hash: str | None
               ) -> str | None:
  """`where` if it is a table, else its newest table of this model.

  Newest by meta.json's `created_unix`, then name; a table of another model
  (config hash) or checkpoint (encoder hash; None accepts any) is skipped.
  """
  if os.path.exists(os.path.join(where, META_FILE)):
    return where
  best = None
  for name in sorted(os.listdir(where)) if os.path.isdir(where) else ():
    path = os.path.join(where, name)
    try:
      with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue  # not a table (or a hidden tmp directory being written)
    if meta.get("config_hash") != config_hash or (
        encoder_hash is not None and meta.get("encoder_hash") != encoder_hash):
      continue
    rank = (meta.get("created_unix") or created_time(path), name)
    if best is None or rank > best[0]:
      best = (rank, path)
  return best[1] if best else None
