r"""Throughput of the input pipeline alone (no model), at a config.

  python benchmarks/pipeline.py --config=configs/default.py
  python benchmarks/pipeline.py --config=configs/default.py \
      --config.data.num_behaviors=5 --config.data.unique_images=64

Prepares the dataset if it is not cached (timed), then measures, as medians
over --runs runs of --num_batches batches each:

* train: the train iterator as the trainer uses it (batches built in Grain's
  prefetch threads), pulled as fast as possible;
* train_sync: the same with read_threads=0, i.e. the CPU time one batch
  costs the process (what competes with XLA for the cores);
* eval: one full pass of eval_batches over the test split.

Prints one JSON line (for scripts) and a small table. The pipeline should
take a small fraction of a train step (tens of ms for the small CNN on CPU).
"""

import json
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from csctr.data import pipeline
from csctr.data import prepared
from csctr.data import registry

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file.",
    lock_config=False)
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs; medians are reported.")
_BATCHES = flags.DEFINE_integer("num_batches", 300, "Train batches per run.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed batches before a run.")


def _time_train(config, path, runs, num_batches, warmup):
  per_batch, impressions = [], []
  for run in range(runs):
    config.data.shuffle_seed = run  # a different stretch of data each run
    it = pipeline.train_iterator(config, path)
    for _ in range(warmup):
      next(it)
    real = 0.0
    start = time.perf_counter()
    for _ in range(num_batches):
      real += next(it)["weight"].sum()
    per_batch.append((time.perf_counter() - start) / num_batches)
    impressions.append(real / num_batches)
  return statistics.median(per_batch), statistics.median(impressions)


def _time_eval(config, path, runs):
  seconds, count = [], 0
  for _ in range(runs):
    start = time.perf_counter()
    count = sum(1 for _ in pipeline.eval_batches(config, path))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds), count


def main(argv):
  del argv
  config = _CONFIG.value
  start = time.perf_counter()
  cached = prepared.is_prepared(
      prepared.cache_path(
          pipeline.data_root(config), registry.dataset_key(config)))
  path = pipeline.prepare_dataset(config)
  prepare_s = time.perf_counter() - start
  info = pipeline.load_info(path)
  d = config.data
  slots = d.groups_per_batch * d.group_size
  train_s, train_imp = _time_train(config, path, _RUNS.value, _BATCHES.value,
                                   _WARMUP.value)
  threads = d.read_threads
  d.read_threads = 0
  sync_s, _ = _time_train(config, path, _RUNS.value, _BATCHES.value // 2,
                          _WARMUP.value // 2)
  d.read_threads = threads
  eval_s, eval_batches = _time_eval(config, path, _RUNS.value)
  overflow = pipeline.behavior_overflow(config, path)
  result = {
      "dataset": config.dataset, "path": path, "cached": cached,
      "prepare_s": round(prepare_s, 3),
      "G": d.groups_per_batch, "K": d.group_size, "U": d.unique_images,
      "L": d.num_behaviors, "image_size": d.image_size,
      "train_ms_per_batch": round(train_s * 1e3, 3),
      "train_batches_per_s": round(1 / train_s, 1),
      "train_impressions_per_s": round(train_imp / train_s),
      "train_slots_per_s": round(slots / train_s),
      "train_sync_ms_per_batch": round(sync_s * 1e3, 3),
      "eval_s_per_pass": round(eval_s, 3), "eval_batches": eval_batches,
      "eval_batches_per_s": round(eval_batches / eval_s, 1),
      "packing_efficiency": info.extras["packing_efficiency"],
      "behavior_dropped_fraction": overflow["dropped_fraction"],
      "runs": _RUNS.value, "num_batches": _BATCHES.value,
  }
  print(json.dumps(result))
  rows = [("train (prefetch threads)", f"{result['train_ms_per_batch']:.3f}",
           f"{result['train_batches_per_s']:.0f}",
           f"{result['train_impressions_per_s']:.0f}"),
          ("train (synchronous)", f"{result['train_sync_ms_per_batch']:.3f}",
           f"{1e3 / result['train_sync_ms_per_batch']:.0f}",
           f"{train_imp / sync_s:.0f}"),
          ("eval", f"{1e3 * eval_s / max(eval_batches, 1):.3f}",
           f"{result['eval_batches_per_s']:.0f}", "")]
  print(f"\n{'pipeline':<26}{'ms/batch':>10}{'batches/s':>11}{'impr/s':>10}")
  for row in rows:
    print(f"{row[0]:<26}{row[1]:>10}{row[2]:>11}{row[3]:>10}")
  print(f"(G={d.groups_per_batch} K={d.group_size} U={d.unique_images} "
        f"L={d.num_behaviors}, {d.image_size}px; medians of {_RUNS.value} "
        f"runs; packing efficiency {result['packing_efficiency']:.3f}; "
        f"prepare {prepare_s:.1f}s{' (cached)' if cached else ''})")


if __name__ == "__main__":
  app.run(main)
