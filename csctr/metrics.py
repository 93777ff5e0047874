"""Exact evaluation metrics over a whole split: AUC, GAUC, logloss, calibration.

Batch-averaged AUC is biased (it depends on how impressions fall into
batches), so evaluation collects every prediction of the split on the host and
computes the metrics once. AUC is the Mann-Whitney statistic with average
ranks for tied scores, which is exactly what scikit-learn's trapezoidal
roc_auc_score computes; numpy only (no scipy), vectorised over users so GAUC
over 10^6 users stays a few sorts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The metrics of one evaluation: an eval record (csctr/rundir.py) is
# {"step", "split"} plus these; bayes_auc only when the data is simulated.
EVAL_FIELDS = ("auc", "gauc", "logloss", "calibration", "cold_auc",
               "num_impressions", "bayes_auc")
# Fields some eval records add: the final test eval of a run with a
# validation split names the checkpoint it scores (csctr/training/loop.py);
# DICM evals count behaviour references and dropped ones (always 0 in evals,
# csctr/data/pipeline.py eval_plan).
OPTIONAL_EVAL_FIELDS = ("best_step", "best_validation_auc", "behavior_refs",
                        "dropped_behavior_refs")


def _grouped_auc(labels: np.ndarray, scores: np.ndarray,
                 groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-group AUC (NaN where a group has one label class) and group sizes.

  One lexsort by (group, score) gives every impression its rank inside its
  group; ties share the average of the positions they span, so tied
  positive/negative pairs count 1/2 as in the ROC trapezoid.
  """
  labels = np.asarray(labels, np.float64).reshape(-1)
  scores = np.asarray(scores, np.float64).reshape(-1)
  _, gid = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
  gid = gid.reshape(-1)
  n = labels.shape[0]
  if n == 0:
    return np.zeros((0,)), np.zeros((0,))
  order = np.lexsort((scores, gid))
  g, s, y = gid[order], scores[order], labels[order]
  pos = np.arange(n)
  new_group = np.r_[True, g[1:] != g[:-1]]
  new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
  group_start = np.maximum.accumulate(np.where(new_group, pos, 0))
  tie_id = np.cumsum(new_tie) - 1
  tie_start = pos[new_tie]
  tie_count = np.bincount(tie_id)
  # 1-based average rank of each impression within its group.
  rank = tie_start[tie_id] + (tie_count[tie_id] - 1) / 2.0 - group_start + 1.0
  num_groups = int(g.max()) + 1
  count = np.bincount(g, minlength=num_groups).astype(np.float64)
  num_pos = np.bincount(g, weights=y, minlength=num_groups)
  num_neg = count - num_pos
  rank_sum = np.bincount(g, weights=rank * y, minlength=num_groups)
  with np.errstate(divide="ignore", invalid="ignore"):
    auc = (rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)
  auc = np.where((num_pos > 0) & (num_neg > 0), auc, np.nan)
  return auc, count


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC; NaN when only one class is present (sklearn would raise)."""
  labels = np.asarray(labels).reshape(-1)
  values, _ = _grouped_auc(labels, scores, np.zeros(labels.shape, np.int32))
  return float(values[0]) if values.size else float("nan")


def gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> float:
  """Per-user AUC averaged with impression-count weights (Zhou et al., DIN).

  Users whose impressions are all clicks or all non-clicks have no AUC and are
  skipped, weight included. NaN when no user has both classes.
  """
  values, count = _grouped_auc(labels, scores, users)
  valid = ~np.isnan(values)
  if not valid.any():
    return float("nan")
  return float(np.sum(values[valid] * count[valid]) / np.sum(count[valid]))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
  """Mean binary cross entropy, clipping like sklearn.metrics.log_loss."""
  y = np.asarray(labels, np.float64).reshape(-1)
  p = np.asarray(probs).reshape(-1)
  eps = np.finfo(p.dtype).eps if np.issubdtype(p.dtype, np.floating) else 1e-15
  p = np.clip(p.astype(np.float64), eps, 1 - eps)
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def sigmoid(logits: np.ndarray) -> np.ndarray:
  """Numerically stable float64 sigmoid (no overflow warnings for |z| >> 1)."""
  z = np.asarray(logits, np.float64)
  e = np.exp(-np.abs(z))
  return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def compute_metrics(logits: np.ndarray, labels: np.ndarray,
                    users: np.ndarray, is_cold: np.ndarray,
                    bayes_auc: float | None = None) -> dict[str, Any]:
  """All eval metrics of one split from its real (weight > 0) impressions.

  Args:
    logits: model outputs, one per impression.
    labels: 0/1 clicks.
    users: user ids for GAUC.
    is_cold: impressions whose item was never seen in training.
    bayes_auc: AUC of the true CTR on this split, when simulated; reported
      beside the model's AUC as its ceiling.

  Returns:
    EVAL_FIELDS: auc, gauc, logloss, calibration (mean prediction / mean
    label: 1 is calibrated), cold_auc (NaN without cold impressions of both
    classes), num_impressions, and bayes_auc when known.
  """
  labels = np.asarray(labels, np.float64).reshape(-1)
  probs = sigmoid(logits).reshape(-1)
  is_cold = np.asarray(is_cold, bool).reshape(-1)
  mean_label = labels.mean() if labels.size else float("nan")
  out = {
      "auc": auc(labels, probs),
      "gauc": gauc(labels, probs, users),
      "logloss": log_loss(labels, probs) if labels.size else float("nan"),
      "calibration": float(probs.mean() / mean_label) if mean_label else float("nan"),
      "cold_auc": auc(labels[is_cold], probs[is_cold]),
      "num_impressions": int(labels.size),
  }
  if bayes_auc is not None:
    out["bayes_auc"] = float(bayes_auc)
  return out


class Collector:
  """Accumulates one split's predictions, keeping only real impressions."""

  def __init__(self):
    self._parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("logits", "label", "user_id", "is_cold")}

  def add(self, logits: np.ndarray, batch: dict[str, np.ndarray]) -> None:
    """Adds a batch; rows with weight 0 (padding) are dropped here."""
    keep = np.asarray(batch["weight"]).reshape(-1) > 0
    self._parts["logits"].append(np.asarray(logits).reshape(-1)[keep])
    for key in ("label", "user_id", "is_cold"):
      self._parts[key].append(np.asarray(batch[key]).reshape(-1)[keep])

  def compute(self, bayes_auc: float | None = None) -> dict[str, Any]:
    cat = {k: (np.concatenate(v) if v else np.zeros((0,)))
           for k, v in self._parts.items()}
    return compute_metrics(cat["logits"], cat["label"], cat["user_id"],
                           cat["is_cold"].astype(bool), bayes_auc)


def json_safe(obj: Any) -> Any:
  """obj with NaN/inf as None and numpy scalars as Python: strict JSON has no NaN."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    obj = obj.item()
  if isinstance(obj, float) and not np.isfinite(obj):
    return None
  return obj
