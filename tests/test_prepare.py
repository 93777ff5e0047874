"""Tests for packing, writing and caching prepared datasets (csctr.data.prepare)."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from csctr.data import batch as batch_lib
from csctr.data import packing
from csctr.data import pipeline
from csctr.data import prepared
from csctr.data import prepare
from csctr.data import registry
from csctr.data import synthetic
from tests.test_synthetic import tiny_config


def test_pack_chunk_loses_and_duplicates_nothing():
  rng = np.random.default_rng(0)
  n, k = 500, 4
  chunk = {"item": rng.integers(0, 30, n).astype(np.int32),
           "label": rng.integers(0, 2, n).astype(np.float32),
           "user_id": rng.integers(0, 9, n).astype(np.int32),
           "impression_id": np.arange(n, dtype=np.int32),
           "is_cold": np.zeros(n, bool),
           "sparse": rng.integers(0, 5, (n, 3)).astype(np.int32)}
  groups = list(packing.pack_chunk(chunk, k))
  ids = np.concatenate([g["impression_id"] for g in groups])
  np.testing.assert_array_equal(np.sort(ids), np.arange(n))
  _, counts = np.unique(chunk["item"], return_counts=True)
  assert len(groups) == (-(-counts // k)).sum()  # ceil(n_item / K) each
  for g in groups:
    i = g["impression_id"]
    assert 1 <= len(i) <= k
    assert (chunk["item"][i] == g["item"]).all()  # one ad image per group
    assert (np.diff(i) > 0).all()  # time order kept inside the group
    np.testing.assert_array_equal(g["sparse"], chunk["sparse"][i])
    np.testing.assert_array_equal(g["label"], chunk["label"][i])


@pytest.mark.parametrize("max_pending", [0, 40, 10**6])
def test_packer_carries_partial_groups_across_chunks(max_pending):
  rng = np.random.default_rng(1)
  packer, groups, k, n = packing.Packer(4, max_pending), [], 4, 0
  per_chunk_groups = 0
  for _ in range(8):  # ~1.5 impressions per item per chunk
    chunk = {"item": rng.integers(0, 200, 300).astype(np.int32),
             "impression_id": np.arange(n, n + 300, dtype=np.int32)}
    n += 300
    per_chunk_groups += len(list(packing.pack_chunk(chunk, k)))
    groups += list(packer.add(chunk))
    pending = packer._pending  # pylint: disable=protected-access
    assert len(pending["item"]) <= max_pending  # memory stays bounded
  groups += list(packer.finish())
  ids = np.concatenate([g["impression_id"] for g in groups])
  np.testing.assert_array_equal(np.sort(ids), np.arange(n))
  assert all(1 <= len(g["impression_id"]) <= k for g in groups)
  assert all((np.diff(g["impression_id"]) > 0).all() for g in groups)
  if max_pending == 0:
    assert len(groups) == per_chunk_groups
  else:  # carrying partial groups over fills more slots
    assert len(groups) < per_chunk_groups
  if max_pending == 10**6:
    _, counts = np.unique(np.concatenate(
        [[g["item"]] * len(g["impression_id"]) for g in groups]),
                          return_counts=True)
    assert len(groups) == (-(-counts // k)).sum()  # as if packed at once


@pytest.fixture(scope="module")
def prepared_path(tmp_path_factory):
  config = tiny_config(tmp_path_factory.mktemp("data"))
  return config, pipeline.prepare_dataset(config)


def test_info_json_records_counts_and_packing(prepared_path):
  config, path = prepared_path
  info = pipeline.load_info(path)
  assert info.sparse_features == synthetic.SPARSE_FEATURES
  assert info.num_categories == config.synthetic.num_categories + 1
  assert (info.image_size, info.num_behaviors) == (16, 3)
  splits = info.splits
  assert splits["train"].impressions + splits["test"].impressions == (
      config.synthetic.num_impressions)
  for s in splits.values():
    assert s.packing_efficiency == pytest.approx(
        s.impressions / (s.groups * config.data.group_size))
  assert splits["test"].cold_impressions > 0
  table = np.load(os.path.join(path, prepared.IMAGES_FILE), mmap_mode="r")
  assert table.shape == (config.synthetic.num_items, 16, 16, 3)
  source = synthetic.make_source(config)
  np.testing.assert_array_equal(
      table, np.concatenate([im for _, im in source.item_images()]))
  assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")]


def test_records_are_a_tfds_dataset(prepared_path):
  _, path = prepared_path
  ours = pipeline.groups_source(path, "train")
  theirs = tfds.builder_from_directory(
      os.path.join(path, prepared.GROUPS_DIR)).as_data_source("train")
  assert len(ours) == len(theirs) > 0
  for i in (0, len(ours) // 2, len(ours) - 1):
    a, b = ours[i], theirs[i]
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
      if key != "item":  # TFDS decodes scalars as Python ints
        assert a[key].dtype == b[key].dtype, key


def test_cache_is_keyed_by_dataset_config_only(prepared_path, monkeypatch):
  config, path = prepared_path
  def boom(_):
    raise AssertionError("prepared twice")
  monkeypatch.setattr(synthetic, "make_source", boom)
  config.data.groups_per_batch = 2  # batching is not part of the key
  assert pipeline.prepare_dataset(config) == path
  other = tiny_config(config.data_dir, seed=1)
  assert (prepared.cache_path(config.data_dir, registry.dataset_key(other))
          != path)
  monkeypatch.delenv("CSCTR_DATA_DIR", raising=False)
  config.data_dir = ""
  assert pipeline.data_root(config).endswith(os.path.join(".cache", "csctr"))
  monkeypatch.setenv("CSCTR_DATA_DIR", "/x/y")
  assert pipeline.data_root(config) == "/x/y"


def test_crash_mid_prepare_leaves_nothing_that_looks_complete(tmp_path):
  source = synthetic.make_source(tiny_config())
  good = source.impressions

  def crashing(split):
    if split == "test":
      raise RuntimeError("disk on fire")
    yield from good(split)

  source.impressions = crashing
  path = str(tmp_path / "ds")
  with pytest.raises(RuntimeError, match="disk on fire"):
    prepare.prepare(source, path, group_size=5)
  assert not prepared.is_prepared(path)
  assert os.listdir(tmp_path) == []  # no final directory, no tmp debris


@pytest.mark.parametrize("corrupt, message", [
    (lambda c: c.update(sparse=c["sparse"][:, :2]), "sparse"),
    (lambda c: c["sparse"].__setitem__((0, 3), 99), "position"),  # >= vocab
    (lambda c: c["label"].__setitem__(0, 0.5), "labels"),
    (lambda c: c.pop("is_cold"), "is_cold"),
])
def test_bad_chunks_are_rejected_with_the_field_named(tmp_path, corrupt,
                                                      message):
  source = synthetic.make_source(tiny_config())
  good = source.impressions

  def bad(split):
    for chunk in good(split):
      corrupt(chunk)
      yield chunk

  source.impressions = bad
  with pytest.raises(ValueError, match=message):
    prepare.prepare(source, str(tmp_path / "ds"), group_size=5)
  assert os.listdir(tmp_path) == []


def test_info_json_is_plain_json(prepared_path):
  config, path = prepared_path
  with open(os.path.join(path, prepared.INFO_FILE)) as f:
    d = json.load(f)
  assert {"sparse_features", "vocab_sizes", "num_dense", "num_categories",
          "image_size", "num_behaviors", "bayes_auc", "extras",
          "splits"} <= set(d)
  assert d["extras"]["config"]["synthetic"] == config.synthetic.to_dict()
  info = batch_lib.DataInfo.from_json(d)
  assert info == pipeline.load_info(path)
  assert json.loads(json.dumps(info.to_json())) == d  # a lossless round trip
  # info.json of FORMAT_VERSION 2 kept the split counts in extras.
  legacy = dict(d, extras={**d["extras"], "splits": d["splits"]})
  del legacy["splits"]
  assert batch_lib.DataInfo.from_json(legacy) == info
