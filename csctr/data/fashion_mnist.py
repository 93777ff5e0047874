"""Fashion-MNIST as a CTR benchmark: real clothing images, simulated users.

Items are Fashion-MNIST images (the 10 classes are the categories 1..10, 0 is
OOV). Warm items are drawn from the training file and cold items (introduced
only in the test period, mapped to the OOV item_id) from the t10k file, so no
cold image was ever seen in training. Users click according to the same true
click model as the synthetic benchmark (csctr.data.synthetic.ImpressionSimulator),
with the item's visual score taken from its real pixels:

* visual score: within each category, the image's coordinates on the
  category's top principal components (`config.fashion_mnist.
  visual_components`, default 3) of the 7x7 average-pooled image, each
  coordinate standardised, mixed by per-category random weights and
  squashed by tanh. A different mixture per category means
  the same pixels mean different things in different categories, as
  category-specific attention assumes. Why principal components and not a
  random projection of all 49 pooled pixels (the first version): the
  dominant modes of a category (silhouette width, sleeve length, brightness)
  are large-scale shapes that a small CNN learns from a few hundred items,
  while a random direction in standardised pixel space leans on faint,
  rarely-lit pixels; trained on the score itself, a 4-layer CNN explained 90%
  of it on cold items with 3 components but only 60% with the random
  projection, which left the CTR model almost nothing to learn from pixels;
* style (what a user's taste, and so their behaviour images, is about): the
  image's brightness quartile within its category.

The Bayes-optimal AUC of the test split is known and recorded by prepare.
Images are 28x28 grey; they are resized to round(28 * S / 32) (no resize at
S = 32), padded with black to S x S, and repeated to 3 channels.

Files (gzipped or not) under config.fashion_mnist.path: train-images-idx3-
ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-
ubyte. On Debian/Ubuntu: `apt-get install dataset-fashion-mnist` (installs to
/usr/share/datasets/fashion-mnist); elsewhere download them from DOWNLOAD_URL.
"""

from __future__ import annotations

import gzip
import os

import ml_collections
import numpy as np
from PIL import Image

from csctr.data import source as source_lib
from csctr.data import synthetic

DOWNLOAD_URL = "https://github.com/zalandoresearch/fashion-mnist#get-the-data"
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
           "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CATEGORIES = len(CLASSES) + 1  # row 0 = OOV
_ITEMS, _PROJECTION = 11, 12  # seed streams (synthetic uses 1..5)


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file (MNIST format; .gz or raw) of unsigned bytes."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte idx file")
  ndim = data[3]
  dims = np.frombuffer(data, ">u4", ndim, 4).astype(int)
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise ValueError(f"{path}: header says {tuple(dims)}, found {body.size} "
                     "bytes (truncated download?)")
  return body.reshape(dims)


def find_files(root: str) -> dict[str, str]:
  """Paths of the four files under root; a clear error if any is missing."""
  found, missing = {}, []
  for name in FILES:
    for candidate in (name + ".gz", name):
      if os.path.isfile(os.path.join(root, candidate)):
        found[name] = os.path.join(root, candidate)
        break
    else:
      missing.append(name + "[.gz]")
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST files missing under config.fashion_mnist.path="
        f"{root!r}: {', '.join(missing)}. On Debian/Ubuntu run "
        f"`apt-get install dataset-fashion-mnist` (files go to "
        f"/usr/share/datasets/fashion-mnist); elsewhere download them from "
        f"{DOWNLOAD_URL} and point config.fashion_mnist.path at them.")
  return found


def load(root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train images, train labels, test images, test labels) as uint8."""
  files = find_files(root)
  arrays = [read_idx(files[name]) for name in FILES]
  for images, labels in (arrays[0:2], arrays[2:4]):
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise ValueError(f"{root}: image/label files do not match "
                       f"({images.shape} vs {labels.shape})")
    if labels.size and labels.max() >= len(CLASSES):
      raise ValueError(f"{root}: labels outside 0..9")
  return tuple(arrays)


def visual_latents(pixels: np.ndarray, category: np.ndarray, seed: int,
                   num_components: int) -> tuple[np.ndarray, np.ndarray]:
  """(visual score in (-1, 1), brightness-quartile style) from the pixels."""
  n = len(pixels)
  h, w = pixels.shape[1] // 4 * 4, pixels.shape[2] // 4 * 4
  pooled = pixels[:, :h, :w].reshape(n, h // 4, 4, w // 4, 4).mean((2, 4))
  feats = pooled.reshape(n, -1).astype(np.float64) / 255.0
  rng = np.random.default_rng([seed, _PROJECTION])
  mixture = rng.normal(size=(NUM_CATEGORIES, num_components))
  score = np.zeros(n, np.float32)
  style = np.zeros(n, np.int32)
  brightness = feats.mean(1)
  for c in np.unique(category):
    sel = np.flatnonzero(category == c)
    f = feats[sel] - feats[sel].mean(0)
    # Rows of vt are the category's principal directions, largest first.
    _, _, vt = np.linalg.svd(f, full_matrices=False)
    k = min(num_components, len(vt))
    z = f @ vt[:k].T
    z /= z.std(0) + 1e-9  # each mode counts by its random weight alone
    raw = z @ mixture[c, :k]
    score[sel] = np.tanh(raw / (raw.std() + 1e-6))
    rank = np.argsort(np.argsort(brightness[sel], kind="stable"))
    style[sel] = rank * synthetic.NUM_SHAPES // len(sel)
  return score, style


def to_rgb(pixels: np.ndarray, size: int) -> np.ndarray:
  """uint8 [m, 28, 28] grey -> [m, size, size, 3], resized then padded."""
  inner = max(1, round(pixels.shape[1] * size / 32))
  if inner > size:
    inner = size
  out = np.zeros((len(pixels), size, size), np.uint8)
  lo = (size - inner) // 2
  for i, p in enumerate(pixels):
    if inner != p.shape[0]:
      p = np.asarray(Image.fromarray(p).resize((inner, inner),
                                               Image.BILINEAR))
    out[i, lo:lo + inner, lo:lo + inner] = p
  return np.repeat(out[..., None], 3, axis=-1)


def make_source(config: ml_collections.ConfigDict) -> source_lib.Source:
  """The Fashion-MNIST CTR dataset of `config.fashion_mnist` as a Source."""
  cfg, size = config.fashion_mnist, config.data.image_size
  train_x, train_y, test_x, test_y = load(cfg.path)
  num_cold = int(round(cfg.num_items * cfg.cold_item_fraction))
  num_warm = cfg.num_items - num_cold
  if num_warm > len(train_x) or num_cold > len(test_x):
    raise ValueError(f"num_items={cfg.num_items} needs {num_warm} train and "
                     f"{num_cold} t10k images; the files have {len(train_x)} "
                     f"and {len(test_x)}")
  rng = np.random.default_rng([cfg.seed, _ITEMS])
  warm = rng.choice(len(train_x), num_warm, replace=False)
  cold = rng.choice(len(test_x), num_cold, replace=False)
  pixels = np.concatenate([train_x[warm], test_x[cold]])
  category = np.concatenate([train_y[warm], test_y[cold]]).astype(np.int32) + 1
  score, style = visual_latents(
      pixels, category, cfg.seed, cfg.visual_components)
  items = synthetic.ItemLatents(
      category=category, visual_score=score, style=style,
      is_cold=np.arange(cfg.num_items) >= num_warm)
  sim = synthetic.simulator_for(items, NUM_CATEGORIES, cfg, config.data)

  def item_images(batch: int = 1024):
    for lo in range(0, cfg.num_items, batch):
      rows = np.arange(lo, min(lo + batch, cfg.num_items))
      yield rows, to_rgb(pixels[rows], size)

  return source_lib.Source(
      name="fashion_mnist", image_size=size, item_category=category,
      num_categories=NUM_CATEGORIES,
      sparse_features=synthetic.SPARSE_FEATURES, vocab_sizes=sim.vocab_sizes,
      num_dense=0, num_behaviors=config.data.num_behaviors,
      item_images=item_images, impressions=sim.chunks,
      vocabularies=sim.vocabularies,
      stats={"num_items": cfg.num_items,
             "num_cold_items": int(sim.is_cold.sum()),
             "num_users": cfg.num_users})
