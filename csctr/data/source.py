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

# Keys of an impression chunk (each value has leading dimension n):
#   item           int32 [n]     item row (index into the image table)
#   sparse         int32 [n, F]  vocabulary rows of the sparse features, OOV 0
#   dense          float32 [n, D]
#   label          float32 [n]   in {0, 1}
#   user_id        int32 [n]     raw user id (GAUC groups by it)
#   is_cold        bool [n]      item absent from the training split
#   impression_id  int32 [n]     unique over the whole dataset
#   behavior       int32 [n, L]  item rows clicked before, -1 = none (L > 0)
#   true_ctr       float32 [n]   simulated datasets only
ImpressionChunk = dict[str, np.ndarray]


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
    vocabularies: feature -> raw id -> row, saved with the dataset (vocab/)
      so that serving maps raw ids as training did; None for simulated data.
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
  vocabularies: dict[str, Any] | None = None

  @property
  def num_items(self) -> int:
    return int(self.item_category.shape[0])
