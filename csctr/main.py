r"""Entry point: flags in, train.train_and_evaluate out.

  python -m csctr.main --config=configs/default.py --workdir=/tmp/csctr_default
  python -m csctr.main --config=configs/default.py:attention=cbam \
      --config.num_train_steps=500 --workdir=/tmp/cbam

Rerunning the same command in the same workdir resumes from its last
checkpoint. --distributed=true calls jax.distributed.initialize() first
(SLURM, Cloud TPU and GPU clusters are detected by JAX itself); for a manual
multi-process run also pass --coordinator_address, --num_processes and
--process_id.
"""

import logging as py_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from csctr import train

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
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(py_logging.Filter):
  """Orbax logs a dozen INFO lines per save; keep its warnings only."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING
            or "/orbax/" not in record.pathname.replace("\\", "/"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info("process %d/%d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  logging.info("config:\n%s", _CONFIG.value)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
