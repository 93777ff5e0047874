"""CSCNN + DCN on your own data: a directory of items, impressions and images.

Command:
  python -m csctr.main --config=configs/byod.py:byod_path=/data/my_shop \
      --workdir=/tmp/csctr_my_shop

(or --config=configs/byod.py --config.byod_path=/data/my_shop). The layout
of the directory (items.csv, impressions.csv, images/) and how it is read are
in docs/byod.md. Real photos carry more detail than the synthetic images, so
images are stored at 64 px; the paper's CNN-F backbone is one arg away:
  --config=configs/byod.py:byod_path=/data/my_shop,backbone=cnnf
(slow on CPU; meant for accelerators). There is no Bayes AUC for real data.

Made for logs it has never seen:
  - batching='auto': group_size is chosen from your impressions per image
    (the largest K <= 25 whose groups are >= 80% real impressions), and
    groups_per_batch keeps 200 impression slots per batch
    (csctr/data/autobatch.py). A dense log keeps K = 25; a sparse one
    (a few impressions per item) gets small groups instead of padding.
  - validation_fraction=0.1: the last tenth of the train rows (file order)
    selects the checkpoint; the test
    split is scored once, on the best one. WORKDIR/baselines.json holds the
    popularity, item-CTR, user x category and ID-only LR baselines on the
    same splits.
"""

import ml_collections

from configs import default
from csctr import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = "byod"
  config.data.image_size = 64
  config.data.batching = "auto"
  config.data.validation_fraction = 0.1
  return configlib.apply_arg(config, arg)  # the arg wins
