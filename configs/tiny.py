"""Smoke-test config: the default experiment shrunk to seconds on one CPU core.

Command:
  python -m csctr.main --config=configs/tiny.py --workdir=/tmp/csctr_tiny

Used by the tests (training, kill-and-resume, sharding); 16 px images, two
conv layers, 3 000 synthetic impressions, 24 steps of 8 groups x 4
impressions. Its AUC is far below the Bayes AUC it reports: it checks the
machinery, not the model. Takes the same config args as configs/default.py.
"""

import ml_collections

from configs import default
from csctr import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.synthetic.num_impressions = 3_000
  config.synthetic.num_items = 120
  config.synthetic.num_users = 61  # 62 user rows: shardable over 'model'
  config.synthetic.num_categories = 3

  config.data.image_size = 16
  config.data.group_size = 4
  config.data.groups_per_batch = 8  # divisible by 8 devices on 'data'
  config.data.unique_images = 8
  config.data.eval_groups_per_batch = 64
  config.data.eval_unique_images = 64

  config.model.small_channels = (8, 8)
  config.model.visual_dim = 8
  config.model.embed_dim = 4
  config.model.cross_layers = 2
  config.model.mlp_dims = (16,)

  config.optim.warmup_steps = 4
  config.num_train_steps = 24
  config.log_every = 6
  config.eval_every = 12
  config.checkpoint_every = 6
  return configlib.apply_arg(config, arg)  # the arg wins
