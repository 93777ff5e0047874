r"""Serving latency of csctr.serving.Scorer: one request at a time, on CPU.

  python benchmarks/serving.py                       # configs/default.py model
  python benchmarks/serving.py --workdir=/tmp/csctr_default   # a trained run
  python benchmarks/serving.py --config=configs/default.py \
      --config.data.num_behaviors=5 --config.model.behavior_pooling=attentive

Without --workdir the model is the config's, freshly initialised (latency
does not depend on trained values), and its table is exported from the
config's prepared dataset into a temporary directory. With --workdir the
run's latest checkpoint and its exported table are used (exported first if
missing).

For every N in --candidates, --runs runs of --num_requests requests (after
--warmup untimed ones), each request a different user and N candidate ads
drawn from the table (a --miss_rate fraction of ids absent from it). Each
request is timed alone with time.perf_counter around Scorer.score (request
parsing, table gather, padding, the jitted head, the copy back). Prints one
JSON line, then a table of the medians over runs of p50/p95/p99 latency and
requests/s, and, to tell work from waiting on a shared machine, the p99 of
each request's CPU time (all threads of the process), the share of requests
preempted (a thread involuntarily switched out meanwhile) and the p99 of the
others.

By default (--configure_cpu_serving) JAX's CPU client runs computations
inline in the caller's thread and Eigen kernels single-threaded, as
csctr.serving.configure_cpu_serving() sets up a serving process; both are
read when JAX creates its CPU client, so main() calls it before anything
else touches JAX. --noconfigure_cpu_serving measures JAX's defaults.
--pace_qps > 0 spaces request starts (an open-loop arrival rate) instead of
sending them back to back.
"""

import atexit
import json
import os
import resource
import shutil
import statistics
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

import jax
from flax import nnx
from csctr.serving import export as export_lib
from csctr.data import pipeline
from csctr.model import ctr
from csctr import serving
from csctr import rundir

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Model config (without --workdir).",
    lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (optional).")
_CANDIDATES = flags.DEFINE_list("candidates", ["1", "64", "200", "1024"],
                                "Candidate counts N.")
_BUCKETS = flags.DEFINE_list("buckets", ["16", "64", "256", "1024"],
                             "Compiled candidate buckets.")
_RUNS = flags.DEFINE_integer("runs", 5, "Timed runs; medians are reported.")
_REQUESTS = flags.DEFINE_integer("num_requests", 2000, "Requests per run.")
_WARMUP = flags.DEFINE_integer("warmup", 200, "Untimed requests per N.")
_MISS = flags.DEFINE_float("miss_rate", 0.0,
                           "Fraction of candidate ids not in the table.")
_FALLBACK = flags.DEFINE_enum("fallback", "category_mean",
                              serving.FALLBACKS, "Miss fallback.")
_CPU_SERVING = flags.DEFINE_bool(
    "configure_cpu_serving", True, "Inline dispatch, one XLA thread (see "
    "serving.configure_cpu_serving); false: JAX's defaults.")
_PACE = flags.DEFINE_float("pace_qps", 0.0,
                           "Request starts per second (0: back to back).")
_SEED = flags.DEFINE_integer("seed", 0, "Request sampling seed.")


def _scorer(config_: serving.ServingConfig) -> serving.Scorer:
  if _WORKDIR.value:
    model, run_config, info, step = rundir.restore_model(_WORKDIR.value)
    path = os.path.join(_WORKDIR.value, export_lib.TABLES_DIR, str(step))
    if not os.path.exists(path):
      export_lib.export(_WORKDIR.value, progress=False)
    return serving.Scorer(model, run_config.model, info,
                          export_lib.EmbeddingTable(path), config_, step)
  config = _CONFIG.value
  data_path = pipeline.prepare_dataset(config)
  info = pipeline.load_info(data_path)
  model = ctr.build_model(config.model, info, nnx.Rngs(config.seed))
  table = None
  if model.use_image:
    tmp = tempfile.mkdtemp(prefix="csctr_serving_bench_")
    atexit.register(shutil.rmtree, tmp, True)  # the table is a throwaway
    path = os.path.join(tmp, "table")
    export_lib.write_table(
        path, model, export_lib.load_images(data_path),
        num_categories=info.num_categories, progress=False,
        meta={"step": 0, "config_hash": export_lib.config_hash(
            config.model, info), "encoder_hash": export_lib.encoder_hash(model)})
    table = export_lib.EmbeddingTable(path)
  return serving.Scorer(model, config.model, info, table, config_, 0)


def _requests(scorer: serving.Scorer, n: int, count: int,
              rng: np.random.Generator) -> list[dict]:
  info = scorer.info
  ids = scorer.table.ids if scorer.table is not None else np.arange(1)
  out = []
  for _ in range(count):
    cands = {name: rng.integers(0, v, n) for name, v in
             zip(info.sparse_features, info.vocab_sizes) if name != "user_id"}
    image_id = rng.choice(ids, n)
    miss = rng.random(n) < _MISS.value
    image_id[miss] = ids.max() + 1 + rng.integers(0, 1 << 20, miss.sum())
    cands["image_id"] = image_id
    if info.num_dense:
      cands["dense"] = rng.normal(size=(n, info.num_dense)).astype(np.float32)
    req = {"user": {"user_id": int(rng.integers(0, info.vocab_sizes[0]))},
           "candidates": cands}
    if info.num_behaviors:
      req["behavior_ids"] = rng.choice(ids, info.num_behaviors)
    out.append(req)
  return out


def _run(scorer, requests, num_requests, pace_qps):
  """Times requests one at a time; also their CPU time and preemptions.

  On a shared machine the wall-clock tail is mostly time spent waiting for
  a core: a request during which a thread of the process was involuntarily
  switched out (getrusage ru_nivcsw) counts as preempted, and the process
  CPU time (all threads) tells the work a request did from the wait it
  suffered.
  """
  lat, cpu = np.empty(num_requests), np.empty(num_requests)
  preempted = np.zeros(num_requests, bool)
  gap = 1.0 / pace_qps if pace_qps > 0 else 0.0
  who = resource.RUSAGE_SELF  # any thread: XLA may use its pool
  start = time.perf_counter()
  for i in range(num_requests):
    if gap:
      while time.perf_counter() < start + i * gap:
        time.sleep(max(0.0, start + i * gap - time.perf_counter()) * 0.9)
    switches = resource.getrusage(who).ru_nivcsw
    c0 = time.process_time()
    t0 = time.perf_counter()
    scorer.score(requests[i % len(requests)])
    lat[i] = time.perf_counter() - t0
    cpu[i] = time.process_time() - c0
    preempted[i] = resource.getrusage(who).ru_nivcsw != switches
  total = time.perf_counter() - start
  p50, p95, p99 = np.percentile(lat, [50, 95, 99]) * 1e3
  calm = lat[~preempted] if (~preempted).any() else lat
  return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
          "mean_ms": lat.mean() * 1e3, "max_ms": lat.max() * 1e3,
          "requests_per_s": num_requests / total,
          "cpu_p99_ms": np.percentile(cpu, 99) * 1e3,
          "preempted_pct": 100 * preempted.mean(),
          "unpreempted_p99_ms": np.percentile(calm, 99) * 1e3}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CPU_SERVING.value:
    assert serving.configure_cpu_serving(), "JAX started before main()"
  logging.set_verbosity(logging.WARNING)
  serving_config = serving.ServingConfig(
      buckets=tuple(int(b) for b in _BUCKETS.value), fallback=_FALLBACK.value)
  start = time.perf_counter()
  scorer = _scorer(serving_config)
  build_s = time.perf_counter() - start
  rng = np.random.default_rng(_SEED.value)
  results = {}
  for n in (int(c) for c in _CANDIDATES.value):
    requests = _requests(scorer, n, 64, rng)
    for i in range(_WARMUP.value):
      scorer.score(requests[i % len(requests)])
    runs = [_run(scorer, requests, _REQUESTS.value, _PACE.value)
            for _ in range(_RUNS.value)]
    results[n] = {k: round(statistics.median(r[k] for r in runs), 4)
                  for k in runs[0]}
    results[n]["bucket"] = scorer.bucket(min(n, serving_config.buckets[-1]))
  record = {
      "benchmark": "serving", "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
      "configure_cpu_serving": _CPU_SERVING.value,
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "pace_qps": _PACE.value,
      "miss_rate": _MISS.value, "runs": _RUNS.value,
      "requests_per_run": _REQUESTS.value, "scorer_build_s": round(build_s, 2),
      "table_rows": len(scorer.table) if scorer.table is not None else 0,
      "stats": scorer.stats,
      "results": {str(n): r for n, r in results.items()}}
  print(json.dumps(record))
  print(f"\n{'N':>5} {'bucket':>6} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
        f"{'req/s':>7} {'cand/s':>9} | {'cpu p99':>7} {'preempt%':>8} "
        f"{'p99 unpreempted':>15}")
  for n, r in results.items():
    print(f"{n:>5} {r['bucket']:>6} {r['p50_ms']:>7.3f} {r['p95_ms']:>7.3f} "
          f"{r['p99_ms']:>7.3f} {r['requests_per_s']:>7.0f} "
          f"{r['requests_per_s'] * n:>9.0f} | {r['cpu_p99_ms']:>7.3f} "
          f"{r['preempted_pct']:>8.2f} {r['unpreempted_p99_ms']:>15.3f}")


if __name__ == "__main__":
  app.run(main)
