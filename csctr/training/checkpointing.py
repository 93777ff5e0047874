"""Checkpoints: train state and data-iterator position, committed together.

Layout under WORKDIR/checkpoints (one Orbax CheckpointManager):

    <step>/state/   train state pytree (params, opt_state, rest, step, rng),
                    Orbax PyTree format, each array written from its shards
    <step>/data/    process_<i>-of-<n>.json: the Grain iterator state of every
                    process (grain.checkpoint.CheckpointHandler's format);
                    the data order is global (csctr.data.pipeline), so every
                    process saves the same state and any one of them serves
                    a restore on another process count
    <step>.orbax-checkpoint-tmp*   a save in flight; never read

Exact resume rests on three facts. (1) Orbax writes into a tmp directory and
renames it only after every item is on disk, so a process killed mid-save
leaves no directory that `latest_step` lists; `cleanup_tmp_directories` deletes
the debris on the next start. On object stores (gs://), which cannot rename,
Orbax writes <step>/ in place and commits it with <step>/commit_success.txt,
written last; a step without it is not listed either. (2) The iterator position is captured in the
caller's thread at `save` time, together with the arrays (Orbax copies device
arrays to host before `save` returns, so donating them afterwards is safe),
while the writing itself runs in the background. (3) The state and the data
position belong to the same step, so the resumed run sees exactly the batches
the uninterrupted run would have seen next.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
from etils import epath
import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp

from csctr import storage

# What BestCheckpointer ranks checkpoints by (the validation eval's key).
BEST_METRIC = "auc"


class _StateSnapshot:
  """An iterator state frozen at save time, in the shape Grain's handler reads.

  Grain's handler calls item.get_state() when it runs; handing it the live
  iterator would make the saved position depend on when Orbax schedules the
  write. Non-DatasetIterator items are read as get_state() -> bytes.
  """

  def __init__(self, state: dict[str, Any]):
    self._encoded = json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._encoded


class IteratorHandler(grain_ckpt.CheckpointHandler):
  """grain.checkpoint.CheckpointHandler reading JSON states (see restore).

  Its save runs inside Orbax's save, after the tmp directory exists and
  before the rename; tests/test_resume.py patches it there to kill a run
  mid-save.
  """

  def restore(self, directory: epath.Path, item: Any = None,
              args: Any = None) -> Any:
    """Rewinds the iterator; the file is always JSON (see _StateSnapshot).

    Grain's own restore picks JSON or bytes by the iterator's class; reading
    JSON here serves every iterator with get_state()/set_state() of dicts.
    """
    item = item if item is not None else args.item
    directory = epath.Path(directory)
    own = directory / (
        f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    paths = [own] if own.exists() else sorted(directory.glob("process_*.json"))
    if not paths:
      raise ValueError(f"no iterator state in {directory}")
    state = json.loads(paths[0].read_text())
    if not own.exists():  # another process count: the order must be global
      others = [json.loads(p.read_text()) for p in paths[1:]]
      if any(o != state for o in others):
        raise ValueError(
            f"the iterator states in {directory} differ between processes "
            "(a checkpoint of a per-process data order): it resumes only on "
            "the process count that wrote it")
      logging.info("data position from %s (written by %d processes)",
                   paths[0].name, len(paths))
    item.set_state(state)
    return item


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  item: Any


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs in `directory`."""

  def __init__(self, directory: str | os.PathLike[str], keep: int,
               async_save: bool = True):
    self._manager = ocp.CheckpointManager(
        storage.as_path(directory),
        item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    """Last committed step; tmp directories of interrupted saves don't count."""
    return self._manager.latest_step()

  def committed_before(self, step: int) -> int | None:
    """The last step < `step` saved; called after save(step) it is committed.

    (Orbax finishes a save before it starts the next one.)
    """
    earlier = [s for s in self._manager.all_steps() if s < step]
    return max(earlier) if earlier else None

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, iterator: Any) -> None:
    """Starts saving; returns once the arrays and iterator state are copied."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=IteratorSave(_StateSnapshot(iterator.get_state()))),
        force=True)  # never let a save still in flight skip this one

  def restore(self, step: int, abstract_state: Any, iterator: Any) -> Any:
    """Train state of `step`, placed per abstract_state's shardings.

    `iterator` is rewound in place to the position saved with that state.
    """
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=IteratorRestore(iterator)))
    logging.info("Restored step %d from %s", step, self._manager.directory)
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class BestCheckpointer:
  """The model of the best validation eval so far, beside the latest state.

  A second Orbax CheckpointManager (WORKDIR/best_checkpoint) holding only
  what inference needs ({'params', 'rest'} under the item name 'state', so
  rundir.restore_items / restore_model(best=True) read it), saved with
  its validation metric whenever an eval beats every earlier one. Orbax's
  own `max_to_keep` garbage collection is not used: it could delete the
  previous best while the newer one is still ahead of the last committed
  train checkpoint, and a SIGKILL then would lose both (the newer one is
  rewound on resume). Instead `prune(step)` drops only checkpoints dominated
  by one at or before `step`, a committed train checkpoint, and `rewind`
  drops the ones a resumed run will redo. Saves are synchronous (they are
  rare), so a committed train checkpoint at step s implies the best
  checkpoint of any eval <= s is on disk.
  """

  def __init__(self, directory: str | os.PathLike[str]):
    self._manager = ocp.CheckpointManager(
        epath.Path(directory), item_names=("state",),
        options=ocp.CheckpointManagerOptions(
            best_fn=lambda m: m[BEST_METRIC], best_mode="max", create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=False))

  def _scores(self, up_to: int | None = None) -> list[tuple[int, float]]:
    out = []
    for step in self._manager.all_steps():
      if up_to is None or step <= up_to:
        value = (self._manager.metrics(step) or {}).get(BEST_METRIC)
        out.append((step, float("nan") if value is None else float(value)))
    return sorted(out)

  def best(self, up_to: int | None = None) -> tuple[int, float] | None:
    """(step, metric) of the best checkpoint (ties: the earliest), or None."""
    scores = [s for s in self._scores(up_to) if s[1] == s[1]]
    if not scores:
      return None
    return max(scores, key=lambda s: (s[1], -s[0]))

  def consider(self, step: int, state: Any, value: float) -> bool:
    """Saves state's model if `value` beats every earlier one; True if saved."""
    best = self.best()
    if value != value or (best is not None and value <= best[1]):
      return False
    self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(
            {"params": state["params"], "rest": state["rest"]})),
        metrics={BEST_METRIC: float(value)}, force=True)
    return True

  def rewind(self, step: int) -> None:
    """Deletes checkpoints after `step` (a resumed run redoes those evals)."""
    for s, _ in self._scores():
      if s > step:
        self._manager.delete(s)
    self.prune(step)

  def prune(self, committed: int) -> None:
    """Deletes the checkpoints <= committed that are not the best of them."""
    best = self.best(committed)
    for s, _ in self._scores(committed):
      if best is None or s != best[0]:
        self._manager.delete(s)

  def restore(self, step: int, abstract: Any) -> Any:
    """{'params', 'rest'} of checkpoint `step`, placed per `abstract`."""
    return self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]

  def close(self) -> None:
    self._manager.close()
