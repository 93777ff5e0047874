"""The CSCNN paper's Amazon protocol (from DVBPR): implicit feedback, BPR.

Commands (convert once, then train; data/amazon/README.md has the details):
  python data/amazon/convert.py --reviews=reviews_Clothing_Shoes_and_Jewelry.json.gz \
      --meta=meta_Clothing_Shoes_and_Jewelry.json.gz --images=/data/amazon/images \
      --out=/data/amazon/clothing --negatives=1 --seed=0
  python -m csctr.main --config=configs/amazon.py:byod_path=/data/amazon/clothing \
      --workdir=/tmp/csctr_amazon

Every review is a positive with sampled unreviewed items as negatives. The
loss is pairwise BPR (config.loss='bpr'; pairing documented in
csctr.training.losses.bpr_loss: each positive against the negatives of its user in the
batch, else all negatives of the batch). Reported like the paper: AUC over
all test impressions and cold-item AUC (items never seen in training), plus
GAUC (per-user AUC). The paper uses CNN-F on 224 px images; here 64 px and
the small CNN fit a CPU, and
  --config=configs/amazon.py:byod_path=...,backbone=cnnf --config.data.image_size=224
is the paper's setting for accelerators.
"""

import ml_collections

from configs import default
from csctr import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = "amazon"
  # data/amazon/convert.py symlinks the downloaded images (--link=symlink).
  config.byod.allow_external_links = True
  config.loss = "bpr"
  config.data.image_size = 64
  # Reviews rarely share an item within a batch: smaller groups, more of them.
  config.data.group_size = 5
  config.data.groups_per_batch = 64
  config.data.unique_images = 64
  config.data.eval_groups_per_batch = 128
  config.data.eval_unique_images = 128
  return configlib.apply_arg(config, arg)  # the arg wins
