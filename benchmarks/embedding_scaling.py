r"""Train step time and memory as an ID table grows from 10^4 to 10^8 rows.

  python benchmarks/embedding_scaling.py                  # 1 and 8 devices
  python benchmarks/embedding_scaling.py --rows=10000,10000000 --devices=1
  python -m benchmarks.embedding_scaling --rows=10000,1000000

The trainer's own train step (csctr.training.steps.build_steps, timed by
benchmarks/step_timing.py on random batches of the right shapes) on the ID
part of the default model (use_image=False), with the item_id table resized
to each row count, embed_dim 16 and row-wise Adagrad. Each device count runs
in its own process: one device with the whole table, and N fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, which must be set
before JAX starts) with the table row-sharded over 'model'. Fake devices
share the same cores, so their times show overheads, not speedups.

The embedding engine (csctr/model/embeddings.py) makes a step cost the rows
a batch touches, so the target is a step at 10^8 rows within 1.5x of the
step at 10^4. 10^8 x 16 float32 is 6.4 GB plus 0.4 GB of accumulators: check
free memory first (tables that large are drawn row by row, so the init
adds little: the 1-device worker held 7.2 GB at 10^8 rows). Prints one JSON line {"points": [{"rows", "devices",
"step_s", "peak_bytes", ...}, ...]} and a table; peak_bytes is XLA's static
estimate of the compiled step per device (arguments + outputs - donated
aliases + temporaries).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import step_timing

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "default.py"),
    "Experiment config file (its ID features and batch shape).",
    lock_config=False)
_ROWS = flags.DEFINE_list(
    "rows", ["10000", "100000", "1000000", "10000000", "100000000"],
    "Rows of the item_id table.")
_DEVICES = flags.DEFINE_list(
    "devices", ["1", "8"], "Device counts; > 1: fake CPU devices with the "
    "table row-sharded over 'model'.")
_OPTIMIZER = flags.DEFINE_string("embed_optimizer", "rowwise_adagrad",
                                 "config.optim.embed_optimizer to time.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs; medians are reported.")
_MIN_RUN_S = flags.DEFINE_float("min_run_s", 0.5, "Seconds per timed run.")
_WORKER = flags.DEFINE_bool("worker", False, "Internal: time one device "
                            "count in this process and print its JSON.")
_TARGET = 1.5  # step at the most rows / step at the fewest


def _worker(rows: list[int], devices: int) -> list[dict[str, Any]]:
  config = _CONFIG.value
  config.model.embed_dim = 16
  config.optim.embed_optimizer = _OPTIMIZER.value
  return step_timing.rows_sweep(config, rows, devices, runs=_RUNS.value,
                                min_run_s=_MIN_RUN_S.value, warmup=3)


def _run_device_count(rows: list[int], devices: int) -> list[dict[str, Any]]:
  """The worker for one device count in a fresh process (XLA_FLAGS, memory)."""
  return step_timing.run_worker(
      __file__, [f"--rows={','.join(map(str, rows))}", f"--devices={devices}",
                 f"--embed_optimizer={_OPTIMIZER.value}", f"--runs={_RUNS.value}",
                 f"--min_run_s={_MIN_RUN_S.value}",
                 *[a for a in sys.argv[1:] if a.startswith("--config")]],
      devices, timeout=3600)


def _print_table(points: list[dict[str, Any]]) -> None:
  print(f"\n{'rows':>11}{'devices':>8}{'ms/step':>10}{'x fewest':>10}"
        f"{'MiB/device':>12}{'init s':>8}")
  for devices in sorted({p["devices"] for p in points}):
    pts = [p for p in points if p["devices"] == devices]
    base = min(pts, key=lambda p: p["rows"])["step_s"]
    for p in pts:
      print(f"{p['rows']:>11.0e}{devices:>8}{p['step_s'] * 1e3:>10.2f}"
            f"{p['step_s'] / base:>10.2f}{p['peak_bytes'] / 2**20:>12.1f}"
            f"{p['init_s']:>8.1f}")
    big = max(pts, key=lambda p: p["rows"])
    ratio = big["step_s"] / base
    print(f"{devices} device(s): step at {big['rows']:.0e} rows = "
          f"{ratio:.2f}x the step at {min(p['rows'] for p in pts):.0e} "
          f"(target <= {_TARGET}x): {'met' if ratio <= _TARGET else 'MISSED'}")


def main(argv):
  del argv
  rows = [int(r) for r in _ROWS.value]
  devices = [int(d) for d in _DEVICES.value]
  if _WORKER.value:
    print("RESULT " + json.dumps(_worker(rows, devices[0])))
    return
  load = [step_timing.load_average()]
  points = []
  for n in devices:
    print(f"rows sweep on {n} device(s):", flush=True)
    points += _run_device_count(rows, n)
  load.append(step_timing.load_average())
  print(json.dumps({"points": points, "load_average": load}))
  _print_table(points)


if __name__ == "__main__":
  app.run(main)
