r"""Entry point: flags in, train.train_and_evaluate out.

  python -m csctr.main --config=configs/default.py --workdir=/tmp/csctr_default
  python -m csctr.main --config=configs/default.py:attention=cbam \
      --config.num_train_steps=500 --workdir=/tmp/cbam

Rerunning the same command in the same workdir resumes from its last
checkpoint. The run is multi-process, and jax.distributed.initialize() is
called first, when --distributed=true (SLURM, Cloud TPU and GPU clusters are
detected by JAX itself) or when a coordinator is named, by
--coordinator_address or $JAX_COORDINATOR_ADDRESS; a manual run also gives
--num_processes / $JAX_NUM_PROCESSES and --process_id / $JAX_PROCESS_ID
(launch/local_multiprocess.sh does, for N processes on this machine). Only
process 0 logs at INFO and writes metrics; the others log warnings and errors.
"""

import logging as py_logging
import os
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from csctr.training import loop as train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (with optional :args).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Checkpoints, eval_metrics.jsonl and TensorBoard events.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (manual multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300,
    "Seconds to wait for every process to reach the coordinator before "
    "failing (rather than hanging).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(py_logging.Filter):
  """Orbax logs a dozen INFO lines per save; keep its warnings only."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING
            or "/orbax/" not in record.pathname.replace("\\", "/"))


def distributed_kwargs(distributed: bool, coordinator_address: str | None,
                       num_processes: int | None, process_id: int | None,
                       initialization_timeout: int,
                       env: Mapping[str, str] = os.environ
                       ) -> dict[str, Any] | None:
  """jax.distributed.initialize's arguments, or None for a one-process run.

  Flags win over the environment. Unset values stay None, for JAX to detect
  from the cluster (SLURM, Cloud TPU, ...).
  """
  coordinator_address = coordinator_address or env.get(
      "JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  if not (distributed or coordinator_address):
    return None
  return {"coordinator_address": coordinator_address,
          "num_processes": num_processes, "process_id": process_id,
          "initialization_timeout": initialization_timeout}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  kwargs = distributed_kwargs(_DISTRIBUTED.value, _COORDINATOR.value,
                              _NUM_PROCESSES.value, _PROCESS_ID.value,
                              _INIT_TIMEOUT.value)
  if kwargs is not None:
    # Quiet before initialize when the index is known, so that JAX's own
    # connection lines come from process 0 alone too.
    if kwargs["process_id"]:
      logging.set_verbosity(logging.WARNING)
    jax.distributed.initialize(**kwargs)
    if jax.process_index() != 0:
      # N copies of every progress line say nothing new; errors still show.
      logging.set_verbosity(logging.WARNING)
  logging.info("process %d/%d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  logging.info("config:\n%s", _CONFIG.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
