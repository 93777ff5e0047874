"""Tests for the synthetic benchmark (csctr.data.synthetic): determinism, truth."""

import numpy as np
import pytest
import sklearn.metrics

from configs import default
from csctr.data import pipeline
from csctr.data import synthetic
import testutil


def tiny_config(data_dir="", seed=0, num_behaviors=3):
  config = default.get_config()
  config.data_dir = str(data_dir)
  config.data.image_size = 16
  config.data.group_size = 5
  config.data.num_behaviors = num_behaviors
  s = config.synthetic
  s.num_impressions, s.num_items, s.num_users = 2000, 120, 40
  s.chunk_size, s.seed = 300, seed  # several chunks per split
  return config


def _all(source, split):
  chunks = list(source.impressions(split))
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}, chunks


def _images(source):
  return np.concatenate([im for _, im in source.item_images()])


def test_same_seed_same_data_different_seed_different():
  a, b = synthetic.make_source(tiny_config()), synthetic.make_source(tiny_config())
  c = synthetic.make_source(tiny_config(seed=1))
  for split in ("train", "test"):
    (xa, _), (xb, _), (xc, _) = _all(a, split), _all(b, split), _all(c, split)
    for key in xa:
      np.testing.assert_array_equal(xa[key], xb[key], err_msg=key)
    assert not np.array_equal(xa["item"], xc["item"])
  np.testing.assert_array_equal(_images(a), _images(b))
  assert not np.array_equal(_images(a), _images(c))
  np.testing.assert_array_equal(a.item_category, b.item_category)


def test_stream_is_chunked_in_time_order():
  config = tiny_config()
  source = synthetic.make_source(config)
  train, train_chunks = _all(source, "train")
  test, _ = _all(source, "test")
  assert max(len(c["item"]) for c in train_chunks) <= config.synthetic.chunk_size
  assert len(train_chunks) > 1
  ids = np.concatenate([train["impression_id"], test["impression_id"]])
  np.testing.assert_array_equal(ids, np.arange(2000))
  assert len(test["item"]) == 400  # test_fraction 0.2: the last 20% in time
  assert set(np.unique(train["label"])) <= {0.0, 1.0}
  # Labels are draws from the true CTR.
  assert abs(train["label"].mean() - train["true_ctr"].mean()) < 0.03


def test_cold_items_absent_from_train_flagged_and_oov():
  source = synthetic.make_source(tiny_config())
  train, _ = _all(source, "train")
  test, _ = _all(source, "test")
  assert not train["is_cold"].any()
  never_in_train = ~np.isin(test["item"], train["item"])
  np.testing.assert_array_equal(test["is_cold"], never_in_train)
  assert 0 < test["is_cold"].sum() < len(test["item"])
  item_col = source.sparse_features.index("item_id")
  assert (test["sparse"][test["is_cold"], item_col] == 0).all()
  assert (test["sparse"][~test["is_cold"], item_col] > 0).all()
  assert (train["sparse"][:, item_col] > 0).all()
  assert train["sparse"][:, item_col].max() < source.vocab_sizes[item_col]


def test_min_count_sends_rare_train_items_to_the_oov_row(tmp_path):
  testutil.check_min_count_and_hashing(synthetic.make_source,
                                       tiny_config(tmp_path))


def test_bayes_auc_is_auc_of_true_ctr_on_test(tmp_path):
  config = tiny_config(tmp_path)
  info = pipeline.load_info(pipeline.prepare_dataset(config))
  test, _ = _all(synthetic.make_source(config), "test")
  want = sklearn.metrics.roc_auc_score(test["label"], test["true_ctr"])
  assert info.bayes_auc == pytest.approx(want, abs=1e-12)
  cold = test["is_cold"]
  assert info.extras["bayes_auc_cold"] == pytest.approx(
      sklearn.metrics.roc_auc_score(test["label"][cold], test["true_ctr"][cold]))
  assert 0.6 < info.bayes_auc < 0.95


def test_behavior_lists_are_last_clicks_before_each_impression():
  source = synthetic.make_source(tiny_config(num_behaviors=3))
  train, _ = _all(source, "train")
  test, _ = _all(source, "test")
  x = {k: np.concatenate([train[k], test[k]]) for k in ("user_id", "item",
                                                         "label", "behavior")}
  history = {}
  for i in range(len(x["item"])):  # brute force, across chunks and splits
    past = history.setdefault(int(x["user_id"][i]), [])
    want = ([-1] * 3 + past)[-3:]
    np.testing.assert_array_equal(x["behavior"][i], want, err_msg=str(i))
    if x["label"][i]:
      past.append(int(x["item"][i]))
  assert (x["behavior"] >= 0).any()


def test_images_carry_the_category_specific_cue():
  items, img = synthetic.sample_items(600, 9, 0.2, seed=0)
  size = 32
  pixels = synthetic.render(img, np.arange(600), size,
                            np.random.default_rng(0)).astype(np.float32)
  p, m = size // 4, 1
  for cat, cue in synthetic.category_cues(9).items():
    sel = items.category == cat
    if cue["kind"] == "colour":  # mean of the cue channel at the centre
      feature = pixels[sel, 13:19, 13:19, cue["channel"]].mean((1, 2))
    else:  # stripe contrast of the cue corner
      q = cue["corner"]
      y0, x0 = (m if q < 2 else size - m - p), (m if q % 2 == 0 else size - m - p)
      feature = pixels[sel, y0:y0 + p, x0:x0 + p, 0].std((1, 2))
    r = np.corrcoef(feature, items.visual_score[sel])[0, 1]
    assert r * cue["sign"] > 0.95, (cat, cue, r)
  # The same cue means different things: categories 1 and 7 read red with
  # opposite signs.
  cues = synthetic.category_cues(9)
  assert cues[1]["channel"] == cues[7]["channel"] and cues[1]["sign"] == -cues[7]["sign"]
