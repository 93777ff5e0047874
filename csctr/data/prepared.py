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
import shutil
import socket
import tempfile
import time
from typing import Any

import numpy as np

from csctr import storage
from csctr.data import batch as batch_lib
from csctr.data import source as source_lib

# Bump when the on-disk layout changes: it is part of the cache key.
FORMAT_VERSION = 3
SPLITS = ("train", "test")
# Optional third split (csctr/data/prepare.py): the tail of the train
# stream, for model selection; present in info.json's splits when written.
VALIDATION = "validation"
INFO_FILE = "info.json"
IMAGES_FILE = "images.npy"
CATEGORY_FILE = "item_category.npy"
GROUPS_DIR = "groups"
COMMIT_FILE = "COMMITTED"
OWNER_FILE = "OWNER"  # host and pid of the prepare writing a .tmp- dir


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
  """Complete iff the commit marker exists: it is written last, after every
  other file (locally the directory is then renamed into place; in an
  object store it is uploaded last, see storage.upload_dir)."""
  return storage.is_committed(path, COMMIT_FILE)


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
  return storage.local_mirror(path, COMMIT_FILE)


def commit(tmp: str, path: str) -> None:
  """Marks tmp complete and renames it to path (a concurrent preparer that
  lost the race keeps the winner's copy)."""
  with open(os.path.join(tmp, COMMIT_FILE), "w") as f:
    f.write("ok\n")
  os.chmod(tmp, 0o755)  # mkdtemp made it private; caches may be shared
  try:
    os.rename(tmp, path)
  except OSError:
    if not is_prepared(path):
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def make_tmp(path: str) -> str:
  """A private sibling of `path` to write into, stale ones removed first.

  Its OWNER file names this host and process, so a later prepare can tell
  a killed prepare's leftovers from a running one's.
  """
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  remove_stale_tmp(parent)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-",
                         dir=parent)
  with open(os.path.join(tmp, OWNER_FILE), "w") as f:
    f.write(f"{socket.gethostname()} {os.getpid()}\n")
  return tmp


def remove_stale_tmp(parent: str, max_age_s: float = 24 * 3600) -> list[str]:
  """Deletes the .tmp-* directories that killed prepares left in parent.

  Stale: its owner process (this host) is gone, or, for another host's,
  nothing in it changed for max_age_s.
  """
  removed, host, now = [], socket.gethostname(), time.time()
  for name in os.listdir(parent):
    full = os.path.join(parent, name)
    if not (name.startswith(".tmp-") and os.path.isdir(full)):
      continue
    try:
      with open(os.path.join(full, OWNER_FILE)) as f:
        owner_host, pid = f.read().split()
      dead = owner_host == host and not _alive(int(pid))
      newest = max([os.path.getmtime(full)] + [
          os.path.getmtime(os.path.join(d, f))
          for d, _, files in os.walk(full) for f in files])
    except (OSError, ValueError):
      continue  # being created or removed by its owner right now
    if dead or now - newest > max_age_s:
      shutil.rmtree(full, ignore_errors=True)
      removed.append(full)
  return removed


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def shard_name(path: str, split: str, index: int, count: int) -> str:
  """TFDS's name for shard `index` of `count` of a split's groups."""
  return os.path.join(path, GROUPS_DIR,
                      f"groups-{split}.array_record-{index:05d}-of-"
                      f"{count:05d}")


def shard_paths(path: str, split: str) -> list[str]:
  """Every group shard of a split, in order (info.json knows how many)."""
  lengths = load_info(path).splits[split].shard_lengths or (0,)
  return [shard_name(path, split, i, len(lengths))
          for i in range(len(lengths))]
