"""Non-visual baselines, scored by the trainer's evaluator on the same splits.

A visual CTR model is only worth its CNN if it beats what the click log
alone predicts. Every run therefore writes WORKDIR/baselines.json: four
baselines fitted on the train split of the prepared dataset and scored with
`metrics.compute_metrics` on the validation (when present) and test splits,
the same function and the same impressions as the model's evals:

  popularity     number of train impressions of the item (item_id row;
                 cold items share the OOV row's count). Ranks only: its
                 logloss and calibration are reported as None.
  item_ctr       the item's train CTR, smoothed towards the global CTR with
                 `prior` pseudo-impressions.
  user_category  the user's CTR on the item's category, smoothed towards the
                 user's own smoothed CTR ("the user clicked this product type
                 before": the heuristic a real log is often best at).
  id_lr          logistic regression on one-hot ID features (every sparse
                 column), full-batch Adam with L2: the no-image model without
                 crosses or an MLP.

Everything is numpy on the host and deterministic (no random init).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from csctr import metrics as metrics_lib
from csctr import storage
from csctr.data import pipeline

BASELINES_FILE = "baselines.json"
RANK_ONLY = ("popularity",)
# Full-batch Adam steps of id_lr: its gradient is < 1e-3 by then on the
# test datasets (tests/test_baselines.py checks the optimum).
LR_STEPS = 1500


def read_split(path: str, split: str) -> dict[str, np.ndarray]:
  """Every impression of a prepared split: label, user_id, is_cold, sparse."""
  source = pipeline.groups_source(path, split)
  parts: dict[str, list[np.ndarray]] = {
      k: [] for k in ("label", "user_id", "is_cold", "sparse")}
  for i in range(len(source)):
    group = source[i]
    for key in parts:
      parts[key].append(group[key])
  num_sparse = len(pipeline.load_info(path).sparse_features)
  return {k: (np.concatenate(v) if v else
              np.zeros((0, num_sparse) if k == "sparse" else (0,)))
          for k, v in parts.items()}


def _logit(p: np.ndarray) -> np.ndarray:
  p = np.clip(p, 1e-7, 1 - 1e-7)
  return np.log(p) - np.log1p(-p)


def _smoothed(clicks: np.ndarray, imps: np.ndarray, prior_ctr: np.ndarray,
              prior: float) -> np.ndarray:
  return (clicks + prior * prior_ctr) / (imps + prior)


class _Counts:
  """Train clicks and impressions per key (dense integer keys)."""

  def __init__(self, keys: np.ndarray, labels: np.ndarray, size: int):
    self.imps = np.bincount(keys, minlength=size).astype(np.float64)
    self.clicks = np.bincount(keys, weights=labels, minlength=size)


def _pair_keys(a: np.ndarray, b: np.ndarray, b_size: int) -> np.ndarray:
  return a.astype(np.int64) * b_size + b.astype(np.int64)


def fit_lr(sparse: np.ndarray, labels: np.ndarray, vocab_sizes: tuple[int, ...],
           steps: int = LR_STEPS, lr: float = 0.05, l2: float = 1e-4
           ) -> tuple[np.ndarray, float, np.ndarray]:
  """Logistic regression on one-hot ID features; (weights, bias, offsets).

  Full-batch Adam from zeros: deterministic, and LR_STEPS steps reach the
  optimum of this convex objective (tests check its gradient there).
  """
  offsets = np.concatenate([[0], np.cumsum(vocab_sizes)[:-1]]).astype(np.int64)
  idx = (sparse.astype(np.int64) + offsets).reshape(-1)
  n, f = sparse.shape
  w, b = np.zeros(int(np.sum(vocab_sizes))), float(_logit(np.mean(labels)))
  m = np.zeros_like(w)
  v = np.zeros_like(w)
  mb = vb = 0.0
  for t in range(1, steps + 1):
    z = b + w[idx].reshape(n, f).sum(1)
    g = metrics_lib.sigmoid(z) - labels
    gw = np.bincount(idx, weights=np.repeat(g, f), minlength=w.size) / n
    gw += l2 * w
    gb = float(g.mean())
    m = 0.9 * m + 0.1 * gw
    v = 0.999 * v + 0.001 * gw**2
    mb, vb = 0.9 * mb + 0.1 * gb, 0.999 * vb + 0.001 * gb**2
    c1, c2 = 1 - 0.9**t, 1 - 0.999**t
    w -= lr * (m / c1) / (np.sqrt(v / c2) + 1e-8)
    b -= lr * (mb / c1) / (np.sqrt(vb / c2) + 1e-8)
  return w, b, offsets


def fit(train: dict[str, np.ndarray], sparse_features: tuple[str, ...],
        vocab_sizes: tuple[int, ...], prior: float = 20.0,
        lr_steps: int = LR_STEPS) -> dict[str, Any]:
  """The baselines' parameters, from the train split's impressions."""
  labels, sparse = train["label"].astype(np.float64), train["sparse"]
  col = {name: i for i, name in enumerate(sparse_features)}
  model: dict[str, Any] = {"ctr": float(labels.mean()) if labels.size else 0.0,
                           "prior": prior, "col": col,
                           "vocab": dict(zip(sparse_features, vocab_sizes))}
  if "item_id" in col:
    item = sparse[:, col["item_id"]]
    model["item"] = _Counts(item, labels, vocab_sizes[col["item_id"]])
  if "user_id" in col and "category_id" in col:
    users, cats = sparse[:, col["user_id"]], sparse[:, col["category_id"]]
    n_users, n_cats = vocab_sizes[col["user_id"]], vocab_sizes[col["category_id"]]
    model["user"] = _Counts(users, labels, n_users)
    model["user_cat"] = _Counts(_pair_keys(users, cats, n_cats), labels,
                                n_users * n_cats)
  model["lr"] = fit_lr(sparse, labels, vocab_sizes, steps=lr_steps)
  return model


def scores(model: dict[str, Any], split: dict[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
  """Logits of every baseline for a split's impressions."""
  sparse, col, ctr, prior = (split["sparse"], model["col"], model["ctr"],
                             model["prior"])
  out = {}
  if "item" in model:
    counts, item = model["item"], sparse[:, col["item_id"]]
    out["popularity"] = np.log1p(counts.imps[item])
    out["item_ctr"] = _logit(_smoothed(counts.clicks[item], counts.imps[item],
                                       ctr, prior))
  if "user_cat" in model:
    users, cats = sparse[:, col["user_id"]], sparse[:, col["category_id"]]
    u = model["user"]
    user_ctr = _smoothed(u.clicks[users], u.imps[users], ctr, prior)
    uc = model["user_cat"]
    key = _pair_keys(users, cats, model["vocab"]["category_id"])
    out["user_category"] = _logit(_smoothed(uc.clicks[key], uc.imps[key],
                                            user_ctr, prior))
  w, b, offsets = model["lr"]
  out["id_lr"] = b + w[sparse.astype(np.int64) + offsets].sum(1)
  return out


def evaluate(path: str, splits: tuple[str, ...],
             bayes: dict[str, float | None] | None = None) -> dict[str, Any]:
  """{split: {baseline: metrics}} for a prepared dataset."""
  info = pipeline.load_info(path)
  model = fit(read_split(path, "train"), info.sparse_features, info.vocab_sizes)
  result = {}
  for split in splits:
    data = read_split(path, split)
    result[split] = {}
    for name, logits in scores(model, data).items():
      values = metrics_lib.compute_metrics(
          logits, data["label"], data["user_id"], data["is_cold"].astype(bool),
          (bayes or {}).get(split))
      if name in RANK_ONLY:
        values["logloss"] = values["calibration"] = None
      result[split][name] = metrics_lib.json_safe(values)
  return result


def write(workdir: str, path: str, splits: tuple[str, ...],
          bayes: dict[str, float | None] | None = None) -> dict[str, Any]:
  """Computes WORKDIR/baselines.json once (a resumed run reuses it)."""
  out = storage.join(workdir, BASELINES_FILE)  # a local path or a URL
  if storage.exists(out):
    return storage.read_json(out)
  result = evaluate(path, splits, bayes)
  storage.write_json(out, result)  # whole or not at all
  return result
