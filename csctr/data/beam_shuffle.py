"""Pass 2 of the Beam prepare: impressions -> shard files -> image groups.

A GroupByKey of the impressions themselves would put every row through the
runner's shuffle, and the local runners (DirectRunner, the FnApiRunner)
hold their shuffle in memory: peak memory would grow with the log. So the
rows go to disk instead and only file names are shuffled:

  emit     each block's impressions (byod_log.emit), split by (split,
           shard = hash of the ad item), written as one .npz spill file per
           (split, shard) every SPILL_ROWS rows -> ((split, shard), name)
  shuffle  GroupByKey of the names: a few hundred bytes per file
  write    per (split, shard): load its files, sort by (item, impression
           id), packing.cut_groups, one ArrayRecord part; delete the files

Memory per worker: one block's emitted rows up to SPILL_ROWS, or one
shard's rows. The number of shards per split grows with the log
(`num_shards`: at most ~SHARD_ROWS rows per shard), so neither grows with
the input. Spill files live under the job's output directory (a staging
URL when the output is remote), so workers on other machines can read them.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np

from csctr import storage
from csctr.data import byod_log
from csctr.data import packing
from csctr.data import prepare as prepare_lib
from csctr.data import prepared

SPILL_DIR = "spill"
SPILL_ROWS = 1 << 20  # impressions a worker holds before writing them out
SHARD_ROWS = 1 << 21  # impressions per group shard, at most about
PART_PREFIX = "part-"


def num_shards(total_rows: int, minimum: int) -> int:
  """Group shards per split: config.beam.num_shards, or more for a big log
  (so one shard's rows, sorted in memory by one worker, stay bounded)."""
  return max(int(minimum), math.ceil(total_rows / SHARD_ROWS), 1)


def shard_of(items: np.ndarray, shards: int) -> np.ndarray:
  """Output shard of each ad item row: a fixed hash, so one image's
  impressions all meet in one shard."""
  h = (items.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(
      40)
  return (h % np.uint64(shards)).astype(np.int64)


@contextlib.contextmanager
def output(out: str, rel: str) -> Iterator[str]:
  """A local file path to write out/rel through (uploaded when remote).

  ArrayRecord writes local files only: in an object store the file is
  written to a worker-local temporary directory and uploaded whole.
  """
  if not storage.is_remote(out):
    full = os.path.join(out, rel)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    yield full
    return
  with tempfile.TemporaryDirectory(prefix="csctr-beam-") as d:
    local = os.path.join(d, os.path.basename(rel))
    yield local
    with open(local, "rb") as fin, storage.as_path(
        storage.join(out, rel)).open("wb") as fout:
      shutil.copyfileobj(fin, fout, 1 << 22)


def _spill(job: Any, name: str, pending: dict) -> Iterator[tuple]:
  for (split, shard), parts in sorted(pending.items()):
    rel = os.path.join(SPILL_DIR, f"{split}-{shard:05d}-{name}.npz")
    with output(job.out, rel) as path:
      np.savez(path, **{k: np.concatenate([p[k] for p in parts])
                        for k in parts[0]})
    yield (split, shard), rel


def emit(block, job: Any, starts, plan, shards: int) -> Iterator[tuple]:
  """Pass 2 of one block: ((split, shard), spill file name) pairs.

  File names are deterministic, so a retried bundle rewrites the same files.
  """
  pending, rows, seq = {}, 0, 0
  for chunk in job.reader.block_chunks(block, starts[block.index]):
    for split in prepared.SPLITS:
      out = byod_log.emit(job.reader, plan, chunk, split, job.num_behaviors)
      if out is None:
        continue
      out.pop("dense", None)
      shard = shard_of(out["item"], shards)
      for s in np.unique(shard).tolist():
        sel = shard == s
        pending.setdefault((split, s), []).append(
            {k: v[sel] for k, v in out.items()})
      rows += len(out["item"])
    if rows >= SPILL_ROWS:
      yield from _spill(job, f"{block.index:06d}-{seq:04d}", pending)
      pending, rows, seq = {}, 0, seq + 1
  yield from _spill(job, f"{block.index:06d}-{seq:04d}", pending)


def _load(out: str, rel: str) -> dict[str, np.ndarray]:
  path = storage.join(out, rel)
  data = (io.BytesIO(storage.read_bytes(path)) if storage.is_remote(out)
          else path)
  with np.load(data) as f:
    return dict(f)


def write_groups(element, job: Any) -> Iterator[dict[str, Any]]:
  """Packs one (split, shard) from its spill files into an ArrayRecord part
  (job.out/groups/part-SPLIT-SHARD); yields its counters."""
  (split, shard), rels = element
  rels = sorted(rels)
  parts = [_load(job.out, r) for r in rels]
  cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  del parts
  order = np.lexsort((cols["impression_id"], cols["item"]))
  cols = {k: v[order] for k, v in cols.items()}
  with output(job.out, part_rel(split, shard)) as path:
    counts = prepare_lib.write_groups(
        path, packing.cut_groups(cols, job.group_size), job.group_features())
  for r in rels:
    storage.remove(storage.join(job.out, r))
  yield {"split": split, "shard": shard, **counts}


def part_rel(split: str, shard: int) -> str:
  return os.path.join(prepared.GROUPS_DIR, f"{PART_PREFIX}{split}-{shard:05d}")
