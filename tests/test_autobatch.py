"""Auto batching: K from the impressions-per-image counts, >= 80% real slots."""

import numpy as np
import pytest

from configs import tiny
from csctr.data import autobatch
from csctr.data import pipeline


def _direct_efficiency(counts, k):
  """Real / padded slots, group by group."""
  real = slots = 0
  for n in counts:
    while n > 0:
      real += min(n, k)
      slots += k
      n -= k
  return real / slots


def test_group_size_is_the_largest_that_packs_at_the_target():
  rng = np.random.default_rng(0)
  counts = rng.integers(1, 6, 500)  # a sparse log: 1-5 per image
  k = autobatch.choose_group_size(counts, 0.8, 25)
  assert _direct_efficiency(counts, k) >= 0.8
  assert all(_direct_efficiency(counts, j) < 0.8 for j in range(k + 1, 26))
  for j in (1, 3, k, 25):
    assert autobatch.packing_efficiency(counts, j) == pytest.approx(
        _direct_efficiency(counts, j))
  dense = np.full(100, 50)  # 50 impressions per image: K = 25 packs fully
  assert autobatch.choose_group_size(dense, 0.8, 25) == 25


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
  config = tiny.get_config()
  config.data_dir = str(tmp_path_factory.mktemp("data"))
  # 3000 impressions over 1500 items: ~1-2 train impressions per image, so
  # tiny's K = 4 would fill well under half of the slots.
  config.synthetic.num_items = 1500
  config.data.batching = "auto"
  return config, pipeline.prepare_dataset(config)


def test_auto_batches_are_mostly_real_and_keep_the_slot_count(sparse):
  config, path = sparse
  info = pipeline.load_info(path)
  k = info.extras["group_size"]
  assert k < config.data.group_size
  assert info.splits["train"].packing_efficiency >= 0.8
  assert sum(info.extras["train_items_impressions"].values()) > 0
  resolved = autobatch.resolve(config, info, data_devices=8)
  d = resolved.data
  assert d.group_size == k and d.groups_per_batch % 8 == 0
  slots = config.data.groups_per_batch * config.data.group_size
  assert slots <= d.groups_per_batch * k < slots + 8 * k
  assert d.unique_images >= d.groups_per_batch  # one row per ad image
  batch = next(pipeline.train_iterator(resolved, path))
  assert batch["ad_image"].shape == (d.groups_per_batch * k,)
  assert batch["images"].shape[0] == d.unique_images
  # The CNN still runs once per unique image: no image row repeats.
  rows = batch["images"][batch["image_mask"]]
  assert len(np.unique(rows.reshape(len(rows), -1), axis=0)) == len(rows)
  assert config.data.group_size == 4  # the caller's config is not changed
