"""Batch shapes for sparse logs, derived from the data ('auto' batching).

A batch holds G groups of K impression slots, every group sharing one ad
image, so the CNN runs once per unique image. K = 25 suits a dense log (JD's
ads are shown many times); on a sparse one (3-4 impressions per item) most
of each group is padding and the batch trains on a fraction of its slots.
With config.data.batching = 'auto', prepare picks K from the train split's
impressions-per-image counts n_i, as the largest K <= max_group_size whose
packing efficiency

    sum_i n_i / (K * sum_i ceil(n_i / K))          (real / padded slots)

is >= target_packing (0.8 by default); every dataset reaches 1.0 at K = 1.
The trainer then keeps the config's number of impression slots per batch
(groups_per_batch * group_size as written) and sets G = slots / K, rounded
up to a multiple of the mesh's data axis, U = G plus the config's behaviour
budget (unique_images - groups_per_batch), and the same for the eval batch.
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections
import numpy as np

from csctr.data import batch as batch_lib

TARGET_PACKING = 0.8
MAX_GROUP_SIZE = 25


def packing_efficiency(counts: np.ndarray, group_size: int) -> float:
  """Real impressions / K slots when each image's n_i impressions are cut
  into ceil(n_i / K) groups (what prepare's Packer achieves up to carry-over)."""
  counts = np.asarray(counts, np.int64)
  counts = counts[counts > 0]
  slots = int(np.sum(-(-counts // group_size))) * group_size
  return float(counts.sum() / slots) if slots else 1.0


def choose_group_size(counts: np.ndarray, target: float = TARGET_PACKING,
                      max_group_size: int = MAX_GROUP_SIZE) -> int:
  """The largest K <= max_group_size packing at >= target (K = 1: 1.0)."""
  if not 0.0 < target <= 1.0:
    raise ValueError(f"target_packing={target} outside (0, 1]")
  return max(k for k in range(1, max_group_size + 1)
             if k == 1 or packing_efficiency(counts, k) >= target)


def histogram(counts: np.ndarray) -> dict[str, int]:
  """Images by train impressions, '1'..'9' and '10+' (info.json's record)."""
  counts = np.asarray(counts, np.int64)
  counts = counts[counts > 0]
  out = {str(n): int((counts == n).sum()) for n in range(1, 10)}
  out["10+"] = int((counts >= 10).sum())
  return out


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def resolve(config: ml_collections.ConfigDict, info: batch_lib.DataInfo,
            data_devices: int = 1) -> ml_collections.ConfigDict:
  """config with the batch shape of the prepared data's K (a copy).

  A config with batching != 'auto' is returned unchanged.
  """
  d = config.data
  if d.get("batching", "fixed") != "auto":
    return config
  k = int(info.extras["group_size"])
  config = copy.deepcopy(config)
  out: dict[str, Any] = {}
  for prefix in ("", "eval_"):
    g, u = d[prefix + "groups_per_batch"], d[prefix + "unique_images"]
    new_g = _round_up(max(1, -(-g * d.group_size // k)), data_devices)
    out[prefix + "groups_per_batch"] = new_g
    out[prefix + "unique_images"] = _round_up(new_g + max(u - g, 0),
                                              data_devices)
  with config.unlocked():
    config.data.group_size = k
    for key, value in out.items():
      config.data[key] = value
  return config
