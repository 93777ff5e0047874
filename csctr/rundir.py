"""The run directory: what a training run leaves for export and serving.

    WORKDIR/config.json          the run's config
    WORKDIR/data_info.json       DataInfo + the prepared dataset's path
    WORKDIR/eval_metrics.jsonl   one JSON line per evaluation
    WORKDIR/checkpoints/         Orbax (csctr/training/checkpointing.py)

restore_model rebuilds a trained model from these alone. This module imports
nothing of the training stack (no Grain, TFDS, optax or tensorboardX), so the
online scorer can use it. WORKDIR may be a URL (gs://...): every file goes
through csctr.storage, and each is written whole (an object upload, or a
local rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
from flax import nnx
import jax
import ml_collections
import orbax.checkpoint as ocp

from csctr import storage
from csctr import metrics
from csctr.data import batch as batch_lib
from csctr.data import vocab as vocab_lib
from csctr.model import ctr

METRICS_FILE = "eval_metrics.jsonl"
# The run's config and DataInfo, written at every start: what restore_model
# (export, serving) needs to rebuild the model without the config file or
# the prepared dataset.
CONFIG_FILE = "config.json"
DATA_INFO_FILE = "data_info.json"
CHECKPOINTS_DIR = "checkpoints"
# The model of the best validation eval (training/checkpointing.py's
# BestCheckpointer); only runs with a validation split have one.
BEST_CHECKPOINT_DIR = "best_checkpoint"


def checkpoint_dir(workdir: str) -> str:
  return storage.join(workdir, CHECKPOINTS_DIR)


def best_checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, BEST_CHECKPOINT_DIR)


def eval_record(step: int, split: str,
                values: dict[str, Any]) -> dict[str, Any]:
  """One line of METRICS_FILE: step, split, metrics.EVAL_FIELDS (+ optional).

  NaN (an undefined AUC) is written as null: strict JSON has no NaN.
  """
  unknown = (set(values) - set(metrics.EVAL_FIELDS)
             - set(metrics.OPTIONAL_EVAL_FIELDS))
  if unknown:
    raise ValueError(f"eval values {sorted(unknown)} are not in "
                     f"metrics.EVAL_FIELDS {metrics.EVAL_FIELDS}")
  return {"step": step, "split": split, **metrics.json_safe(values)}


def latest_committed_step(workdir: str) -> int | None:
  """The newest committed checkpoint step, from directory names alone.

  Orbax writes a step into a tmp directory and renames it to the bare step
  number when complete (and, on object stores, adds commit_success.txt), so
  a digit-named directory is committed; asked every few seconds, this must
  not open a CheckpointManager.
  """
  root = checkpoint_dir(workdir)
  steps = [int(n) for n in (os.listdir(root) if os.path.isdir(root) else ())
           if n.isdigit()]
  return max(steps, default=None)


def read_eval_log(workdir: str) -> list[dict[str, Any]]:
  """The evals logged so far; a line cut short by a kill is skipped."""
  path = storage.join(workdir, METRICS_FILE)
  if not storage.exists(path):
    return []
  entries = []
  for line in storage.read_text(path).splitlines():
    try:
      entries.append(json.loads(line))
    except json.JSONDecodeError:
      logging.warning("skipping a partial line of %s: %r", path, line)
  return entries


def _write_eval_log(workdir: str, entries: list[dict[str, Any]]) -> None:
  # Rewritten whole (it is small): object stores cannot append, and a kill
  # mid-write leaves the old log (rename or single upload), never half a line.
  storage.write_text(storage.join(workdir, METRICS_FILE),
                     "".join(json.dumps(e) + "\n" for e in entries))


def append_eval(workdir: str, record: dict[str, Any]) -> None:
  """Adds one eval record to WORKDIR/eval_metrics.jsonl."""
  _write_eval_log(workdir, [*read_eval_log(workdir), record])


def truncate_eval_log(workdir: str, last_step: int) -> None:
  """Drops evals after the restored step: the resumed run redoes them.

  A run killed between an eval and the next checkpoint would otherwise log
  that eval twice.
  """
  if storage.exists(storage.join(workdir, METRICS_FILE)):
    _write_eval_log(workdir, [e for e in read_eval_log(workdir)
                              if e["step"] <= last_step])


def save_run_files(workdir: str, config: ml_collections.ConfigDict,
                   info: batch_lib.DataInfo, data_path: str) -> None:
  """Writes WORKDIR/config.json and data_info.json (+ the dataset path)."""
  storage.write_json(storage.join(workdir, CONFIG_FILE),
                     json.loads(config.to_json_best_effort()))
  storage.write_json(storage.join(workdir, DATA_INFO_FILE),
                     {**info.to_json(), "data_path": data_path})
  # The vocabularies travel with the run: serving maps raw ids with them
  # even after the dataset cache is cleared or on another machine.
  # Both may be URLs: every file goes through storage.
  source = storage.as_path(storage.join(data_path, vocab_lib.VOCAB_DIR))
  if source.is_dir():
    for f in sorted(source.iterdir()):
      storage.write_bytes(
          storage.join(workdir, vocab_lib.VOCAB_DIR, f.name), f.read_bytes())


def load_vocabularies(workdir: str) -> dict[str, vocab_lib.Vocabulary]:
  """The raw-id vocabularies of the run's dataset ({} when it has none:
  simulated datasets, whose ids are rows)."""
  if not storage.is_remote(workdir):
    return vocab_lib.load_vocabularies(workdir)
  folder = storage.as_path(storage.join(workdir, vocab_lib.VOCAB_DIR))
  if not folder.is_dir():
    return {}
  local = storage.mirror_path(storage.join(workdir, vocab_lib.VOCAB_DIR))
  for f in folder.iterdir():  # small files: read through a local copy
    storage.write_bytes(os.path.join(local, vocab_lib.VOCAB_DIR, f.name),
                        f.read_bytes())
  return vocab_lib.load_vocabularies(local)


def load_run_files(workdir: str) -> tuple[ml_collections.ConfigDict,
                                          batch_lib.DataInfo, str]:
  """(config, info, prepared dataset path) of the run in `workdir`."""
  path = storage.join(workdir, CONFIG_FILE)
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} not found: was {workdir} written by "
                            "train.train_and_evaluate?")
  config = ml_collections.ConfigDict(storage.read_json(path))
  d = storage.read_json(storage.join(workdir, DATA_INFO_FILE))
  return config, batch_lib.DataInfo.from_json(d), d["data_path"]


def restore_model(workdir: str, step: int | None = None, best: bool = False
                  ) -> tuple[ctr.CTRModel, ml_collections.ConfigDict,
                             batch_lib.DataInfo, int]:
  """(model, config, info, step) of a checkpoint (default: the latest).

  For inference on this process's first device: only params and the other
  model variables are read, not the optimizer state. best=True reads the
  best-validation checkpoint (the one a finished run's test eval scored).
  """
  config, info, _ = load_run_files(workdir)
  abstract_model = nnx.eval_shape(
      lambda: ctr.build_model(config.model, info, nnx.Rngs(config.seed)))
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      {"params": params, "rest": rest})
  restored, step = restore_items(
      best_checkpoint_dir(workdir) if best else checkpoint_dir(workdir),
      abstract, step)
  model = nnx.merge(graphdef, restored["params"], restored["rest"])
  return model, config, info, step


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target sharding, for StandardRestore."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def restore_items(directory: str | os.PathLike[str], abstract: dict[str, Any],
                  step: int | None = None) -> tuple[dict[str, Any], int]:
  """Some top-level entries of a saved train state (e.g. params), read-only.

  For inference (csctr.export, csctr.serving): only the keys of `abstract`
  (a dict of ShapeDtypeStruct trees with shardings) are read, so the
  optimizer moments never load. The manager neither creates directories nor
  cleans up tmp directories, so it is safe beside a trainer that is saving.

  Returns:
    (restored entries, step); step defaults to the latest committed one.
  """
  manager = ocp.CheckpointManager(
      storage.as_path(directory), item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(
          create=False, cleanup_tmp_directories=False, read_only=True,
          save_interval_steps=0))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no committed checkpoint in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract))))
  finally:
    manager.close()
  return dict(restored["state"]), int(step)
