"""The interface between raw datasets and the prepare step.

Every dataset (synthetic, fashion_mnist, byod, amazon via byod) is turned into
a `Source`: items with a category and an image, and impressions per split,
already mapped to vocabulary rows (row 0 = OOV). `csctr.data.prepare` consumes a
Source once, packs impressions sharing an ad image into groups of at most K,
and writes ArrayRecord shards plus an image table; training never touches the
raw data again.

Sources stream: both the item images and the impressions come in chunks, so a
10^7-impression dataset never has to sit in memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np

from csctr.data import vocab as vocab_lib

# The impression chunk, the one spec of it: key -> (dtype, width, meaning).
# Every value has leading dimension n; width None is [n], else [n, width]
# with the width named by the Source (F sparse features, D dense, L
# behaviours). Prepare stores these fields in its group records (the same
# spec, csctr/data/prepared.py), leaving out zero-width ones.
CHUNK_FIELDS: dict[str, tuple[Any, str | None, str]] = {
    "item": (np.int32, None, "item row (index into the image table)"),
    "label": (np.float32, None, "in {0, 1}"),
    "user_id": (np.int32, None, "raw user id (GAUC groups by it)"),
    "impression_id": (np.int32, None, "unique over the whole dataset"),
    "is_cold": (np.bool_, None, "item absent from the training split"),
    "sparse": (np.int32, "F", "vocabulary rows of the sparse features, OOV 0"),
    "dense": (np.float32, "D", "dense features (left out when D = 0)"),
    "behavior": (np.int32, "L", "item rows clicked before, -1 = none"),
}
# Optional beside them, never stored: 'true_ctr' float32 [n], the true CTR
# of simulated data, from which prepare computes the Bayes AUC.
ImpressionChunk = dict[str, np.ndarray]


def chunk_spec(num_sparse: int, num_dense: int,
               num_behaviors: int) -> dict[str, tuple[Any, tuple[int, ...]]]:
  """dtype and per-impression shape of every field, zero-width ones left out.

  A chunk's `key` has shape (n, *shape); a group record's the same with n
  impressions of one item, except 'item', one scalar per group.
  """
  widths = {None: (), "F": (num_sparse,), "D": (num_dense,),
            "L": (num_behaviors,)}
  return {key: (dtype, widths[width])
          for key, (dtype, width, _) in CHUNK_FIELDS.items()
          if 0 not in widths[width]}


@dataclasses.dataclass
class Source:
  """A dataset ready to be packed.

  Attributes:
    name: dataset name, e.g. 'synthetic'.
    image_size: H = W of the images `item_images` yields.
    item_category: int32 [num_items], category row of every item (0 = OOV).
    num_categories: category rows, OOV 0 included.
    sparse_features: column names of the impressions' `sparse`.
    vocab_sizes: rows of each sparse feature's table, OOV 0 included.
    num_dense: D.
    num_behaviors: L (0: no behaviour lists).
    item_images: yields (item rows int64 [m], uint8 images [m, H, W, 3]) over
      all items with a usable image, each exactly once.
    impressions: split name ('train' | 'test') -> iterator of chunks.
    bayes_auc: AUC of true_ctr on the test split, if simulated (prepare
      computes it from the test chunks' true_ctr when left None).
    stats: counters reported at prepare time (e.g. skipped corrupt images).
    vocabularies: feature -> the Vocabulary (raw id -> row) its `sparse`
      column was mapped with; prepare saves them (csctr/data/vocab.py) so
      that serving maps raw ids the same way.
  """

  name: str
  image_size: int
  item_category: np.ndarray
  num_categories: int
  sparse_features: tuple[str, ...]
  vocab_sizes: tuple[int, ...]
  num_dense: int
  num_behaviors: int
  item_images: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
  impressions: Callable[[str], Iterator[ImpressionChunk]]
  bayes_auc: float | None = None
  stats: dict[str, int] = dataclasses.field(default_factory=dict)
  vocabularies: dict[str, vocab_lib.Vocabulary] = dataclasses.field(
      default_factory=dict)

  @property
  def num_items(self) -> int:
    return int(self.item_category.shape[0])
