"""The sparse long-tail benchmark (csctr/data/sparse_log.py)."""

import numpy as np
import pytest
from sklearn import metrics as skmetrics

from configs import sparse as sparse_config
from configs import tiny
from csctr.data import pipeline
from csctr.data import registry
from csctr.data import sparse_log
from csctr.data import synthetic


def _config(tmp_path=None, **sparse):
  """The tiny model on a small sparse log (1 500 items, 40 categories)."""
  config = tiny.get_config()
  config.dataset = "sparse"
  config.sparse.num_items = 1_500
  config.sparse.num_users = 200
  config.sparse.num_categories = 40
  config.sparse.chunk_size = 1_000  # several chunks: the schedule spans them
  config.data.validation_fraction = 0.2
  config.data.batching = "auto"
  for key, value in sparse.items():
    config.sparse[key] = value
  if tmp_path is not None:
    config.data_dir = str(tmp_path)
  return config


def _log(source, split):
  chunks = list(source.impressions(split))
  return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def test_long_tail_of_one_to_five_impressions():
  config = _config(num_items=6_000)
  source = registry.make_source(config)
  items = np.concatenate([_log(source, s)["item"] for s in ("train", "test")])
  per_item = np.bincount(items, minlength=source.num_items)
  assert per_item.min() == 1 and per_item.max() == 5
  hist = np.bincount(per_item, minlength=6)[1:]
  # P(n) ~ 1/n: 0.438, 0.219, 0.146, 0.109, 0.088 of 6 000 items.
  expected = (1.0 / np.arange(1, 6)) / np.sum(1.0 / np.arange(1, 6))
  assert np.all(np.diff(hist) < 0)  # the long tail: fewer items per count
  np.testing.assert_allclose(hist / len(per_item), expected, atol=0.02)
  assert source.stats["num_impressions"] == len(items)


def test_about_a_hundred_categories_each_with_its_cue():
  config = sparse_config.get_config()
  config.sparse.num_items = 3_000
  source = registry.make_source(config)
  assert source.num_categories == 101  # row 0 = OOV
  assert set(np.unique(source.item_category)) == set(range(1, 101))
  cues = synthetic.category_cues(source.num_categories)
  kinds = {(c["kind"], c.get("channel", c.get("corner")), c["sign"])
           for c in cues.values()}
  assert len(kinds) >= 10  # colour channel x sign, texture orientation x sign


def _texture_energy(images, masks, orientation):
  """Mean |response| of a grating filter at `orientation` on the product."""
  grey = images.astype(np.float64).mean(-1)
  s = grey.shape[1]
  yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s
  t = np.deg2rad(orientation)
  phase = 2 * np.pi * 6.0 * (np.cos(t) * xx + np.sin(t) * yy)
  out = []
  for g, m in zip(grey, masks):
    g = np.where(m, g - g[m].mean(), 0.0)
    out.append(np.hypot((g * np.cos(phase)).sum(), (g * np.sin(phase)).sum())
               / max(m.sum(), 1))
  return np.array(out)


def test_images_carry_both_cues():
  """The product's colour and its texture strengths are visible in pixels."""
  items, img = synthetic.sample_items(400, 11, 0.0, seed=3)
  photo = sparse_log.photo_latents(400, seed=3)
  rows = np.arange(400)
  images = sparse_log.render_photos(img, photo, rows, 48,
                                    np.random.default_rng(0))
  masks = synthetic.shape_masks(img, rows, 48)
  mean_colour = np.stack([images[i][masks[i]].mean(0) for i in rows])
  for ch in range(3):
    assert np.corrcoef(mean_colour[:, ch], img.colour[:, ch])[0, 1] > 0.6
  for q, angle in enumerate((0, 45, 90, 135)):
    energy = _texture_energy(images, masks, angle)
    assert np.corrcoef(energy, img.contrast[:, q])[0, 1] > 0.5


def test_cold_by_design_items_only_in_test():
  config = _config()
  source = registry.make_source(config)
  items, _ = synthetic.sample_items(
      config.sparse.num_items, config.sparse.num_categories + 1,
      config.sparse.cold_item_fraction, config.sparse.seed)
  train, test = _log(source, "train"), _log(source, "test")
  assert not items.is_cold[train["item"]].any()
  assert items.is_cold[test["item"]].any()
  assert test["is_cold"][items.is_cold[test["item"]]].all()
  # Warm items never shown in train are cold too; warm ones shown are not.
  seen = np.isin(test["item"], train["item"])
  np.testing.assert_array_equal(test["is_cold"], ~seen)


def test_prepared_bayes_auc_is_the_auc_of_the_true_ctr(tmp_path):
  config = _config(tmp_path)
  info = pipeline.load_info(pipeline.prepare_dataset(config))
  source = registry.make_source(config)
  train, test = _log(source, "train"), _log(source, "test")
  n_val = int(round(len(train["label"]) * config.data.validation_fraction))
  val = {k: v[-n_val:] for k, v in train.items()}
  # Validation cold = its item absent from the rest of train.
  val["is_cold"] = ~np.isin(val["item"], train["item"][:-n_val])
  for name, split in (("test", test), ("validation", val)):
    stats = info.splits[name]
    assert stats.impressions == len(split["label"])
    assert stats.bayes_auc == pytest.approx(skmetrics.roc_auc_score(
        split["label"], split["true_ctr"]), abs=1e-6)
    cold = split["is_cold"]
    assert stats.bayes_auc_cold == pytest.approx(skmetrics.roc_auc_score(
        split["label"][cold], split["true_ctr"][cold]), abs=1e-6)
  assert info.bayes_auc == pytest.approx(info.splits["test"].bayes_auc)
  # A sparse log: auto batching picks small groups.
  assert info.extras["group_size"] <= 2


def test_negative_sampling_shifts_the_logit_by_log_keep_rate():
  full = registry.make_source(_config(negative_keep_rate=1.0))
  kept = registry.make_source(_config(negative_keep_rate=0.25))
  a, b = _log(full, "train"), _log(kept, "train")
  odds = lambda p: p / (1 - p)
  np.testing.assert_allclose(odds(b["true_ctr"]), odds(a["true_ctr"]) / 0.25,
                             rtol=1e-4)
  assert b["label"].mean() > a["label"].mean()


def test_deterministic_per_seed():
  config = _config()
  a, b = registry.make_source(config), registry.make_source(config)
  for split in ("train", "test"):
    x, y = _log(a, split), _log(b, split)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  ia, ib = next(a.item_images()), next(b.item_images())
  np.testing.assert_array_equal(ia[1], ib[1])
  other = registry.make_source(_config(seed=1))
  assert not np.array_equal(_log(other, "train")["item"],
                            _log(a, "train")["item"])
