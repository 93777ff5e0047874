"""DICM (Ge et al., CIKM 2018): the user's behaviour images, embedded by CSCNN.

Command:
  python -m csctr.main --config=configs/dicm.py --workdir=/tmp/csctr_dicm

The synthetic data with each impression's last 5 clicked items as behaviour
images, pooled with an attention unit queried by the ad image (DIN-style).
The other poolings are one arg away:
  --config=configs/dicm.py:behavior_pooling=multi_query   (ad image + ad ID)
  --config=configs/dicm.py:behavior_pooling=sum           (or max)
Ad and behaviour images share one unique-image table per batch (Alibaba's
AMS), so unique_images is raised to make room. A batch of 8 groups x 25
impressions x 5 behaviours references ~540 images; measured with
pipeline.behavior_overflow (20 train batches, seed 0), U = 128 dropped 43%
of the references, 384 dropped 1.6%, 448 drops 0.3%. Training stops if a
log window drops more than data.max_dropped_behavior_fraction (5%); eval
batches are cut so that nothing is dropped (csctr/data/pipeline.py).
"""

import ml_collections

from configs import default
from csctr import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.num_behaviors = 5
  config.data.unique_images = 448
  config.data.eval_unique_images = 256
  config.model.behavior_pooling = "attentive"
  return configlib.apply_arg(config, arg)  # the arg wins
