"""Evaluation over a whole split, and the eval log it writes."""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections
from jax.sharding import NamedSharding
from tensorboardX import SummaryWriter

from csctr import metrics as metrics_lib
from csctr import rundir
from csctr.data import batch as batch_lib
from csctr.data import pipeline
from csctr.training import mesh as mesh_lib

State = dict[str, Any]


def evaluate(eval_step, state: State, config: ml_collections.ConfigDict,
             data_path: str, info: batch_lib.DataInfo, sharding: NamedSharding,
             split: str = "test") -> dict[str, Any]:
  """Metrics over the whole split: predictions are collected, then scored once."""
  collector = metrics_lib.Collector()
  refs = dropped = 0
  shards = mesh_lib.data_shards(sharding)
  for local in pipeline.eval_batches(config, data_path, split, shards):
    out = jax.device_get(eval_step(state, mesh_lib.global_batch(
        local, sharding, shards)))
    collector.add(out["logits"], out)
    if "behavior_dropped" in local:  # this process's part (0 by design)
      dropped += int(local["behavior_dropped"].sum())
      refs += int(local["behavior_mask"].sum()) + int(
          local["behavior_dropped"].sum())
  values = collector.compute(split_bayes_auc(info, split))
  if info.num_behaviors:
    values.update(behavior_refs=refs, dropped_behavior_refs=dropped)
  return values


def eval_splits(info: batch_lib.DataInfo) -> tuple[str, ...]:
  """The splits a run scores: validation (when present) and test."""
  return tuple(s for s in ("validation", "test") if has_split(info, s))


def has_split(info: batch_lib.DataInfo, split: str) -> bool:
  """Whether the prepared dataset holds a non-empty `split`."""
  return split in info.splits and info.splits[split].groups > 0


def split_bayes_auc(info: batch_lib.DataInfo, split: str) -> float | None:
  """The Bayes AUC of a split (simulated data), None when unknown."""
  if split == "test":
    return info.bayes_auc
  return info.splits[split].bayes_auc if split in info.splits else None


def write_eval(workdir: str, writer: SummaryWriter | None, step: int,
               split: str, values: dict[str, Any]) -> dict[str, Any]:
  record = rundir.eval_record(step, split, values)
  logging.info("eval %s step %d: %s", split, step, " ".join(
      f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
      for k, v in values.items()))
  if jax.process_index() == 0:
    rundir.append_eval(workdir, record)
    for k, v in values.items():
      if isinstance(v, (int, float)) and v == v:
        writer.add_scalar(f"{split}/{k}", v, step)
    writer.flush()
  return record
