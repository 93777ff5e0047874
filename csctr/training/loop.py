"""The training loop: train, evaluate, checkpoint, resume.

`train_and_evaluate(config, workdir)` is the whole experiment; main.py only
parses flags. The pieces it wires together live beside it: mesh.py (devices
and shardings), steps.py (the jitted steps), evaluation.py (full-split evals),
checkpointing.py (Orbax + Grain state), and csctr/rundir.py (the run
directory's files, which export and serving read back).
"""

from __future__ import annotations

from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tensorboardX import SummaryWriter

from csctr import progress as progress_lib
from csctr import rundir
from csctr import storage
from csctr.data import autobatch
from csctr.data import pipeline
from csctr.training import baselines
from csctr.training import checkpointing
from csctr.training import evaluation
from csctr.training import mesh as mesh_lib
from csctr.training import steps as steps_lib


def prepare_data(config: ml_collections.ConfigDict) -> str:
  """Prepares the dataset once per run, not once per process.

  Process 0 prepares. With a URL data root (shared storage) the others wait
  for its commit marker (info.json, uploaded last) and read it; a dataset
  already committed there (e.g. by the Beam job) is read at once. With a
  local data root they wait at a barrier, then find the shared cache (a
  shared filesystem) or prepare their own copy (local disks). Concurrent
  preparers would be safe (a dataset is committed by its info.json) but
  would redo the same work.
  """
  if jax.process_count() == 1:
    return pipeline.prepare_dataset(config)
  if storage.is_remote(pipeline.data_root(config)):
    return pipeline.prepare_dataset(config, wait=jax.process_index() != 0)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  path = pipeline.prepare_dataset(config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("csctr:prepare_dataset")
  return path or pipeline.prepare_dataset(config)


def _dropped_fraction(values: list[dict[str, Any]]) -> tuple[int, int] | None:
  """(dropped, all) behaviour references of some steps; None without DICM."""
  if not values or "behavior_refs" not in values[0]:
    return None
  return (sum(int(v["dropped_behavior_refs"]) for v in values),
          sum(int(v["behavior_refs"]) for v in values))


class _StepLog:
  """Deferred loss checks and progress lines.

  Step metrics stay on device until a log, eval or checkpoint boundary, so
  the host never waits on a step it just dispatched; every boundary checks all
  steps since the last one, before anything is saved.
  """

  def __init__(self, start_step: int, total: int, writer, slots: int = 0,
               max_dropped: float = 1.0):
    self.pending: list[tuple[int, dict[str, jax.Array]]] = []
    self.total, self.writer = total, writer
    self.slots, self.max_dropped = slots, max_dropped
    self.meter = progress_lib.Meter(total, start_step)

  def flush(self, log: bool) -> None:
    if not self.pending:
      return
    values = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending = []
    for s, v in zip(steps, values):
      if not (np.isfinite(v["loss"]) and np.isfinite(v["grad_norm"])):
        raise FloatingPointError(
            f"non-finite loss at step {s} (loss={v['loss']}, "
            f"grad_norm={v['grad_norm']}); the last checkpoint is the last "
            "good state")
    dropped = _dropped_fraction(values)
    if dropped is not None and dropped[0] > self.max_dropped * dropped[1]:
      raise ValueError(
          f"steps {steps[0]}-{steps[-1]} dropped {dropped[0]} of {dropped[1]} "
          "behaviour references (their images did not fit the batch's "
          f"unique_images), over config.data.max_dropped_behavior_fraction="
          f"{self.max_dropped}: raise data.unique_images or lower "
          "groups_per_batch (pipeline.behavior_overflow estimates the rate)")
    if not log:
      return
    step = steps[-1]
    rate = sum(int(v["impressions"]) for v in values) / self.meter.elapsed()
    steps_per_s, eta = self.meter.rate(step), self.meter.eta(step)
    loss = float(np.mean([v["loss"] for v in values]))
    lr = float(values[-1]["learning_rate"])
    impressions = sum(int(v["impressions"]) for v in values)
    extra = (f", packing {impressions / (len(values) * self.slots):.2f}"
             if self.slots else "")
    if dropped is not None:
      extra += f", behaviours dropped {dropped[0]}/{dropped[1]}"
    logging.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e | %.0f "
                 "impressions/s, %.2f steps/s, ETA %.0fs%s", step, self.total,
                 loss, float(values[-1]["grad_norm"]), lr, rate, steps_per_s,
                 eta, extra)
    if self.writer is not None:
      for k, v in (("loss", loss), ("impressions_per_sec", rate),
                   ("learning_rate", lr),
                   ("grad_norm", float(values[-1]["grad_norm"]))):
        self.writer.add_scalar(f"train/{k}", v, step)
    self.restart(step)

  def restart(self, step: int) -> None:
    """Starts a new timing window (after evals and saves, which aren't steps)."""
    self.meter.restart(step)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains config's model, evaluating and checkpointing; resumes from workdir.

  Long because the order of its steps is the exact-resume contract and is
  read best in one place: restore or init, then per step log -> eval ->
  best checkpoint -> train checkpoint (each after a flush that checks every
  pending loss), and the final eval of a complete run. Its setup is a
  candidate for a helper once the loop stops changing.

  Returns the final eval record (rundir.eval_record: step, split and
  metrics.EVAL_FIELDS).
  """
  storage.makedirs(workdir)
  mesh = mesh_lib.make_mesh(config)
  data_sharding = NamedSharding(mesh, P("data"))
  shards = mesh_lib.data_shards(data_sharding)
  data_path = prepare_data(config)
  info = pipeline.load_info(data_path)
  config = autobatch.resolve(config, info, mesh.shape["data"])
  mesh_lib.check_batch_divides(config, mesh)
  logging.info("mesh %s; dataset %s: %s", dict(mesh.shape), data_path, info)
  if jax.process_index() == 0:
    rundir.save_run_files(workdir, config, info, data_path)

  steps = steps_lib.build_steps(config, info, mesh)
  init_fn, abstract, shardings = steps.init_fn, steps.abstract, steps.shardings
  train_step, eval_step = steps.train_step, steps.eval_step
  num_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))
  logging.info("model: %d parameters", num_params)
  mesh_lib.log_shardings(abstract["params"], shardings["params"])

  train_iter = pipeline.train_iterator(config, data_path, shards)
  ckpt = checkpointing.Checkpointer(rundir.checkpoint_dir(workdir),
                                    keep=config.keep_checkpoints)
  start_step = ckpt.latest_step() or 0
  if start_step:
    state = ckpt.restore(start_step, rundir.abstract_with_shardings(
        abstract, shardings), train_iter)
  else:
    state = steps_lib.init_state(init_fn, shardings)
    if config.model.encoder_init:
      state = steps_lib.init_encoder_from(state, shardings, config.model.encoder_init)
  # With a validation split, evals during training are on it and select the
  # best checkpoint; test is scored once, at the end, on that checkpoint.
  eval_split = ("validation" if evaluation.has_split(info, "validation")
                else "test")
  best = (checkpointing.BestCheckpointer(rundir.best_checkpoint_dir(workdir))
          if eval_split == "validation" else None)
  if best is not None:
    best.rewind(start_step)
  if jax.process_index() == 0:
    rundir.truncate_eval_log(workdir, start_step)
    baselines.write(workdir, data_path, evaluation.eval_splits(info),
                    {s: evaluation.split_bayes_auc(info, s)
                     for s in evaluation.eval_splits(info)})
  writer = (SummaryWriter(workdir, purge_step=start_step + 1 if start_step
                          else None) if jax.process_index() == 0 else None)

  total = config.num_train_steps
  progress = _StepLog(
      start_step, total, writer,
      slots=config.data.groups_per_batch * config.data.group_size,
      max_dropped=config.data.max_dropped_behavior_fraction)
  record = None
  try:
    for step in range(start_step + 1, total + 1):
      local = next(train_iter)
      state, step_metrics = train_step(
          state, mesh_lib.global_batch(local, data_sharding, shards))
      progress.pending.append((step, step_metrics))
      last = step == total
      if (config.log_every and step % config.log_every == 0) or last:
        progress.flush(log=True)
      # Eval before checkpoint: a committed checkpoint at step s implies the
      # eval of step s is logged, so a resume from s never skips it.
      if (config.eval_every and step % config.eval_every == 0) or last:
        progress.flush(log=False)
        record = evaluation.write_eval(
            workdir, writer, step, eval_split, evaluation.evaluate(
                eval_step, state, config, data_path, info, data_sharding,
                split=eval_split))
        if best is not None:  # saved before the train checkpoint of step
          best.consider(step, state, record[checkpointing.BEST_METRIC])
        progress.restart(step)
      if (config.checkpoint_every and step % config.checkpoint_every == 0
          or last):
        progress.flush(log=False)  # never save a state after a bad step
        ckpt.save(step, state, train_iter)
        if best is not None:
          best.prune(ckpt.committed_before(step) or 0)
        progress.restart(step)
  finally:
    ckpt.wait()  # a good checkpoint in flight is committed even on error
    committed = ckpt.latest_step() or 0
    ckpt.close()
    if writer is not None:
      writer.close()

  if best is not None:
    try:
      best.prune(committed)
      return _final_test_of_best(best, eval_step, state, steps.shardings,
                                 config, data_path, info, data_sharding,
                                 workdir)
    finally:
      best.close()
  if record is None:
    # Nothing left to train: the run was complete. Every process evaluates
    # (the eval is collective, and only process 0 may see the log file);
    # the result is the logged final eval, bit for bit, and is not re-logged.
    values = evaluation.evaluate(eval_step, state, config, data_path, info, data_sharding)
    record = rundir.eval_record(total, "test", values)
    if jax.process_index() == 0 and record not in rundir.read_eval_log(workdir):
      with SummaryWriter(workdir) as writer:
        evaluation.write_eval(workdir, writer, total, "test", values)
  return record


def _final_test_of_best(best: checkpointing.BestCheckpointer, eval_step,
                        state: steps_lib.State, shardings: steps_lib.State,
                        config: ml_collections.ConfigDict, data_path: str,
                        info: Any, data_sharding: NamedSharding,
                        workdir: str) -> dict[str, Any]:
  """The test eval of the best-validation checkpoint, logged once.

  Every process evaluates (the eval is collective); a rerun of a finished
  run recomputes the same record bit for bit and does not log it again.
  """
  chosen = best.best()
  if chosen is None:
    raise ValueError("no validation eval produced a finite AUC: cannot "
                     "select a checkpoint (is the validation split one-class?)")
  step, value = chosen
  model_state = best.restore(step, {
      k: rundir.abstract_with_shardings(state[k], shardings[k])
      for k in ("params", "rest")})
  values = evaluation.evaluate(eval_step, dict(state, **model_state), config,
                               data_path, info, data_sharding, split="test")
  values = {"best_step": step, "best_validation_auc": value, **values}
  total = config.num_train_steps
  record = rundir.eval_record(total, "test", values)
  if jax.process_index() == 0 and record not in rundir.read_eval_log(workdir):
    with SummaryWriter(workdir) as writer:
      evaluation.write_eval(workdir, writer, total, "test", values)
  return record
