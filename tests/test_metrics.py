"""csctr.metrics against scikit-learn, ties and degenerate groups included."""

import numpy as np
import pytest
from sklearn import metrics as skm

from csctr import metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = 2000
  labels = rng.integers(0, 2, n)
  # Coarse scores make many ties, across and within classes.
  scores = np.round(rng.random(n) + 0.3 * labels, 1)
  assert len(np.unique(scores)) < 30
  np.testing.assert_allclose(
      metrics.auc(labels, scores), skm.roc_auc_score(labels, scores),
      rtol=0, atol=1e-12)


def test_auc_all_tied_is_half_and_single_class_is_nan():
  labels = np.array([0, 1, 1, 0, 1])
  assert metrics.auc(labels, np.ones(5)) == 0.5
  assert metrics.auc(labels, np.ones(5)) == skm.roc_auc_score(labels, np.ones(5))
  assert np.isnan(metrics.auc(np.ones(4), np.arange(4.0)))
  assert np.isnan(metrics.auc(np.zeros(0), np.zeros(0)))


def test_gauc_is_impression_weighted_user_auc():
  rng = np.random.default_rng(3)
  n = 3000
  users = rng.integers(0, 60, n)
  labels = rng.integers(0, 2, n)
  scores = np.round(rng.random(n) + 0.2 * labels * (users % 3), 2)
  # Users 1000 and 1001: a single label class each; they must be skipped.
  users = np.r_[users, [1000] * 5, [1001] * 3]
  labels = np.r_[labels, [1] * 5, [0] * 3]
  scores = np.r_[scores, rng.random(8)]
  num, den = 0.0, 0.0
  for u in np.unique(users):
    m = users == u
    if len(np.unique(labels[m])) == 2:
      num += m.sum() * skm.roc_auc_score(labels[m], scores[m])
      den += m.sum()
  np.testing.assert_allclose(
      metrics.gauc(labels, scores, users), num / den, rtol=0, atol=1e-12)
  assert np.isnan(metrics.gauc(np.ones(3), np.arange(3.0), np.arange(3)))


def test_logloss_and_compute_metrics_match_sklearn():
  rng = np.random.default_rng(4)
  n = 1000
  logits = rng.normal(size=n) * 3
  logits[:3] = [60.0, -60.0, 0.0]  # saturated probabilities are clipped alike
  labels = (rng.random(n) < 0.3).astype(np.float32)
  labels[:2] = [0, 1]
  probs = 1 / (1 + np.exp(-logits))
  np.testing.assert_allclose(metrics.log_loss(labels, probs),
                             skm.log_loss(labels, probs), rtol=1e-12)
  users = rng.integers(0, 20, n)
  cold = rng.random(n) < 0.25
  out = metrics.compute_metrics(logits, labels, users, cold, bayes_auc=0.8)
  np.testing.assert_allclose(out["auc"], skm.roc_auc_score(labels, probs),
                             atol=1e-12)
  np.testing.assert_allclose(out["logloss"], skm.log_loss(labels, probs),
                             rtol=1e-12)
  np.testing.assert_allclose(
      out["cold_auc"], skm.roc_auc_score(labels[cold], probs[cold]), atol=1e-12)
  np.testing.assert_allclose(out["calibration"], probs.mean() / labels.astype(np.float64).mean(),
                             rtol=1e-12)
  assert out["bayes_auc"] == 0.8 and out["num_impressions"] == n
  assert tuple(out) == metrics.EVAL_FIELDS
  assert "bayes_auc" not in metrics.compute_metrics(logits, labels, users, cold)


def test_collector_drops_padding():
  rng = np.random.default_rng(5)
  coll = metrics.Collector()
  all_logits, all_labels = [], []
  for _ in range(3):
    b = 50
    batch = {
        "weight": (rng.random(b) < 0.8).astype(np.float32),
        "label": rng.integers(0, 2, b).astype(np.float32),
        "user_id": rng.integers(0, 5, b).astype(np.int32),
        "is_cold": rng.random(b) < 0.5,
    }
    logits = rng.normal(size=b).astype(np.float32)
    # Padding rows carry garbage that must not leak into the metrics.
    logits[batch["weight"] == 0] = 100.0
    coll.add(logits, batch)
    keep = batch["weight"] > 0
    all_logits.append(logits[keep])
    all_labels.append(batch["label"][keep])
  out = coll.compute()
  logits, labels = np.concatenate(all_logits), np.concatenate(all_labels)
  assert out["num_impressions"] == len(labels)
  np.testing.assert_allclose(out["auc"], skm.roc_auc_score(labels, logits),
                             atol=1e-12)
  assert "bayes_auc" not in out
