"""CSCNN + DCN on the sparse long-tail benchmark (csctr/data/sparse_log.py).

Command:
  python -m csctr.main --config=configs/sparse.py --workdir=/tmp/csctr_sparse

20 000 items shown 1-5 times each (43 804 logged impressions, 16% clicks
after negative sampling), 100 categories, 32 px photo-like images, 2 000
users; a tenth of the items appear only in the test period. The batch shape
comes from the data (batching='auto': K=1 on this log, so every batch slot
is a real impression and the CNN runs once per impression), and the last
tenth of the train period is the validation split that picks the checkpoint
the test split is scored on. Results with paired seeds, the no-image model
and the baselines: docs/results.md (benchmarks/sparse_benchmark.py).
"""

import ml_collections

from configs import default
from csctr import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = "sparse"
  config.data.batching = "auto"
  config.data.validation_fraction = 0.1
  # 128 impression slots per batch (auto keeps group_size x groups_per_batch).
  config.data.group_size = 16
  config.data.groups_per_batch = 8
  config.data.unique_images = 8
  # Sized for 2 shared CPU cores (docs/results.md): 24 px, a narrow CNN,
  # 800 steps (3.2 epochs), the best of 4 validation evals.
  config.data.image_size = 24
  config.model.small_channels = (16, 16, 32, 32)
  config.optim.lr = 5e-3
  # With 1-5 impressions per item an item's ID row memorises its few labels
  # and takes the gradient the image encoder needs; dropping half of the IDs
  # in training makes the model read the image (and trains the OOV row the
  # cold items get).
  config.model.id_dropout = 0.5
  config.num_train_steps = 800
  # Validation eval and checkpoint every 200 steps; the best one is tested.
  config.eval_every = config.checkpoint_every = 200
  config.log_every = 100
  return configlib.apply_arg(config, arg)  # the arg wins
