r"""Training throughput of the default model vs group size K, and bf16 vs f32.

  python benchmarks/throughput.py
  python benchmarks/throughput.py --group_sizes=1,25 --dtypes=float32 --runs=3
  python benchmarks/throughput.py --config=configs/default.py:backbone=resnet18

Every point has the same B impressions per batch (--impressions, default 200)
and G = U = B / K unique images: K = 1 -> 200 images, K = 5 -> 40, K = 25 ->
8. The CNN runs once per unique image, so when it dominates the step,
impressions/s grows almost K-fold; the K=25 : K=1 ratio measures how much of
that the batch contract delivers (target: >= 10x on CPU for the default
model).

What is timed is the trainer's own jitted step (csctr.training.steps.build_steps) on
a random batch of the right shapes (csctr.data.batch.dummy_batch), already on
device: medians over --runs runs of ~--min_run_s seconds each, after
warm-up (benchmarks/step_timing.py). FLOPs per step come from XLA's cost
analysis of the compiled step; achieved FLOP/s is their ratio to the step
time, given as a fraction of the CPU's theoretical fp32 peak (formula in the
output: cores x GHz x FMA units x SIMD lanes x 2, read from /proc/cpuinfo)
and of one large measured XLA matmul. The machine is shared: the 1-minute
load average is printed with the results.

Prints one JSON line (for scripts) and a table; --json_out also writes it.
"""

from __future__ import annotations

import copy
import json

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from benchmarks import step_timing
from csctr.training import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file.",
    lock_config=False)
_GROUP_SIZES = flags.DEFINE_list("group_sizes", ["1", "5", "25"],
                                 "Group sizes K to compare.")
_IMPRESSIONS = flags.DEFINE_integer(
    "impressions", 200, "Impressions per batch B (divisible by every K).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"],
                            "config.model.dtype values to compare.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs; medians are reported.")
_MIN_RUN_S = flags.DEFINE_float("min_run_s", 1.0, "Seconds per timed run.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_FMA_UNITS = flags.DEFINE_integer(
    "fma_units", 2, "FMA units per core, for the theoretical peak.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the JSON here.")


def measure(base, k: int, impressions: int, dtype: str, **timing):
  """One point: config with group size k and dtype, timed."""
  if impressions % k:
    raise ValueError(f"impressions={impressions} is not divisible by K={k}")
  config = copy.deepcopy(base)
  g = impressions // k
  config.data.group_size = k
  config.data.groups_per_batch = config.data.unique_images = g
  config.model.dtype = dtype
  info = step_timing.data_info(config)
  mesh = mesh_lib.make_mesh(config)
  mesh_lib.check_batch_divides(config, mesh)
  r = step_timing.time_train_step(config, info, mesh, **timing)
  return {"K": k, "G": g, "U": g, "B": impressions, "dtype": dtype,
          "devices": mesh.size,
          "impressions_per_s": impressions / r["step_s"],
          "images_per_s": g / r["step_s"],
          "flop_per_s": r["flops"] / r["step_s"], **r}


def main(argv):
  del argv
  base = _CONFIG.value
  peak = step_timing.cpu_peak_flops(_FMA_UNITS.value)
  matmul = step_timing.matmul_flops()
  load_before = step_timing.load_average()
  points = []
  for dtype in _DTYPES.value:
    for k in (int(x) for x in _GROUP_SIZES.value):
      p = measure(base, k, _IMPRESSIONS.value, dtype, runs=_RUNS.value,
                  min_run_s=_MIN_RUN_S.value, warmup=_WARMUP.value)
      p["fraction_of_peak"] = p["flop_per_s"] / peak["peak_flops"]
      p["fraction_of_matmul"] = p["flop_per_s"] / matmul
      points.append(p)
      print(f"  {dtype} K={k}: {p['step_s'] * 1e3:.1f} ms/step", flush=True)

  def rate(dtype, k):
    return next((p["impressions_per_s"] for p in points
                 if p["dtype"] == dtype and p["K"] == k), None)

  ks = sorted(int(x) for x in _GROUP_SIZES.value)
  ratios = {d: rate(d, ks[-1]) / rate(d, ks[0]) for d in _DTYPES.value
            if len(ks) > 1}
  bf16 = {k: rate("bfloat16", k) / rate("float32", k) for k in ks
          if rate("bfloat16", k) and rate("float32", k)}
  result = {
      "model": {k: base.model[k] for k in ("backbone", "attention", "head")},
      "image_size": base.data.image_size, "points": points,
      f"ratio_K{ks[-1]}_vs_K{ks[0]}": ratios,
      "bf16_speedup_vs_f32": bf16, "peak": peak, "matmul_flop_per_s": matmul,
      "load_average": [load_before, step_timing.load_average()],
      "runs": _RUNS.value, "jax_backend": jax.default_backend()}
  line = json.dumps(result)
  print(line)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      f.write(line + "\n")

  print(f"\n{'dtype':<9}{'K':>3}{'G=U':>5}{'ms/step':>9}{'impr/s':>9}"
        f"{'images/s':>10}{'MFLOP/step':>12}{'GFLOP/s':>9}{'% peak':>8}"
        f"{'% matmul':>10}{'MiB':>7}")
  for p in points:
    print(f"{p['dtype']:<9}{p['K']:>3}{p['G']:>5}{p['step_s'] * 1e3:>9.1f}"
          f"{p['impressions_per_s']:>9.0f}{p['images_per_s']:>10.0f}"
          f"{p['flops'] / 1e6:>12.0f}{p['flop_per_s'] / 1e9:>9.1f}"
          f"{100 * p['fraction_of_peak']:>8.1f}"
          f"{100 * p['fraction_of_matmul']:>10.1f}"
          f"{p.get('peak_bytes', 0) / 2**20:>7.1f}")
  for d, r in ratios.items():
    print(f"{d}: impressions/s at K={ks[-1]} vs K={ks[0]}: {r:.1f}x")
  for k, s in bf16.items():
    print(f"K={k}: bfloat16 / float32 impressions/s: {s:.2f}")
  print(f"peak: {peak['formula']}; one {2048}^3 XLA matmul: "
        f"{matmul / 1e9:.0f} GFLOP/s; load average {load_before:.1f} -> "
        f"{result['load_average'][1]:.1f}; medians of {_RUNS.value} runs")


if __name__ == "__main__":
  app.run(main)
