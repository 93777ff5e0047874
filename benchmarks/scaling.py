r"""Step time and memory as unique images per batch and ID-table rows grow.

  python benchmarks/scaling.py                       # ~4 min on 2 CPU cores
  python benchmarks/scaling.py --unique_images=8,32 --rows=10000,1000000

Two sweeps of the trainer's own train step (csctr.training.steps.build_steps, timed
by benchmarks/step_timing.py on random batches of the right shapes):

* unique images U = 8 ... 128 per batch, for the default model with its
  batch of G = 8 groups x K = 25 impressions (B = 200 fixed): the rows past
  G are image-table rows as behaviour images would fill them, so the CNN
  runs on all U and the head's work stays constant. One device.
* rows of the item_id embedding table, 10^4 ... 10^7 (embed_dim 16, Adagrad),
  on the ID part of the default model (use_image=False: the CNN's cost does
  not depend on the table, and leaving it out keeps the sweep within
  minutes), twice: on one device, and row-sharded over 'model' on a 1 x N
  mesh of fake CPU devices (--model_devices, in a subprocess, as
  XLA_FLAGS=--xla_force_host_platform_device_count must be set before JAX
  starts). Memory is per device; the fake devices share the same cores, so
  their step times show overheads, not speedups.

Memory is XLA's static estimate for the compiled step (arguments + outputs
- donated aliases + temporaries) per device. Writes --png (matplotlib, Agg)
and --json_out, and prints the tables (docs/scaling.md quotes a run).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import step_timing
from csctr.training import mesh as mesh_lib
from csctr.training import steps as steps_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "default.py"),
    "Experiment config file.", lock_config=False)
_UNIQUE = flags.DEFINE_list("unique_images", ["8", "16", "32", "64", "128"],
                            "Unique images per batch U (each >= G).")
_ROWS = flags.DEFINE_list("rows", ["10000", "100000", "1000000", "10000000"],
                          "Rows of the item_id embedding table.")
_MODEL_DEVICES = flags.DEFINE_integer(
    "model_devices", 8, "Fake devices on 'model' for the sharded rows sweep "
    "(0: skip it).")
_RUNS = flags.DEFINE_integer("runs", 3, "Timed runs; medians are reported.")
_MIN_RUN_S = flags.DEFINE_float("min_run_s", 0.5, "Seconds per timed run.")
_PNG = flags.DEFINE_string("png", os.path.join(ROOT, "docs", "scaling.png"),
                           "Figure to write ('' for none).")
_JSON_OUT = flags.DEFINE_string(
    "json_out", os.path.join(ROOT, "docs", "scaling.json"),
    "JSON to write ('' for none).")
_WORKER = flags.DEFINE_bool(
    "worker", False, "Internal: run the sharded rows sweep in this process "
    "and print its JSON.")


def _timing() -> dict[str, Any]:
  return {"runs": _RUNS.value, "min_run_s": _MIN_RUN_S.value, "warmup": 2}


def unique_images_sweep(base, sizes: list[int]) -> list[dict[str, Any]]:
  """Step time and memory vs U, the rest of the batch fixed."""
  config = copy.deepcopy(base)
  config.mesh.shape = (1, 1)
  info = step_timing.data_info(config)
  mesh = mesh_lib.make_mesh(config)
  # One build and one init serve every U: the jitted step retraces per
  # batch shape, and each point gets its own copy of the initial state.
  steps = steps_lib.build_steps(config, info, mesh)
  state0 = step_timing.init_state(steps)
  out = []
  for u in sizes:
    config.data.unique_images = u
    r = step_timing.time_train_step(
        config, info, mesh, steps=steps,
        state=jax.tree.map(jnp.copy, state0), **_timing())
    out.append({"U": u, "G": config.data.groups_per_batch,
                "K": config.data.group_size, **r})
    print(f"  U={u}: {r['step_s'] * 1e3:.1f} ms/step, "
          f"{r.get('peak_bytes', 0) / 2**20:.1f} MiB", flush=True)
  return out


def _sharded_rows_in_subprocess(rows: list[int], devices: int) -> list[dict]:
  return step_timing.run_worker(
      __file__, [f"--rows={','.join(map(str, rows))}",
                 f"--model_devices={devices}", f"--runs={_RUNS.value}",
                 f"--min_run_s={_MIN_RUN_S.value}",
                 *[a for a in sys.argv[1:] if a.startswith("--config")]],
      devices)


def plot(result: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
  u = result["unique_images"]
  xs = [p["U"] for p in u]
  axes[0, 0].plot(xs, [p["step_s"] * 1e3 for p in u], "o-")
  axes[0, 0].set(xlabel="unique images per batch U",
                 ylabel="ms / train step",
                 title=f"default model, B={u[0]['G'] * u[0]['K']} impressions")
  axes[0, 1].plot(xs, [p["peak_bytes"] / 2**20 for p in u], "o-",
                  label="total (XLA estimate)")
  axes[0, 1].plot(xs, [p["temp_bytes"] / 2**20 for p in u], "s--",
                  label="temporaries")
  axes[0, 1].set(xlabel="unique images per batch U",
                 ylabel="MiB per device", title="step memory vs U")
  for ax in axes[0]:
    ax.set_xticks([0, *xs])
  for key, label, style in (("rows_single", "1 device, whole table", "o-"),
                            ("rows_sharded", "rows sharded over 'model'",
                             "s--")):
    pts = result.get(key) or []
    if not pts:
      continue
    if key == "rows_sharded":
      label = f"{label} ({pts[0]['devices']} fake devices)"
    rs = [p["rows"] for p in pts]
    axes[1, 0].plot(rs, [p["step_s"] * 1e3 for p in pts], style, label=label)
    axes[1, 1].plot(rs, [p["peak_bytes"] / 2**20 for p in pts], style,
                    label=label)
  axes[1, 0].set(xscale="log", yscale="log", xlabel="item_id table rows",
                 ylabel="ms / train step",
                 title="ID part (no CNN), Adagrad tables")
  axes[1, 1].set(xscale="log", yscale="log", xlabel="item_id table rows",
                 ylabel="MiB per device", title="step memory vs table rows")
  for ax in axes[0]:  # linear axes from 0: cost linear in U is a line
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
  for ax in axes.flat:
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(f"csctr train step scaling ({result['machine']})", fontsize=10)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _table(points, key, label):
  print(f"\n{label:>10}{'ms/step':>10}{'MiB/device':>12}{'temp MiB':>10}"
        f"{'MFLOP/step':>12}")
  for p in points:
    print(f"{p[key]:>10}{p['step_s'] * 1e3:>10.1f}"
          f"{p['peak_bytes'] / 2**20:>12.1f}{p['temp_bytes'] / 2**20:>10.1f}"
          f"{p['flops'] / 1e6:>12.1f}")


def main(argv):
  del argv
  base = _CONFIG.value
  rows = [int(r) for r in _ROWS.value]
  if _WORKER.value:
    print("RESULT " + json.dumps(step_timing.rows_sweep(
        base, rows, _MODEL_DEVICES.value, **_timing())))
    return
  start = time.perf_counter()
  peak = step_timing.cpu_peak_flops()
  result = {"machine": f"{peak['cores']} CPU cores, {peak['isa']}",
            "load_average": [step_timing.load_average()]}
  print("unique images sweep:", flush=True)
  result["unique_images"] = unique_images_sweep(
      base, [int(u) for u in _UNIQUE.value])
  print("rows sweep, one device:", flush=True)
  result["rows_single"] = step_timing.rows_sweep(base, rows, 1, **_timing())
  if _MODEL_DEVICES.value > 1:
    print(f"rows sweep, sharded over {_MODEL_DEVICES.value} fake devices:",
          flush=True)
    result["rows_sharded"] = _sharded_rows_in_subprocess(
        rows, _MODEL_DEVICES.value)
  result["load_average"].append(step_timing.load_average())
  result["wall_s"] = time.perf_counter() - start
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(result, f, indent=1)
  if _PNG.value:
    plot(result, _PNG.value)
  print(json.dumps(result))
  _table(result["unique_images"], "U", "U")
  _table(result["rows_single"], "rows", "rows (1)")
  if result.get("rows_sharded"):
    _table(result["rows_sharded"], "rows",
           f"rows ({result['rows_sharded'][0]['devices']})")
  print(f"\nwall {result['wall_s']:.0f}s; load average "
        f"{result['load_average'][0]:.1f} -> {result['load_average'][1]:.1f}; "
        f"wrote {_PNG.value} {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
