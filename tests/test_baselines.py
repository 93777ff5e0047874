"""Baselines against a direct computation from the prepared impressions."""

import collections

import numpy as np
import pytest

from configs import tiny
from csctr.data import pipeline
from csctr.training import baselines


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  config = tiny.get_config()
  config.data_dir = str(tmp_path_factory.mktemp("data"))
  config.data.validation_fraction = 0.2
  return pipeline.prepare_dataset(config)


def _pairwise_auc(labels, scores):
  """AUC by counting every (positive, negative) pair: ties count 1/2."""
  pos, neg = scores[labels == 1], scores[labels == 0]
  diff = pos[:, None] - neg[None, :]
  return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _direct(train, test, prior, col):
  """The three counting baselines with Python dicts, impression by impression."""
  ctr = float(np.mean(train["label"]))
  item, user, user_cat = (collections.defaultdict(lambda: [0.0, 0.0])
                          for _ in range(3))
  for row, y in zip(train["sparse"], train["label"]):
    u, i, c = row[col["user_id"]], row[col["item_id"]], row[col["category_id"]]
    for table, key in ((item, i), (user, u), (user_cat, (u, c))):
      table[key][0] += y
      table[key][1] += 1
  out = collections.defaultdict(list)
  for row in test["sparse"]:
    u, i, c = row[col["user_id"]], row[col["item_id"]], row[col["category_id"]]
    clicks, imps = item.get(i, [0.0, 0.0])
    out["popularity"].append(imps)
    out["item_ctr"].append((clicks + prior * ctr) / (imps + prior))
    uc, ui = user.get(u, [0.0, 0.0])
    user_ctr = (uc + prior * ctr) / (ui + prior)
    clicks, imps = user_cat.get((u, c), [0.0, 0.0])
    out["user_category"].append((clicks + prior * user_ctr) / (imps + prior))
  return {k: np.array(v) for k, v in out.items()}


@pytest.mark.parametrize("split", ["validation", "test"])
def test_counting_baselines_match_a_direct_computation(prepared, split):
  info = pipeline.load_info(prepared)
  train = baselines.read_split(prepared, "train")
  data = baselines.read_split(prepared, split)
  col = {n: i for i, n in enumerate(info.sparse_features)}
  expected = _direct(train, data, 20.0, col)
  result = baselines.evaluate(prepared, (split,))[split]
  for name, scores in expected.items():
    assert result[name]["auc"] == pytest.approx(
        _pairwise_auc(data["label"], scores), abs=1e-9), name
    assert result[name]["num_impressions"] == len(data["label"])
  # Probabilities, not just ranks: item_ctr's logloss from the direct CTRs.
  p = expected["item_ctr"]
  y = data["label"]
  logloss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
  assert result["item_ctr"]["logloss"] == pytest.approx(logloss, rel=1e-6)
  assert result["popularity"]["logloss"] is None  # ranks only


def test_id_lr_reaches_the_optimum_of_its_objective(prepared):
  info = pipeline.load_info(prepared)
  train = baselines.read_split(prepared, "train")
  l2 = 1e-4
  w, b, offsets = baselines.fit_lr(train["sparse"], train["label"],
                                   info.vocab_sizes, steps=baselines.LR_STEPS, l2=l2)
  # Gradient of mean logloss + l2/2 |w|^2, computed row by row.
  grad_w, grad_b = np.zeros_like(w), 0.0
  n = len(train["label"])
  for row, y in zip(train["sparse"], train["label"]):
    idx = row.astype(np.int64) + offsets
    g = 1 / (1 + np.exp(-(b + w[idx].sum()))) - y
    grad_w[idx] += g / n
    grad_b += g / n
  grad_w += l2 * w
  assert abs(grad_b) < 1e-4
  assert np.abs(grad_w).max() < 1e-3, np.abs(grad_w).max()
