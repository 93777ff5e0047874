"""The batch contract shared by the data pipeline, the models and the trainer.

CNN cost dominates visual CTR models, so a batch carries a table of *unique*
images and impressions index into it: the CNN runs once per unique image per
batch and its output is gathered for every impression (JD groups 25 ads per
image; Alibaba's AMS does the same for behaviour images).

    images            uint8   [U, H, W, 3]  unique images of the batch
    image_category    int32   [U]           category of each unique image (0 = OOV)
    image_mask        bool    [U]           padding rows are False
    ad_image          int32   [B]           row of `images` for each impression
    behavior_images   int32   [B, L]        rows of `images` (DICM); only if L > 0
    behavior_mask     bool    [B, L]        only if L > 0
    behavior_dropped  int32   [B]           references the unique-image budget
                                            could not hold (masked); L > 0
    sparse            int32   [B, F]        ID features, columns named by DataInfo
    dense             float32 [B, D]        D may be 0
    label             float32 [B]
    weight            float32 [B]           0 for padding impressions
    user_id           int32   [B]           raw user id, for GAUC
    is_cold           bool    [B]           item never seen in training
    impression_id     int32   [B]           global impression id, -1 for padding

B = groups_per_batch * group_size (G groups of up to K impressions sharing one
ad image) and U = unique_images are pure functions of the config, so XLA
compiles once. Both axes are split over the mesh's 'data' devices in the same
D blocks (`Shards`): block j is impressions [jB/D, (j+1)B/D) and image rows
[jU/D, (j+1)U/D); image indices stay global. Row 0 of every ID vocabulary (and category 0) is the
out-of-vocabulary bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SplitStats:
  """Counts of one prepared split, written by prepare (info.json 'splits').

  Attributes:
    impressions: real impressions of the split.
    groups: image-group records (readers size the split by it).
    clicks: impressions with label 1.
    cold_impressions: impressions of items never seen in training.
    packing_efficiency: impressions / (groups * K), the filled slots.
    ctr: clicks / impressions.
    bayes_auc: AUC of the true CTR on the split (simulated data), else None.
    bayes_auc_cold: the same on its cold impressions.
    shard_lengths: groups per ArrayRecord shard (prepared.shard_paths).
  """

  impressions: int
  groups: int
  clicks: int
  cold_impressions: int
  packing_efficiency: float
  ctr: float
  bayes_auc: float | None = None
  bayes_auc_cold: float | None = None
  # Groups in each ArrayRecord shard of the split, in order (the Beam path
  # writes many; empty for datasets prepared before shards were recorded).
  shard_lengths: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a model needs to know about a prepared dataset.

  Serialised by to_json / from_json only: prepare's info.json and the run
  directory's data_info.json hold the same object.

  Attributes:
    sparse_features: names of the columns of `batch['sparse']`, in order. The
      conventional names 'user_id', 'item_id' and 'category_id' come first
      when present; further columns are extra categorical features.
    vocab_sizes: rows of each sparse feature's embedding table, OOV row 0
      included.
    num_dense: width D of `batch['dense']` (0 when there are none).
    num_categories: image categories, OOV category 0 included.
    image_size: H = W of the stored images.
    num_behaviors: L, behaviour images per impression (0: no DICM lists).
    bayes_auc: AUC of the true CTR on the test split, when the data is
      simulated (None for real data).
    extras: anything else the dataset records (packing, source counters).
    splits: split name -> its counts (empty when not from a prepared dataset).
  """

  sparse_features: tuple[str, ...]
  vocab_sizes: tuple[int, ...]
  num_dense: int
  num_categories: int
  image_size: int
  num_behaviors: int = 0
  bayes_auc: float | None = None
  extras: dict[str, Any] = dataclasses.field(default_factory=dict)
  splits: dict[str, SplitStats] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict (numpy scalars in extras need a `default=`)."""
    out = dataclasses.asdict(self)
    out["sparse_features"] = list(self.sparse_features)
    out["vocab_sizes"] = list(self.vocab_sizes)
    return out

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> DataInfo:
    """The inverse of to_json; ignores other keys (e.g. a run's data_path)."""
    extras = dict(d["extras"])
    # info.json before typed splits kept them in extras (FORMAT_VERSION 2).
    splits = d["splits"] if "splits" in d else extras.pop("splits", {})
    return cls(
        sparse_features=tuple(d["sparse_features"]),
        vocab_sizes=tuple(int(v) for v in d["vocab_sizes"]),
        num_dense=d["num_dense"], num_categories=d["num_categories"],
        image_size=d["image_size"], num_behaviors=d["num_behaviors"],
        bayes_auc=d["bayes_auc"], extras=extras,
        splits={k: SplitStats(**v) for k, v in splits.items()})

  def feature_index(self, name: str) -> int:
    """Column of `batch['sparse']` holding feature `name`."""
    try:
      return self.sparse_features.index(name)
    except ValueError:
      raise KeyError(
          f"sparse feature {name!r} not in {self.sparse_features}") from None


@dataclasses.dataclass(frozen=True)
class Shards:
  """Which of a global batch's `count` row blocks this process builds.

  Block j holds impression rows [j*B/count, (j+1)*B/count) and image rows
  [j*U/count, (j+1)*U/count); `local` lists this process's blocks in
  increasing order, and its batches are those blocks concatenated.
  """

  count: int = 1
  local: tuple[int, ...] = (0,)

  def rows(self, total: int, what: str) -> np.ndarray:
    """Indices of this process's rows among `total` global rows."""
    if total % self.count:
      raise ValueError(f"{what}={total} is not divisible by the {self.count} "
                       "devices of mesh axis 'data'")
    per = total // self.count
    return (np.asarray(self.local)[:, None] * per + np.arange(per)).reshape(-1)

  @property
  def is_all(self) -> bool:
    return self.local == tuple(range(self.count))


# Batch fields whose rows are image rows (U); all others are impressions (B).
IMAGE_ROW_FIELDS = ("images", "image_category", "image_mask")


def batch_shapes(info: DataInfo, groups_per_batch: int, group_size: int,
                 unique_images: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shape and dtype of every batch field; a pure function of config + info."""
  b, u, s = groups_per_batch * group_size, unique_images, info.image_size
  if u < groups_per_batch:
    raise ValueError(f"unique_images={u} must be >= groups_per_batch={groups_per_batch}")
  shapes = {
      "images": ((u, s, s, 3), np.uint8),
      "image_category": ((u,), np.int32),
      "image_mask": ((u,), np.bool_),
      "ad_image": ((b,), np.int32),
      "sparse": ((b, len(info.sparse_features)), np.int32),
      "dense": ((b, info.num_dense), np.float32),
      "label": ((b,), np.float32),
      "weight": ((b,), np.float32),
      "user_id": ((b,), np.int32),
      "is_cold": ((b,), np.bool_),
      "impression_id": ((b,), np.int32),
  }
  if info.num_behaviors:
    shapes["behavior_images"] = ((b, info.num_behaviors), np.int32)
    shapes["behavior_mask"] = ((b, info.num_behaviors), np.bool_)
    shapes["behavior_dropped"] = ((b,), np.int32)
  return shapes


def dummy_batch(info: DataInfo, groups_per_batch: int, group_size: int,
                unique_images: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A random batch that satisfies the contract, for tests and shape tracing.

  Every group g uses image row g; rows >= groups_per_batch hold behaviour
  images. Impressions of the last group beyond the first are padding
  (weight 0), so code paths for masks are exercised.
  """
  rng = np.random.default_rng(seed)
  shapes = batch_shapes(info, groups_per_batch, group_size, unique_images)
  g, k = groups_per_batch, group_size
  b, u = g * k, unique_images
  batch = {}
  batch["images"] = rng.integers(0, 256, shapes["images"][0], dtype=np.uint8)
  batch["image_category"] = rng.integers(
      0, info.num_categories, (u,)).astype(np.int32)
  batch["image_mask"] = np.ones((u,), np.bool_)
  batch["ad_image"] = np.repeat(np.arange(g, dtype=np.int32), k)
  batch["sparse"] = np.stack(
      [rng.integers(0, v, (b,)) for v in info.vocab_sizes], axis=1
  ).astype(np.int32).reshape(b, len(info.vocab_sizes))
  batch["dense"] = rng.normal(size=(b, info.num_dense)).astype(np.float32)
  batch["label"] = rng.integers(0, 2, (b,)).astype(np.float32)
  weight = np.ones((b,), np.float32)
  weight[(g - 1) * k + 1:] = 0.0
  batch["weight"] = weight
  batch["user_id"] = rng.integers(0, 50, (b,)).astype(np.int32)
  batch["is_cold"] = rng.random((b,)) < 0.2
  batch["impression_id"] = np.where(
      weight > 0, np.arange(b), -1).astype(np.int32)
  if info.num_behaviors:
    lo = min(g, u - 1)
    batch["behavior_images"] = rng.integers(
        lo, u, (b, info.num_behaviors)).astype(np.int32)
    batch["behavior_mask"] = rng.random((b, info.num_behaviors)) < 0.7
    batch["behavior_dropped"] = np.zeros((b,), np.int32)
  return batch


def last_valid(ids: np.ndarray, valid: np.ndarray, length: int) -> np.ndarray:
  """The last `length` entries of `ids` whose `valid` is set, oldest first.

  The one truncation policy of behaviour lists: the data sources apply it
  when they write a list (unknown or unusable ids are skipped, then the
  most recent L kept) and the online scorer applies it to a request's
  behavior_ids (ids missing from its table skipped), so a list means the
  same to a model in training and in serving.
  """
  ids = np.asarray(ids).reshape(-1)
  kept = ids[np.asarray(valid, bool).reshape(-1)]
  return kept[max(len(kept) - length, 0):] if length > 0 else kept[:0]
