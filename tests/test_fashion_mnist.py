"""Tests for the Fashion-MNIST benchmark on tiny idx files written here."""

import gzip
import os
import struct

import numpy as np
import pytest

from configs import default
from csctr.data import fashion_mnist
from csctr.data import pipeline
from csctr.data import prepared
import testutil


def _write_idx(path, array):
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _fake_files(root, n_train=60, n_test=20, gz=True):
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
    labels = np.arange(n) % 10
    arrays[split] = (images, labels)
    ext = ".gz" if gz else ""
    _write_idx(os.path.join(root, f"{split}-images-idx3-ubyte{ext}"), images)
    _write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte"), labels)  # raw
  return arrays


def _config(tmp_path, root):
  config = default.get_config()
  config.dataset = "fashion_mnist"
  config.data_dir = str(tmp_path / "cache")
  config.data.image_size, config.data.group_size = 16, 5
  f = config.fashion_mnist
  f.path, f.num_items, f.num_users, f.num_impressions = str(root), 40, 20, 1500
  f.chunk_size = 500
  return config


def test_reads_idx_files_gz_and_raw(tmp_path):
  arrays = _fake_files(tmp_path)
  train_x, train_y, test_x, test_y = fashion_mnist.load(str(tmp_path))
  np.testing.assert_array_equal(train_x, arrays["train"][0])
  np.testing.assert_array_equal(train_y, arrays["train"][1])
  np.testing.assert_array_equal(test_x, arrays["t10k"][0])
  assert train_x.shape == (60, 28, 28) and test_y.shape == (20,)


def test_missing_files_error_names_them_and_the_fix(tmp_path):
  _fake_files(tmp_path)
  os.remove(tmp_path / "t10k-images-idx3-ubyte.gz")
  with pytest.raises(FileNotFoundError) as e:
    fashion_mnist.load(str(tmp_path))
  msg = str(e.value)
  assert "t10k-images-idx3-ubyte" in msg and "train-images" not in msg
  assert "apt-get install dataset-fashion-mnist" in msg
  assert fashion_mnist.DOWNLOAD_URL in msg
  with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
    fashion_mnist.load(str(tmp_path / "nowhere"))


def test_truncated_file_is_reported(tmp_path):
  _fake_files(tmp_path)
  path = tmp_path / "train-labels-idx1-ubyte"
  path.write_bytes(path.read_bytes()[:-3])
  with pytest.raises(ValueError, match="truncated"):
    fashion_mnist.load(str(tmp_path))


def test_images_are_padded_to_size_in_three_channels():
  pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
  out = fashion_mnist.to_rgb(pixels, 32)
  assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[:, 2:30, 2:30, 1], pixels)  # no resize
  assert not out[:, :2].any() and not out[:, :, 30:].any()
  assert fashion_mnist.to_rgb(pixels, 16).shape == (3, 16, 16, 3)


def test_prepared_dataset_uses_real_pixels_and_cold_t10k_items(tmp_path):
  arrays = _fake_files(tmp_path, gz=False)
  config = _config(tmp_path, tmp_path)
  path = pipeline.prepare_dataset(config)
  info = pipeline.load_info(path)
  assert info.num_categories == 11 and info.image_size == 16
  assert info.bayes_auc is not None and 0.5 < info.bayes_auc < 1.0
  table = np.load(os.path.join(path, prepared.IMAGES_FILE))
  category = np.load(os.path.join(path, prepared.CATEGORY_FILE))
  source = fashion_mnist.make_source(config)
  cold_rows = np.arange(40)[32:]  # 20% cold items follow the warm ones
  # Cold items are t10k images, with their class as category.
  t10k = fashion_mnist.to_rgb(arrays["t10k"][0], 16)
  for row in cold_rows:
    match = np.flatnonzero((t10k == table[row]).all(axis=(1, 2, 3)))
    assert match.size and (arrays["t10k"][1][match] + 1 == category[row]).any()
  test = list(source.impressions("test"))
  cold = np.concatenate([c["is_cold"] for c in test])
  items = np.concatenate([c["item"] for c in test])
  train_items = np.concatenate([c["item"] for c in source.impressions("train")])
  assert (train_items < 32).all()  # t10k items never appear in training
  np.testing.assert_array_equal(cold, ~np.isin(items, train_items))
  assert cold[items >= 32].all() and (items >= 32).any()
  batch = next(pipeline.train_iterator(config, path))
  size = config.data.image_size
  assert batch["images"].shape == (config.data.unique_images, size, size, 3)
  assert not batch["is_cold"].any()
  # Within a category the visual score depends on the pixels: not constant.
  score, style = fashion_mnist.visual_latents(
      arrays["train"][0], arrays["train"][1] + 1, seed=0,
      num_components=default.get_config().fashion_mnist.visual_components)
  for c in range(1, 11):
    assert np.ptp(score[arrays["train"][1] + 1 == c]) > 0.1
  assert set(np.unique(style)) <= set(range(4))


def test_min_count_sends_rare_train_items_to_the_oov_row(tmp_path):
  root = tmp_path / "files"
  root.mkdir()
  _fake_files(str(root))
  testutil.check_min_count_and_hashing(fashion_mnist.make_source,
                                       _config(tmp_path, root), min_count=30)
