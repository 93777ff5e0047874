"""The prepared dataset on disk: file names, DataInfo, cache paths.

What a prepared dataset directory holds, for every reader: the Grain pipeline,
export and serving. Writing it is csctr/data/prepare.py's job (which needs
TFDS); reading its layout needs only this module.

    info.json            DataInfo fields + bayes_auc + counts + packing stats
    images.npy           uint8 [num_items, H, W, 3], the image table (memmap)
    item_category.npy    int32 [num_items], category row of every item
    groups/              ArrayRecord shards of image groups (a TFDS dataset)
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from csctr import storage
from csctr.data import batch as batch_lib
from csctr.data import source as source_lib

# Bump when the on-disk layout changes: it is part of the cache key.
FORMAT_VERSION = 2
SPLITS = ("train", "test")
INFO_FILE = "info.json"
IMAGES_FILE = "images.npy"
CATEGORY_FILE = "item_category.npy"
GROUPS_DIR = "groups"


def group_spec(num_sparse: int, num_dense: int,
               num_behaviors: int) -> dict[str, tuple[Any, tuple[int, ...]]]:
  """dtype and per-impression shape of every field of a group record.

  The impression chunk's fields (source.chunk_spec): 'item' is a scalar;
  every other field has a leading impression axis. Zero-width fields are
  left out (TFDS cannot decode them).
  """
  return source_lib.chunk_spec(num_sparse, num_dense, num_behaviors)


def json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def load_info(path: str) -> batch_lib.DataInfo:
  """Reads the DataInfo of a prepared dataset (a local path or a URL)."""
  return batch_lib.DataInfo.from_json(
      storage.read_json(storage.join(path, INFO_FILE)))


def cache_path(root: str, key: dict[str, Any]) -> str:
  """Directory of the dataset described by `key` under `root`.

  The name is readable (dataset, image size, K) and ends in a hash of the
  whole key, so any dataset-relevant config change gets its own directory.
  """
  blob = json.dumps({"format_version": FORMAT_VERSION, **key}, sort_keys=True,
                    default=json_default)
  digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
  name = f"{key['dataset']}-{key['image_size']}px-k{key['group_size']}-{digest}"
  return storage.join(root, name)


def is_prepared(path: str) -> bool:
  """A dataset is complete iff info.json exists: it is renamed in (local
  disk) or uploaded (object store) last, so it is the commit marker."""
  return storage.is_committed(path, INFO_FILE)


def mirror_path(path: str) -> str:
  """The local directory where a dataset at URL `path` is read (path itself
  when local): the copy that prepare writes before uploading, or that
  local_copy downloads."""
  return storage.mirror_path(path)


def local_copy(path: str) -> str:
  """A local directory holding the committed dataset `path`.

  ArrayRecord's reader and the memmapped image table need local files, so a
  dataset in an object store is read from a mirror on each machine,
  downloaded once (storage.local_mirror).
  """
  return storage.local_mirror(path, INFO_FILE)


def shard_path(path: str, split: str) -> str:
  return os.path.join(path, GROUPS_DIR,
                      f"groups-{split}.array_record-00000-of-00001")
