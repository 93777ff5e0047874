"""Item images of a prepared dataset: a uint8 table or encoded ArrayRecords.

`config.data.image_storage` picks how the image of every item row is kept:

  raw       uint8 pixels. The in-process path writes one memmapped table,
            images.npy [num_items, H, W, 3]; the Beam path writes the same
            bytes as ArrayRecord records (workers cannot share a memmap on
            an object store). Fastest to read; H*W*3 bytes per item (150 KB
            at 224 px), so meant for small images.
  png       resized at prepare time, stored as PNG: lossless, so batches
            hold exactly the raw pixels; decoded in the Grain map.
  jpeg      resized, stored as JPEG (quality JPEG_QUALITY): smallest, lossy.
  original  the image file's own bytes (JPEG/PNG/WebP as the user gave
            them; Beam path on BYOD data), decoded and resized in the Grain
            map with the same function (image_io) that prepares raw pixels,
            so the pixels equal the raw table's.

Encoded stores: images/images.array_record-{i:05d}-of-{n:05d}; record r of
the concatenated shards is item row r (b'' for an item without a usable
image: no impression refers to it). Shard i holds rows [i*S, (i+1)*S),
S = ceil(num_items / n), so each shard is written by one worker.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from csctr.data import image_io
from csctr.data import prepared

STORAGES = ("raw", "png", "jpeg", "original")
TABLE_FILE = prepared.IMAGES_FILE
STORE_DIR = "images"
JPEG_QUALITY = 90
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random reads


def shard_rows(num_items: int, num_shards: int, shard: int) -> range:
  per = max(1, math.ceil(num_items / num_shards))
  return range(min(shard * per, num_items), min((shard + 1) * per, num_items))


def store_paths(path: str, num_shards: int) -> list[str]:
  return [os.path.join(path, STORE_DIR,
                       f"images.array_record-{i:05d}-of-{num_shards:05d}")
          for i in range(num_shards)]


def encode(pixels: np.ndarray, storage: str) -> bytes:
  """uint8 [H, W, 3] -> the stored bytes (not for 'original')."""
  if storage == "raw":
    return np.ascontiguousarray(pixels, np.uint8).tobytes()
  buf = io.BytesIO()
  if storage == "png":
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
  elif storage == "jpeg":
    Image.fromarray(pixels).save(buf, "JPEG", quality=JPEG_QUALITY)
  else:
    raise ValueError(f"image_storage {storage!r} not in {STORAGES}")
  return buf.getvalue()


def decode(data: bytes, storage: str, size: int,
           resize: str = "pad") -> np.ndarray:
  """Stored bytes -> uint8 [size, size, 3]; b'' -> zeros."""
  if not data:
    return np.zeros((size, size, 3), np.uint8)
  if storage == "raw":
    return np.frombuffer(data, np.uint8).reshape(size, size, 3)
  if storage == "original":
    return image_io.decode_image_bytes(data, size, resize)
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"), np.uint8).reshape(size, size, 3)


def write_shard(path: str, rows: Sequence[int],
                payloads: dict[int, bytes]) -> int:
  """Writes one store shard: one record per row (b'' where none); bytes."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
  total = 0
  try:
    for r in rows:
      data = payloads.get(r, b"")
      writer.write(data)
      total += len(data)
  finally:
    writer.close()
  return total


class ImageTable:
  """Random access to item images: table[rows] -> uint8 [n, H, W, 3].

  Looks like the uint8 array it stands for (len, shape, dtype, indexing by
  row arrays and slices). Opened lazily and dropped when pickled, so Grain
  worker processes reopen the files instead of receiving a copy.
  """

  dtype = np.dtype(np.uint8)

  def __init__(self, path: str, storage: str, size: int, num_items: int,
               num_shards: int, resize: str = "pad"):
    self.path, self.storage, self.size = path, storage, size
    self.num_items, self.num_shards, self.resize = num_items, num_shards, resize
    self.shape = (num_items, size, size, 3)
    self._reader = None

  def __len__(self) -> int:
    return self.num_items

  def __getstate__(self):
    return {**self.__dict__, "_reader": None}

  def _open(self):
    if self._reader is None:
      table = os.path.join(self.path, TABLE_FILE)
      if os.path.exists(table):
        self._reader = np.load(table, mmap_mode="r")
      else:
        from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
        self._reader = array_record_data_source.ArrayRecordDataSource(
            store_paths(self.path, self.num_shards))
    return self._reader

  def __getitem__(self, rows: np.ndarray | slice) -> np.ndarray:
    reader = self._open()
    if isinstance(reader, np.ndarray):
      return reader[rows]
    if isinstance(rows, slice):
      rows = np.arange(self.num_items)[rows]
    rows = np.asarray(rows).reshape(-1)
    out = np.empty((len(rows), self.size, self.size, 3), np.uint8)
    for j, data in enumerate(reader.__getitems__(rows.tolist())):
      out[j] = decode(data, self.storage, self.size, self.resize)
    return out


def open_images(path: str, info: Any) -> ImageTable:
  """The image table of a prepared dataset (info: its DataInfo)."""
  extras = info.extras
  return ImageTable(path, extras.get("image_storage", "raw"), info.image_size,
                    extras["num_items"], extras.get("image_shards", 1),
                    extras.get("image_resize", "pad"))
