r"""Load test of the HTTP scorer (python -m csctr.serve) over loopback.

  python benchmarks/serving_load.py                         # default model
  python benchmarks/serving_load.py --workdir=/tmp/csctr_default
  python benchmarks/serving_load.py --rates=500,1000,2000 --seconds=10 \
      --plot=docs/serving_load.png

Starts the server in a subprocess on a free 127.0.0.1 port, then drives it
with a real HTTP client (benchmarks/http_client.py: keep-alive connections,
httptools parsing, on uvloop; lean so that the server, not the client, gets
the cores it shares with it) at increasing
open-loop request rates: request i of a rate R is sent at t0 + i/R whether
or not earlier ones have returned, and its latency counts from that planned
time (so a client or server that falls behind shows in the latency instead
of hiding it). Each rate runs --seconds (at most R * --seconds requests),
then waits at most --drain_s for stragglers; a non-200 answer, a timeout or
a connection error is an error. Every request has --candidates candidates
(users, items and positions drawn at random from the dataset; items from
the embedding table, so no fallback) and is pre-encoded, so the client
spends its CPU on HTTP, not JSON.

Without --workdir the model is configs/default.py trained for --train_steps
steps in --cache_dir (kept and reused): latency does not depend on how
well it is trained. Prints one JSON line {"results": [{"target_rps",
"achieved_rps", "p50_ms", "p99_ms", "errors"}, ...], ...} and a table; with
--plot, a PNG of the load curve. The client shares the machine with the
server (and, on the development machine, with other jobs): the load average
is reported with the results.
"""

import asyncio
import hashlib
import json
import os
import subprocess
import time

from absl import app
from absl import flags
import numpy as np

from benchmarks import http_client


_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (optional).")
_CACHE = flags.DEFINE_string("cache_dir", "/tmp/csctr_serving_load",
                             "Where the default model is trained once.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 20,
                                    "Steps of the default model.")
_RATES = flags.DEFINE_list("rates", ["250", "500", "1000", "1500", "2000"],
                           "Open-loop request rates (requests/s).")
_SECONDS = flags.DEFINE_float("seconds", 6.0, "Duration of each rate.")
_DRAIN = flags.DEFINE_float("drain_s", 5.0, "Wait for stragglers, at most.")
_CANDIDATES = flags.DEFINE_integer("candidates", 200, "Candidates/request.")
_CONNECTIONS = flags.DEFINE_integer("connections", 64,
                                    "Keep-alive connections, at most.")
_TIMEOUT = flags.DEFINE_float("timeout_s", 2.0, "Per-request timeout.")
_PLOT = flags.DEFINE_string("plot", None, "Write the load curve PNG here.")
_SERVER_FLAGS = flags.DEFINE_list("server_flags", [],
                                  "Extra flags for python -m csctr.serve.")


def _default_workdir() -> str:
  """configs/default.py trained briefly, with its table (cached)."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from csctr.serving import export  # pylint: disable=g-import-not-at-top
  from csctr.training import loop  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.num_train_steps = _TRAIN_STEPS.value
  config.eval_every = 0
  config.checkpoint_every = 0
  # Keyed by the config: a run cached by an older csctr (other fields) is
  # not served by a newer one.
  key = hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()
  workdir = os.path.join(_CACHE.value, f"run-{key[:12]}")
  if not os.path.exists(os.path.join(workdir, export.TABLES_DIR)):
    loop.train_and_evaluate(config, workdir)
    export.export(workdir, progress=False)
  return workdir


def _bodies(workdir: str, n: int, count: int = 512) -> list[bytes]:
  """Pre-encoded requests: random users, table items, positions."""
  from csctr import rundir  # pylint: disable=g-import-not-at-top
  from csctr.data import prepared  # pylint: disable=g-import-not-at-top
  _, info, data_path = rundir.load_run_files(workdir)
  categories = np.load(os.path.join(data_path, prepared.CATEGORY_FILE))
  vocab = dict(zip(info.sparse_features, info.vocab_sizes))
  rng = np.random.default_rng(0)
  bodies = []
  for _ in range(count):
    items = rng.integers(0, len(categories), n)
    cands = {"item_id": [str(i) for i in items],
             "category_id": [str(c) for c in categories[items]]}
    for name in info.sparse_features:
      if name not in ("user_id", "item_id", "category_id"):
        cands[name] = [str(v) for v in rng.integers(0, vocab[name], n)]
    bodies.append(json.dumps({
        "user": {"user_id": str(rng.integers(0, vocab["user_id"]))},
        "candidates": cands}).encode())
  return bodies


async def _drive(url: str, bodies: list[bytes], rate: float
                 ) -> dict[str, float]:
  """Open-loop: request i leaves at t0 + i / rate; latency from that time."""
  host, port = url.split("//")[1].split("/")[0].split(":")
  client = http_client.Client(host, int(port), "/v1/score",
                              _CONNECTIONS.value, _TIMEOUT.value)
  requests = [client.encode(b) for b in bodies]
  count = int(rate * _SECONDS.value)
  latencies, errors = [], 0
  for request in requests[:32]:  # open connections, warm the server
    await client.post(request)

  async def one(i: int, planned: float) -> None:
    nonlocal errors
    try:
      status, _ = await client.post(requests[i % len(requests)])
      ok = status == 200
    except (OSError, asyncio.TimeoutError):
      ok = False
    if ok:
      latencies.append(time.perf_counter() - planned)
    else:
      errors += 1

  tasks = []
  t0 = time.perf_counter()
  for i in range(count):
    planned = t0 + i / rate
    delay = planned - time.perf_counter()
    if delay > 0:
      await asyncio.sleep(delay)
    tasks.append(asyncio.create_task(one(i, planned)))
  _, pending = await asyncio.wait(tasks, timeout=_DRAIN.value)
  for task in pending:
    task.cancel()
  elapsed = time.perf_counter() - t0
  client.close()
  lat = np.asarray(latencies) * 1e3
  return {"target_rps": rate,
          "achieved_rps": round(len(latencies) / elapsed, 1),
          "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else
                    None,
          "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else
                    None,
          "errors": errors + len(pending), "requests": count}


def _run_loop(coroutine):
  try:
    import uvloop  # pylint: disable=g-import-not-at-top
    return uvloop.run(coroutine)
  except ImportError:  # optional (not on Windows)
    return asyncio.run(coroutine)


def _cpu_seconds(pid: int) -> float:
  """User + system CPU time of a process, all its threads (Linux)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _plot(results: list[dict], path: str, note: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  x = [r["target_rps"] for r in results]
  a.plot(x, [r["achieved_rps"] for r in results], "o-", label="achieved")
  a.plot(x, x, "k:", label="target")
  a.set_xlabel("target requests/s")
  a.set_ylabel("requests/s")
  a.legend()
  for key in ("p50_ms", "p99_ms"):
    b.plot(x, [r[key] for r in results], "o-", label=key[:3])
  b.axhline(20, color="r", ls=":", label="p99 target 20 ms")
  b.set_yscale("log")
  b.set_xlabel("target requests/s")
  b.set_ylabel("latency (ms)")
  b.legend()
  fig.suptitle(f"csctr.serve, {_CANDIDATES.value} candidates/request, "
               f"loopback; {note}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  workdir = _WORKDIR.value or _default_workdir()
  bodies = _bodies(workdir, _CANDIDATES.value)
  from csctr.serving import server  # pylint: disable=g-import-not-at-top
  proc, base = server.spawn(workdir, "--watch_interval_s=0",
                            *_SERVER_FLAGS.value, stderr=subprocess.DEVNULL)
  results, loads = [], []
  try:
    for rate in (float(r) for r in _RATES.value):
      server_cpu, client_cpu = _cpu_seconds(proc.pid), time.process_time()
      result = _run_loop(_drive(base + "/v1/score", bodies, rate))
      # CPU per answered request: what the load would cost on idle cores.
      done = max(result["requests"] - result["errors"], 1)
      result["server_cpu_ms"] = round(
          1e3 * (_cpu_seconds(proc.pid) - server_cpu) / done, 3)
      result["client_cpu_ms"] = round(
          1e3 * (time.process_time() - client_cpu) / done, 3)
      results.append(result)
      loads.append(round(os.getloadavg()[0], 2))
  finally:
    proc.terminate()
    proc.wait(timeout=30)
  print(json.dumps({"results": results, "load_avg_1min": loads,
                    "candidates": _CANDIDATES.value, "cpus": os.cpu_count(),
                    "workdir": workdir}))
  print(f"\n{'target':>8} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'errors':>7} {'srv cpu ms':>10} {'cli cpu ms':>10} {'load':>5}")
  for r, load in zip(results, loads):
    print(f"{r['target_rps']:8.0f} {r['achieved_rps']:9.1f} "
          f"{r['p50_ms'] or float('nan'):8.2f} "
          f"{r['p99_ms'] or float('nan'):8.2f} {r['errors']:7d} "
          f"{r['server_cpu_ms']:10.3f} {r['client_cpu_ms']:10.3f} "
          f"{load:5.1f}")
  if _PLOT.value:
    _plot(results, _PLOT.value, f"{os.cpu_count()} shared cores, load "
          f"{min(loads)}-{max(loads)}")


if __name__ == "__main__":
  app.run(main)
