r"""Prepare throughput and peak memory: in-process vs Beam's local runner.

  python benchmarks/prepare.py [--sizes=1000000,10000000]
      [--modes=inprocess,beam1,beam2] [--workdir=/tmp/csctr_prepare_bench]

Writes a seeded synthetic BYOD log per size (long-tail items: Zipf 1.1 over
--items items with small PNG images, uniform users, increasing timestamps,
one extra column) as impressions.parquet in row groups of 2^20 rows, then
prepares it once per mode, each in a fresh subprocess:

  inprocess  csctr.data.prepare (python -m csctr.prepare --runner=inprocess)
  beam1      Beam DirectRunner, one worker (in-memory FnApiRunner)
  beam2      Beam DirectRunner, --direct_num_workers=2 multi_processing

Peak memory is the largest sum of RSS over the subprocess and its children
(sampled every 0.2 s). Prints one JSON line {"results": [...]} and a table.
The machine may be shared: figures are single runs unless --repeats > 1
(then medians).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODES = {
    "inprocess": ["--runner=inprocess"],
    "beam1": ["--runner=DirectRunner",
              "--pipeline_options=--direct_num_workers=1"],
    "beam2": ["--runner=DirectRunner",
              "--pipeline_options=--direct_num_workers=2 "
              "--direct_running_mode=multi_processing"],
}


def write_log(root: str, num_impressions: int, num_items: int,
              num_users: int, seed: int = 0, row_group: int = 1 << 20) -> str:
  """A seeded BYOD directory: items.csv, PNG images, impressions.parquet."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  done = os.path.join(root, "impressions.parquet")
  if os.path.exists(done):
    return root
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "img"), exist_ok=True)
  with open(os.path.join(root, "items.csv"), "w") as f:
    f.write("item_id,category_id,image\n")
    for i in range(num_items):
      path = os.path.join("img", f"{i}.png")
      color = tuple(int(c) for c in rng.integers(0, 256, 3))
      Image.new("RGB", (8, 8), color).save(os.path.join(root, path))
      f.write(f"i{i},c{i % 17},{path}\n")
  weights = 1.0 / np.arange(1, num_items + 1) ** 1.1
  cdf = np.cumsum(weights / weights.sum())
  devices = np.array(["mobile", "desktop", "tablet", "tv"])
  schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                      ("label", pa.int8()), ("timestamp", pa.int64()),
                      ("device", pa.string())])
  tmp = done + ".tmp"
  with pq.ParquetWriter(tmp, schema) as writer:
    for start in range(0, num_impressions, row_group):
      n = min(row_group, num_impressions - start)
      items = np.minimum(np.searchsorted(cdf, rng.random(n)), num_items - 1)
      users = rng.integers(0, num_users, n)
      writer.write_table(pa.table({
          "user_id": np.char.add("u", users.astype(str)),
          "item_id": np.char.add("i", items.astype(str)),
          "label": (rng.random(n) < 0.1).astype(np.int8),
          "timestamp": 1_700_000_000 + start + np.arange(n),
          "device": devices[rng.integers(0, 4, n)],
      }, schema=schema), row_group_size=row_group)
  os.rename(tmp, done)
  return root


def _tree_rss(proc) -> int:
  total = 0
  for p in [proc, *proc.children(recursive=True)]:
    try:
      total += p.memory_info().rss
    except Exception:  # pylint: disable=broad-except  # exited meanwhile
      pass
  return total


def run_one(mode: str, log: str, data_dir: str) -> dict[str, float]:
  """Prepares `log` in a subprocess; wall seconds and peak tree RSS."""
  import psutil  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, "-m", "csctr.prepare",
         "--config=" + os.path.join(ROOT, "configs", "byod.py"),
         "--config.byod_path=" + log, "--config.data_dir=" + data_dir,
         "--config.data.image_size=8", "--config.data.num_behaviors=0",
         # The Beam path packs with a fixed K and no validation split; so does
         # every mode here.
         "--config.data.batching=fixed", "--config.data.group_size=25",
         "--config.data.validation_fraction=0",
         *MODES[mode]]
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep +
         os.environ.get("PYTHONPATH", "")}
  start = time.time()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  ps, peak = psutil.Process(proc.pid), 0
  while proc.poll() is None:
    peak = max(peak, _tree_rss(ps))
    time.sleep(0.2)
  seconds = time.time() - start
  out = proc.stdout.read()
  if proc.returncode:
    raise RuntimeError(f"{mode} failed:\n{out[-4000:]}")
  return {"seconds": seconds, "peak_mb": peak / 2**20}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="1000000,10000000")
  parser.add_argument("--modes", default="inprocess,beam1,beam2")
  parser.add_argument("--items", type=int, default=20000)
  parser.add_argument("--users", type=int, default=1000000)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--workdir", default="/tmp/csctr_prepare_bench")
  args = parser.parse_args()
  results = []
  for size in (int(s) for s in args.sizes.split(",")):
    log = write_log(os.path.join(args.workdir, f"log-{size}"), size,
                    args.items, args.users)
    for mode in args.modes.split(","):
      runs = []
      for r in range(args.repeats):
        data_dir = os.path.join(args.workdir, f"out-{size}-{mode}-{r}")
        subprocess.run(["rm", "-rf", data_dir], check=True)
        runs.append(run_one(mode, log, data_dir))
        subprocess.run(["rm", "-rf", data_dir], check=True)
      seconds = statistics.median(x["seconds"] for x in runs)
      results.append({
          "impressions": size, "mode": mode, "seconds": round(seconds, 1),
          "impressions_per_s": round(size / seconds),
          "peak_mb": round(statistics.median(x["peak_mb"] for x in runs)),
          "repeats": args.repeats})
      print(json.dumps(results[-1]), file=sys.stderr, flush=True)
  print(json.dumps({"results": results}))
  print(f"{'impressions':>12} {'mode':>10} {'seconds':>9} {'impr/s':>9} "
        f"{'peak MB':>8}")
  for r in results:
    print(f"{r['impressions']:>12} {r['mode']:>10} {r['seconds']:>9} "
          f"{r['impressions_per_s']:>9} {r['peak_mb']:>8}")


if __name__ == "__main__":
  main()
