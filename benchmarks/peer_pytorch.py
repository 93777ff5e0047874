r"""csctr's train step against the same model in PyTorch, eager and compiled.

  pip install -e ".[peer]"        # torch (CPU wheel) for this benchmark only
  python benchmarks/peer_pytorch.py
  python benchmarks/peer_pytorch.py --group_sizes=25 --runs=5 --min_run_s=2

One model for both frameworks (the shape of issue 16): the small CSCNN with
32-64-128 channels at 32 px, category channel and spatial attention after
every conv, a DCN head with an MLP of 256-128, B = --impressions (1000)
impressions per step, Adam (ID tables at config.optim.embed_lr: csctr's
row-sparse lazy Adam, torch's Adam on whole tables; the rest at
config.optim.lr), no clipping, no weight decay, constant rate.
The PyTorch twin (benchmarks/peer_model.py) has the same parameters: their
counts are printed and must be equal, and tests/test_peer_pytorch.py checks
that it computes the same logits from csctr's weights.

csctr is timed through its own jitted step (csctr's build_steps, the
function the trainer runs), PyTorch through loss.backward() + Adam.step(),
eager and under torch.compile (forward + loss compiled, AOTAutograd compiles
the backward; optimizer step compiled too). Every variant trains on one
random batch of the right shapes already in memory. After warm-up, the
variants take turns (--runs rounds, the order rotating each round), each
turn ~--min_run_s seconds of steps; medians of the turns are reported, so a
burst of load from other processes hits every variant alike. The 1-minute
load average is printed: this machine is shared.

Prints one JSON line (for scripts) and a table; --json_out also writes it.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

try:
  from benchmarks import peer_model  # pylint: disable=g-import-not-at-top
except ImportError as e:  # torch is the optional [peer] extra
  raise SystemExit(f"{e}: pip install -e '.[peer]' (PyTorch, CPU build)")
from benchmarks import step_timing

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file (the model shape "
    "below is set on top of it).", lock_config=False)
_GROUP_SIZES = flags.DEFINE_list("group_sizes", ["1", "25"],
                                 "Group sizes K to compare.")
_IMPRESSIONS = flags.DEFINE_integer("impressions", 1000,
                                    "Impressions per step B.")
_RUNS = flags.DEFINE_integer("runs", 5, "Interleaved rounds; medians reported.")
_MIN_RUN_S = flags.DEFINE_float("min_run_s", 2.0, "Seconds per timed turn.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compiling.")
_VARIANTS = flags.DEFINE_list("variants", ["csctr", "torch_eager",
                                           "torch_compile"],
                              "Which implementations to time.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the JSON here.")


def peer_config(base, k: int, impressions: int):
  """The issue-16 shape on top of `base`, with group size k."""
  if impressions % k:
    raise ValueError(f"impressions={impressions} is not divisible by K={k}")
  config = copy.deepcopy(base)
  config.model.backbone = "small"
  config.model.attention = "cscnn"
  config.model.head = "dcn"
  config.model.small_channels = (32, 64, 128)
  config.model.mlp_dims = (256, 128)
  config.model.dtype = "float32"
  o = config.optim
  # csctr's ID tables take row-sparse lazy Adam (csctr/model/embeddings.py),
  # the twin's torch Adam on whole tables: the tables are tiny at this shape.
  o.dense_optimizer, o.embed_optimizer = "adam", "lazy_adam"
  o.clip_norm, o.schedule, o.warmup_steps = 0.0, "constant", 0
  config.data.group_size = k
  config.data.groups_per_batch = config.data.unique_images = impressions // k
  return config


Runner = Callable[[int], float]  # n steps -> seconds


def timed_turn(runner: Runner, min_run_s: float, estimate: float) -> float:
  n = max(1, round(min_run_s / max(estimate, 1e-6)))
  return runner(n) / n


def measure_group_size(k: int, counts: dict[str, int]) -> list[dict[str, Any]]:
  """Interleaved timing turns of every variant at group size K.

  The variants take turns (rotating who goes first) so that a load change
  on the shared machine hits all of them alike; counts gets each variant's
  parameter count, which must agree (the twin is the same model).
  """
  config = peer_config(_CONFIG.value, k, _IMPRESSIONS.value)
  info = step_timing.data_info(config)
  runners, compile_s = {}, {}
  for v in _VARIANTS.value:
    start = time.perf_counter()
    if v == "csctr":
      runner, n_params = step_timing.step_runner(config, info)
    else:
      runner, n_params = peer_model.step_runner(
          config, info, compiled=(v == "torch_compile"))
    counts[v] = n_params
    for _ in range(max(_WARMUP.value, 1)):
      runner(1)
    compile_s[v] = time.perf_counter() - start
    runners[v] = runner
  if len(set(counts.values())) != 1:
    raise AssertionError(f"parameter counts differ: {counts}")
  estimate = {v: runners[v](1) for v in runners}
  turns = {v: [] for v in runners}
  order = list(runners)
  for r in range(_RUNS.value):
    for v in order[r % len(order):] + order[:r % len(order)]:
      turns[v].append(timed_turn(runners[v], _MIN_RUN_S.value, estimate[v]))
  points = []
  for v in runners:
    step_s = statistics.median(turns[v])
    points.append({"K": k, "variant": v, "step_s": step_s,
                   "step_s_runs": turns[v],
                   "impressions_per_s": _IMPRESSIONS.value / step_s,
                   "setup_s": compile_s[v]})
    print(f"  K={k} {v}: {step_s * 1e3:.1f} ms/step", flush=True)
  return points


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  load_before = step_timing.load_average()
  ks = [int(x) for x in _GROUP_SIZES.value]
  points, counts = [], {}
  for k in ks:
    points += measure_group_size(k, counts)

  def rate(k, v):
    return next((p["impressions_per_s"] for p in points
                 if p["K"] == k and p["variant"] == v), None)

  ratios = {f"csctr_vs_{v}": {k: rate(k, "csctr") / rate(k, v) for k in ks}
            for v in _VARIANTS.value if v != "csctr" and rate(ks[0], "csctr")}
  result = {"points": points, "ratios": ratios, "param_counts": counts,
            "impressions": _IMPRESSIONS.value, "runs": _RUNS.value,
            "load_average": [load_before, step_timing.load_average()],
            "jax": jax.__version__, "torch": torch.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "torch_threads": torch.get_num_threads()}
  print(json.dumps(result))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      f.write(json.dumps(result) + "\n")
  print_table(result, rate)


def print_table(result: dict[str, Any], rate) -> None:
  """The human-readable table under the JSON line."""
  print("\nparameter counts: " + ", ".join(
      f"{v} {n:,}" for v, n in result["param_counts"].items()))
  print(f"\n{'K':>3} {'variant':<15}{'ms/step':>9}{'impr/s':>9}"
        f"{'csctr x':>9}{'setup s':>9}")
  for p in result["points"]:
    x = rate(p["K"], "csctr") / p["impressions_per_s"] if rate(
        p["K"], "csctr") else float("nan")
    print(f"{p['K']:>3} {p['variant']:<15}{p['step_s'] * 1e3:>9.1f}"
          f"{p['impressions_per_s']:>9.0f}{x:>9.2f}{p['setup_s']:>9.1f}")
  load_before, load_after = result["load_average"]
  print(f"csctr x = csctr impressions/s / this row's; medians of "
        f"{result['runs']} interleaved turns; load average "
        f"{load_before:.1f} -> {load_after:.1f} on "
        f"{len(os.sched_getaffinity(0))} cores (shared machine)")


if __name__ == "__main__":
  app.run(main)
