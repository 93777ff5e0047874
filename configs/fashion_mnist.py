"""CSCNN + DCN on Fashion-MNIST product images with simulated users.

Command:
  python -m csctr.main --config=configs/fashion_mnist.py --workdir=/tmp/csctr_fmnist

Real clothing images (the 10 classes are the categories) and users whose
taste within a category depends on the pixels; the test split's Bayes AUC is
recorded next to the model's AUC. Needs the four Fashion-MNIST files under
config.fashion_mnist.path (Debian/Ubuntu: apt-get install
dataset-fashion-mnist). Ablations as in configs/default.py, e.g.
  --config=configs/fashion_mnist.py:attention=cbam
  --config=configs/fashion_mnist.py:use_image=False

Expected AUC and wall time: see the README's results table (measured runs).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config(arg)
  config.dataset = "fashion_mnist"
  # 28 px originals, padded (not resized) into 32 x 32.
  config.data.image_size = 32
  return config
