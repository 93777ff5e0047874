"""The dataset registry: the one place that maps config.dataset to code."""

import pytest

from configs import default
from csctr.data import registry
from csctr.data import synthetic


def test_every_config_dataset_is_registered():
  assert set(registry.names()) == {"synthetic", "sparse", "fashion_mnist",
                                   "byod", "amazon"}
  with pytest.raises(ValueError, match="unknown dataset 'mnist': synthetic"):
    registry.get("mnist")


def test_key_holds_the_dataset_section_and_not_batching():
  config = default.get_config()
  key = registry.dataset_key(config)
  assert key["synthetic"] == config.synthetic.to_dict()
  assert "fashion_mnist" not in key and "byod" not in key
  config.data.groups_per_batch *= 2
  assert registry.dataset_key(config) == key
  config.synthetic.seed += 1
  assert registry.dataset_key(config) != key


def test_byod_key_follows_the_csv_files(tmp_path):
  config = default.get_config("dataset=amazon")
  with pytest.raises(ValueError, match="needs config.byod_path"):
    registry.dataset_key(config)
  config.byod_path = str(tmp_path)
  (tmp_path / "items.csv").write_text("item_id,category_id,image\na,c,a.png\n")
  (tmp_path / "impressions.csv").write_text("user_id,item_id,label\n")
  key = registry.dataset_key(config)
  assert key["dataset"] == "amazon" and key["byod_path"] == str(tmp_path)
  assert key["byod"] == config.byod.to_dict()
  assert key["files"]["items.csv"][0] == 36  # size in bytes
  (tmp_path / "impressions.csv").write_text("user_id,item_id,label\nu,a,1\n")
  assert registry.dataset_key(config) != key


def test_make_source_dispatches_by_name():
  config = default.get_config()
  config.synthetic.num_impressions, config.synthetic.num_items = 100, 20
  source = registry.make_source(config)
  assert source.name == "synthetic" and source.num_items == 20
  assert registry.get("synthetic").cheap_source
  assert registry.get("amazon").module == registry.get("byod").module
  assert synthetic.make_source(config).vocab_sizes == source.vocab_sizes
