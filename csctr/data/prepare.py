"""Prepare step: pack a Source into image groups, write ArrayRecord + images.

A prepared dataset is a directory, written once and then only read:

    info.json            DataInfo fields + bayes_auc + counts + packing stats
    images.npy           uint8 [num_items, H, W, 3], the image table (memmap)
    item_category.npy    int32 [num_items], category row of every item
    groups/              a TFDS dataset (tfds.builder_from_directory reads it):
                         dataset_info.json, features.json,
                         groups-{train,test}.array_record-00000-of-00001

Each ArrayRecord record is one *image group*: up to K impressions of the same
ad item, stored as a tf.train.Example of `tfds.features.Tensor` features
(`group_features`): item (scalar image row), label, user_id, impression_id,
is_cold [n], sparse [n, F], dense [n, D] (only when D > 0), behavior [n, L]
(only when L > 0; item rows, -1 = none). Images are not in the records: an
item's image is stored once in the image table, however many groups and
behaviour lists refer to it, and batching gathers its rows.

Packing streams (Packer, csctr/data/packing.py): each impression chunk of
the Source is sorted by item (stable, so time order survives inside a group)
and cut into groups of at most K; an item's leftover partial group is
carried into the next chunk (up to MAX_PENDING impressions), so groups fill
up even when each chunk holds few impressions per item. Memory is bounded by
a chunk plus the carried impressions, plus 9 bytes per test impression (true CTR, label, cold flag)
kept to compute the exact Bayes AUC. The packing efficiency (real
impressions / K slots) is recorded per split in info.json.

Why ArrayRecord is written directly and not through a GeneratorBasedBuilder.
TFDS works here without TensorFlow, and the builder path was tried: it
writes correct ArrayRecord, but its writer keeps every serialized example in
an in-memory shuffle buffer of up to 1 GB (so a 10^7-impression dataset sits
in memory whole, even with `disable_shuffling`), then writes the data a
second time from that buffer, and it has no hook to write the image table or
to make the whole directory appear atomically. So the shards are written
here with `ArrayRecordWriter` while streaming, the records are the protos
TFDS's own FeaturesDict serializes (built directly, five times faster:
group_serializer), and `tfds.folder_dataset.write_metadata` adds the TFDS
metadata: the result is an ordinary TFDS dataset that
`tfds.builder_from_directory(path/groups).as_data_source(split)` reads.
The pipeline reads the same records through pipeline.GroupSource, a
five-times cheaper decoder of the same protos (TFDS's generic decoder is most
of a batch's cost otherwise). TFDS cannot decode zero-width tensors, hence
dense and behavior are left out of the records when empty.

Atomicity: everything is written to a temporary sibling directory that is
renamed into place last, so a crash mid-prepare never leaves a directory
that looks complete; a concurrent preparer that loses the rename race just
deletes its copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Iterable

from absl import logging
from array_record.python import array_record_module
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from csctr import metrics
from csctr import storage
from csctr.data import autobatch
from csctr.data import batch as batch_lib
from csctr.data import image_store
from csctr.data import packing
from csctr.data import prepared
from csctr.data import source as source_lib
from csctr.data import vocab

WRITER_OPTIONS = "group_size:1,snappy"


def group_features(num_sparse: int, num_dense: int,
                   num_behaviors: int) -> tfds.features.FeaturesDict:
  """TFDS features of one image-group record."""
  return tfds.features.FeaturesDict({
      k: tfds.features.Tensor(shape=shape if k == "item" else (None, *shape),
                              dtype=dtype)
      for k, (dtype, shape) in prepared.group_spec(
          num_sparse, num_dense, num_behaviors).items()})


def _check_chunk(chunk: source_lib.ImpressionChunk,
                 source: source_lib.Source) -> source_lib.ImpressionChunk:
  """Validates a Source chunk and casts it to the stored dtypes."""
  n = len(chunk["item"])
  out = {}
  for key, (dtype, shape) in source_lib.chunk_spec(
      len(source.sparse_features), source.num_dense,
      source.num_behaviors).items():
    if key not in chunk:
      raise ValueError(f"{source.name}: impression chunk lacks {key!r}")
    value = np.asarray(chunk[key])
    if value.shape != (n, *shape):
      raise ValueError(f"{source.name}: chunk[{key!r}] has shape "
                       f"{value.shape}, want {(n, *shape)}")
    out[key] = value.astype(dtype, copy=False)
  # Out-of-range rows would be clamped silently by XLA's gathers: catch here.
  if n and (out["item"].min() < 0 or out["item"].max() >= source.num_items):
    raise ValueError(
        f"{source.name}: item rows outside [0, {source.num_items})")
  if n and "behavior" in out and (out["behavior"].min() < -1 or
                                  out["behavior"].max() >= source.num_items):
    raise ValueError(f"{source.name}: behavior rows outside [-1, "
                     f"{source.num_items})")
  vocab = np.asarray(source.vocab_sizes)
  if n and ((out["sparse"] < 0).any() or (out["sparse"] >= vocab).any()):
    bad = np.flatnonzero(
        ((out["sparse"] < 0) | (out["sparse"] >= vocab)).any(0))
    raise ValueError(f"{source.name}: sparse feature(s) "
                     f"{[source.sparse_features[i] for i in bad]} outside "
                     f"[0, vocab_size) (vocab_sizes={tuple(vocab)})")
  if not ((out["label"] == 0) | (out["label"] == 1)).all():
    raise ValueError(f"{source.name}: labels must be 0 or 1")
  if "true_ctr" in chunk:
    out["true_ctr"] = np.asarray(chunk["true_ctr"], np.float32)
  return out


def _write_images(source: source_lib.Source, tmp: str,
                  storage: str) -> dict[str, Any]:
  """The image table (raw) or an encoded store of one shard; categories."""
  s, n = source.image_size, source.num_items
  if storage == "raw":
    table = np.lib.format.open_memmap(
        os.path.join(tmp, image_store.TABLE_FILE), mode="w+", dtype=np.uint8,
        shape=(n, s, s, 3))
  elif storage in image_store.STORAGES and storage != "original":
    table = {}
  else:
    raise ValueError(f"image_storage {storage!r}: the in-process path "
                     f"stores {image_store.STORAGES[:-1]}")
  seen = np.zeros(n, bool)
  for rows, images in source.item_images():
    if images.shape[1:] != (s, s, 3) or images.dtype != np.uint8:
      raise ValueError(f"{source.name}: images must be uint8 [m, {s}, {s}, 3],"
                       f" got {images.dtype} {images.shape}")
    if storage == "raw":
      table[rows] = images
    else:
      table.update((int(r), image_store.encode(im, storage))
                   for r, im in zip(rows, images))
    seen[rows] = True
  if storage == "raw":
    table.flush()
  else:
    image_store.write_shard(image_store.store_paths(tmp, 1)[0], range(n),
                            table)
  del table
  np.save(os.path.join(tmp, prepared.CATEGORY_FILE),
          np.asarray(source.item_category, np.int32))
  return {"num_items": n, "items_without_image": int((~seen).sum()),
          "image_storage": storage, "image_shards": 1}


def _split_groups(source, split, group_size, scores):
  """The split's checked impressions, packed (see Packer)."""
  yield from _pack((_check_chunk(raw, source)
                    for raw in source.impressions(split)), group_size, scores)


def _pack(chunks, group_size, scores):
  """Packs checked chunks; keeps (true CTR, label, cold) for the Bayes AUC."""
  packer = packing.Packer(group_size, packing.MAX_PENDING)
  for chunk in chunks:
    if "true_ctr" in chunk:
      scores.append((chunk["true_ctr"], chunk["label"], chunk["is_cold"]))
    chunk = {k: v for k, v in chunk.items() if k != "true_ctr"}
    yield from packer.add(chunk)
  yield from packer.finish()


def count_train(source: source_lib.Source) -> np.ndarray:
  """Train impressions per item row (one extra pass over the train stream)."""
  return sum((np.bincount(np.asarray(raw["item"], np.int64),
                          minlength=source.num_items)
              for raw in source.impressions("train")),
             np.zeros(source.num_items, np.int64))


def _train_chunks(source, num_train, num_validation, held):
  """The train stream without its validation rows, which go to `held`.

  The last `num_validation` impressions of the stream are validation, unless
  the source marks rows itself (chunk['is_validation']). Held rows wait in
  memory until the train part has been seen, so that an item absent from it
  is marked cold in validation (as in test).
  """
  seen = np.zeros(source.num_items, bool)
  first_val = num_train - num_validation if num_validation else np.inf
  position = 0
  for raw in source.impressions("train"):
    chunk = _check_chunk(raw, source)
    n = len(chunk["item"])
    val = (np.asarray(raw["is_validation"], bool) if "is_validation" in raw
           else np.arange(position, position + n) >= first_val)
    position += n
    if val.any():
      held.append({k: v[val] for k, v in chunk.items()})
    if not val.all():
      part = {k: v[~val] for k, v in chunk.items()}
      seen[part["item"]] = True
      yield part
  for chunk in held:
    chunk["is_cold"] = chunk["is_cold"] | ~seen[chunk["item"]]


def _write_splits(source, tmp, features, group_size, num_validation,
                  num_train) -> dict[str, batch_lib.SplitStats]:
  """Writes train, validation (if asked for) and test; their SplitStats."""
  held, splits = [], {}
  scores = {"train": [], "validation": [], "test": []}
  splits["train"] = _write_split(
      tmp, "train", _pack(_train_chunks(source, num_train, num_validation,
                                        held), group_size, scores["train"]),
      features, group_size, scores["train"])
  if held:  # the validation split exists only when asked for
    splits["validation"] = _write_split(
        tmp, "validation", _pack(held, group_size, scores["validation"]),
        features, group_size, scores["validation"])
  splits["test"] = _write_split(
      tmp, "test", _split_groups(source, "test", group_size, scores["test"]),
      features, group_size, scores["test"])
  return splits


def _write_split(tmp, split, groups, features, group_size, scores):
  """Writes one split's groups; its SplitStats with its Bayes AUCs."""
  stats = split_counts([write_groups(prepared.shard_name(tmp, split, 0, 1),
                                     groups, features)], group_size)
  if scores:
    ctr, label, cold = (np.concatenate(x) for x in zip(*scores))
    stats = dataclasses.replace(stats, bayes_auc=_auc(label, ctr),
                                bayes_auc_cold=_auc(label[cold], ctr[cold]))
  return stats


def group_serializer(features: tfds.features.FeaturesDict
                     ) -> Callable[[dict[str, Any]], bytes]:
  """group -> the tf.train.Example bytes of features.serialize_example.

  The same proto (a test compares them parsed), built directly: TFDS's
  generic encoder took ~230 us per group, most of a large prepare's time;
  this takes ~40. Deterministic: map keys are serialized sorted.
  """
  floats = {k: np.dtype(f.np_dtype) == np.float32 for k, f in features.items()}

  def serialize(group: dict[str, Any]) -> bytes:
    example = tf_example_pb2.Example()
    feature = example.features.feature
    for key, is_float in floats.items():
      value = np.asarray(group[key]).ravel()
      if is_float:
        feature[key].float_list.value[:] = value.astype(np.float32).tolist()
      else:
        feature[key].int64_list.value[:] = value.astype(np.int64).tolist()
    return example.SerializeToString(deterministic=True)

  return serialize


def write_groups(path: str, groups: Iterable[dict[str, Any]],
                 features: tfds.features.FeaturesDict) -> dict[str, int]:
  """Writes group records to one ArrayRecord shard; returns its counters."""
  serialize = group_serializer(features)
  counts = dict(impressions=0, groups=0, clicks=0, cold_impressions=0)
  # group_size:1 compresses every record on its own, so a random read
  # decompresses one record; snappy decompresses faster than the default.
  writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
  try:
    for group in groups:
      writer.write(serialize(group))
      counts["groups"] += 1
      counts["impressions"] += len(group["label"])
      counts["clicks"] += int(group["label"].sum())
      counts["cold_impressions"] += int(group["is_cold"].sum())
  finally:
    writer.close()
  return counts


def split_counts(shards: list[dict[str, int]],
                 group_size: int) -> batch_lib.SplitStats:
  """A split's counters from its shards' (write_groups) counters."""
  counts = {k: sum(c[k] for c in shards) for k in
            ("impressions", "groups", "clicks", "cold_impressions")}
  slots = counts["groups"] * group_size
  counts["packing_efficiency"] = counts["impressions"] / slots if slots else 0.0
  counts["ctr"] = counts["clicks"] / max(counts["impressions"], 1)
  return batch_lib.SplitStats(
      **counts, shard_lengths=tuple(c["groups"] for c in shards))


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
  """metrics.auc, with None (info.json's 'unknown') where it is undefined."""
  value = metrics.auc(labels, scores) if labels.size else float("nan")
  return None if np.isnan(value) else value


def prepare(source: source_lib.Source, path: str, *, group_size: int | str,
            key: dict[str, Any] | None = None,
            image_storage: str = "raw", validation_fraction: float = 0.0,
            target_packing: float = autobatch.TARGET_PACKING,
            max_group_size: int = autobatch.MAX_GROUP_SIZE) -> str:
  """Writes `source` as a prepared dataset at `path` (atomically).

  Args:
    source: the dataset to pack.
    path: final directory; must not exist yet.
    group_size: K, the most impressions per image group, or 'auto'
      (csctr/data/autobatch.py, with target_packing and max_group_size).
    key: the dataset-relevant config, recorded in info.json.
    image_storage: how images are kept (csctr.data.image_store.STORAGES,
      all but 'original').
    validation_fraction: the last fraction of the train stream (time order)
      becomes the 'validation' split, for model selection; 0: none.

  Returns:
    `path`.
  """
  start = time.time()
  tmp = prepared.make_tmp(path)
  try:
    image_counts = _write_images(source, tmp, image_storage)
    features = group_features(len(source.sparse_features), source.num_dense,
                              source.num_behaviors)
    os.makedirs(os.path.join(tmp, prepared.GROUPS_DIR))
    counts = (count_train(source)
              if validation_fraction or group_size == "auto" else None)
    if group_size == "auto":
      group_size = autobatch.choose_group_size(counts, target_packing,
                                               max_group_size)
    splits = _write_splits(source, tmp, features, group_size, int(round(
        (counts.sum() if counts is not None else 0) * validation_fraction)),
                           int(counts.sum()) if counts is not None else 0)
    bayes_auc = (source.bayes_auc if source.bayes_auc is not None
                 else splits["test"].bayes_auc)
    bayes_auc_cold = splits["test"].bayes_auc_cold
    info = batch_lib.DataInfo(
        sparse_features=tuple(source.sparse_features),
        vocab_sizes=tuple(int(v) for v in source.vocab_sizes),
        num_dense=source.num_dense, num_categories=source.num_categories,
        image_size=source.image_size, num_behaviors=source.num_behaviors,
        bayes_auc=bayes_auc, extras={
            "dataset": source.name, "group_size": group_size,
            "train_items_impressions": (autobatch.histogram(counts)
                                        if counts is not None else None),
            "bayes_auc_cold": bayes_auc_cold,
            "source_stats": dict(source.stats), "config": key or {},
            "prepared_by": "inprocess", **image_counts})
    finish(tmp, path, info, features, splits, source.vocabularies, start)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("prepared %s in %.1fs: %s", path, time.time() - start, splits)
  return path


def finish(tmp: str, path: str, info: batch_lib.DataInfo,
           features: tfds.features.FeaturesDict,
           splits: dict[str, batch_lib.SplitStats],
           vocabularies: dict[str, Any] | None, start: float) -> None:
  """Writes metadata, info.json and vocab/ into tmp, then commits it.

  Shared by both prepare paths: `splits` holds each split's split_counts
  (with shard_lengths) over shards already written as prepared.shard_name.
  """
  # TFDS looks for the shard files by name; the Beam path's remote shards
  # are already at `path`, so empty stand-ins are named here meanwhile.
  stand_ins = [] if not storage.is_remote(path) else [
      prepared.shard_name(tmp, s, i, len(c.shard_lengths))
      for s, c in splits.items() for i in range(len(c.shard_lengths))]
  for f in stand_ins:
    open(f, "wb").close()
  tfds.folder_dataset.write_metadata(
      data_dir=os.path.join(tmp, prepared.GROUPS_DIR), features=features,
      check_data=False, split_infos=[tfds.core.SplitInfo(
          name=s, shard_lengths=list(c.shard_lengths), num_bytes=0)
                                     for s, c in splits.items()],
      description="csctr image groups (see csctr/data/prepare.py)")
  for f in stand_ins:
    os.remove(f)
  if vocabularies:
    vocab.save_vocabularies(tmp, vocabularies)
  extras = {**info.extras, "format_version": prepared.FORMAT_VERSION,
            "packing_efficiency": splits["train"].packing_efficiency,
            "prepare_seconds": round(time.time() - start, 2)}
  info = dataclasses.replace(info, extras=extras, splits=splits)
  with open(os.path.join(tmp, prepared.INFO_FILE), "w") as f:
    json.dump(info.to_json(), f, indent=2, default=prepared.json_default)
  if not storage.is_remote(path):
    prepared.commit(tmp, path)
    return
  # The Beam path's shards are already at `path` (copied from staging):
  # upload the rest, the commit marker last, and drop the local copy.
  with open(os.path.join(tmp, prepared.COMMIT_FILE), "w") as f:
    f.write("ok\n")
  storage.upload_dir(tmp, path, prepared.COMMIT_FILE)
  shutil.rmtree(tmp, ignore_errors=True)
