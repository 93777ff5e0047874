"""Timing the trainer's own train step on synthetic batches (shared by benchmarks).

Used by benchmarks/throughput.py and benchmarks/scaling.py. The step is
`csctr.training.steps.build_steps(...).train_step`, the function the training loop
runs, never a copy; batches come from `csctr.data.batch.dummy_batch`, random but
of the exact shapes of a config, so the numbers measure the step alone (no
input pipeline, no host transfers: the batch is placed on device once).

Step time is the median of `runs` timed runs of `steps` steps each, after
warm-up, each run ended by block_until_ready. FLOPs per step are XLA's cost
analysis of the compiled step (a fused multiply-add counts 2); memory is
XLA's static buffer assignment (arguments + outputs - donated aliases +
temporaries), per device.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from csctr.data import batch as batch_lib
from csctr.data import pipeline
from csctr.data import registry
from csctr.training import mesh as mesh_lib
from csctr.training import steps as steps_lib


def data_info(config: ml_collections.ConfigDict) -> batch_lib.DataInfo:
  """The DataInfo of config's dataset, without preparing it when cheap.

  The synthetic generator knows its vocabularies up front (about 0.5 s), so
  a benchmark need not write the 200k-impression dataset to disk.
  """
  dataset = registry.get(config.dataset)
  if dataset.cheap_source:
    source = dataset.make_source(config)
    return batch_lib.DataInfo(
        sparse_features=tuple(source.sparse_features),
        vocab_sizes=tuple(source.vocab_sizes), num_dense=source.num_dense,
        num_categories=source.num_categories, image_size=source.image_size,
        num_behaviors=source.num_behaviors)
  return pipeline.load_info(pipeline.prepare_dataset(config))


def init_state(steps: steps_lib.Steps) -> steps_lib.State:
  """The train state, created in its shards, as the trainer creates it.

  steps_lib.init_state picks the XLA optimisation level by state size (huge
  tables are drawn row by row, and that loop wants optimised code).
  """
  return steps_lib.init_state(steps.init_fn, steps.shardings)


def memory_bytes(compiled: Any) -> dict[str, int]:
  """XLA's static memory estimate of a compiled program, per device."""
  m = compiled.memory_analysis()
  if m is None:  # not every backend reports it
    return {}
  total = (m.argument_size_in_bytes + m.output_size_in_bytes
           - m.alias_size_in_bytes + m.temp_size_in_bytes)
  return {"argument_bytes": int(m.argument_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes),
          "peak_bytes": int(total)}


def cost(compiled: Any) -> dict[str, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
    analysis = analysis[0]
  return {"flops": float(analysis.get("flops", float("nan"))),
          "bytes_accessed": float(analysis.get("bytes accessed", float("nan")))}


def timing_batch(config: ml_collections.ConfigDict, info: batch_lib.DataInfo,
                 steps: steps_lib.Steps, seed: int = 0) -> dict[str, jax.Array]:
  """A dummy batch of config's shapes, on device, every slot a real impression.

  dummy_batch pads the last group; the step costs the same either way, and
  throughput then counts all B slots.
  """
  d = config.data
  local = batch_lib.dummy_batch(info, d.groups_per_batch, d.group_size,
                                d.unique_images, seed=seed)
  local["weight"] = np.ones_like(local["weight"])
  return mesh_lib.global_batch(local, steps.data_sharding)


def time_train_step(config: ml_collections.ConfigDict,
                    info: batch_lib.DataInfo, mesh: jax.sharding.Mesh, *,
                    runs: int = 5, min_run_s: float = 1.0, warmup: int = 3,
                    state: steps_lib.State | None = None,
                    steps: steps_lib.Steps | None = None) -> dict[str, Any]:
  """Median seconds per train step of `config` on `mesh`, FLOPs and memory.

  Each timed run does as many steps as fill about `min_run_s` (at least
  one), estimated from the warm-up, so fast and slow configs get equally
  stable medians. `state` (consumed: the step donates it) and `steps` may be
  passed to reuse them across batch shapes; the state must be the one
  `steps` builds.
  """
  steps = steps or steps_lib.build_steps(config, info, mesh)
  if state is None:
    state = init_state(steps)
  batch = timing_batch(config, info, steps)

  start = time.perf_counter()
  compiled = steps.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  start = time.perf_counter()
  for _ in range(max(warmup, 1)):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  estimate = (time.perf_counter() - start) / max(warmup, 1)
  per_run = max(1, math.ceil(min_run_s / max(estimate, 1e-6)))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    for _ in range(per_run):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - start) / per_run)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite loss {loss} while timing")
  return {"step_s": statistics.median(times), "step_s_runs": times,
          "steps_per_run": per_run, "compile_s": compile_s,
          **cost(compiled), **memory_bytes(compiled)}


def step_runner(config: ml_collections.ConfigDict, info: batch_lib.DataInfo,
                compiler_options: dict[str, Any] | None = None
                ) -> tuple[Callable[[int], float], int]:
  """(n -> seconds for n train steps, parameter count), for interleaved timing.

  The trainer's own compiled step (steps_lib.build_steps) on timing_batch,
  its state carried from call to call; each call ends with
  block_until_ready, so its seconds are the steps' own. Lets a benchmark
  alternate between implementations (benchmarks/peer_pytorch.py);
  compiler_options (XLA debug options, e.g. {'xla_cpu_use_xnnpack': True})
  compare compilations of one step in one process.
  """
  mesh = mesh_lib.make_mesh(config)
  steps = steps_lib.build_steps(config, info, mesh)
  holder = {"state": init_state(steps)}
  batch = timing_batch(config, info, steps)
  compiled = steps.train_step.lower(holder["state"], batch).compile(
      compiler_options)
  n_params = sum(x.size for x in jax.tree.leaves(holder["state"]["params"]))

  def run(n: int) -> float:
    state = holder["state"]
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    holder["state"] = state
    if not np.isfinite(float(metrics["loss"])):
      raise FloatingPointError("non-finite loss while timing")
    return elapsed

  return run, n_params


def _cpuinfo() -> tuple[set[str], float]:
  flags, mhz = set(), 0.0
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags":
          flags = set(value.split())
        elif key == "cpu MHz":
          mhz = max(mhz, float(value))
  except OSError:
    pass
  return flags, mhz


def cpu_peak_flops(fma_units: int = 2) -> dict[str, Any]:
  """Theoretical fp32 peak of the cores this process may use.

  peak = cores x GHz x FLOPs/cycle/core, with FLOPs/cycle = FMA units x fp32
  SIMD lanes (16 with AVX-512, 8 with AVX2, 4 with SSE) x 2 (an FMA is a
  multiply and an add). Cores: os.sched_getaffinity; GHz: the 'cpu MHz' of
  /proc/cpuinfo (the nominal clock under a hypervisor: turbo is invisible);
  FMA units per core are not in /proc/cpuinfo: 2 by default (Intel Xeon
  Gold/Platinum, AMD Zen 4/5), 1 for parts with a single 512-bit unit.
  """
  flags, mhz = _cpuinfo()
  cores = len(os.sched_getaffinity(0))
  if "avx512f" in flags:
    isa, lanes = "avx512f", 16
  elif "avx2" in flags or "avx" in flags:
    isa, lanes = "avx2" if "avx2" in flags else "avx", 8
  else:
    isa, lanes = "sse", 4
  per_fma = 2 if ("fma" in flags or "avx512f" in flags) else 1
  per_cycle = fma_units * lanes * per_fma
  peak = cores * mhz * 1e6 * per_cycle
  return {"cores": cores, "ghz": mhz / 1e3, "isa": isa,
          "fma_units": fma_units, "fp32_lanes": lanes,
          "flops_per_cycle_per_core": per_cycle, "peak_flops": peak,
          "formula": (f"{cores} cores x {mhz / 1e3:.3f} GHz x ({fma_units} "
                      f"FMA units x {lanes} fp32 lanes x {per_fma}) = "
                      f"{peak / 1e9:.0f} GFLOP/s")}


def matmul_flops(n: int = 2048, runs: int = 5) -> float:
  """Measured fp32 FLOP/s of one large XLA matmul: a practical ceiling."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)),
                  jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times)


def load_average() -> float:
  """1-minute load: these cores are shared, so results carry it."""
  try:
    return os.getloadavg()[0]
  except OSError:
    return float("nan")


def rows_sweep(base: ml_collections.ConfigDict, rows: list[int],
               model_devices: int, **timing: Any) -> list[dict[str, Any]]:
  """Step time and memory per device vs item_id table rows.

  The ID part of `base`'s model (use_image=False: the CNN's cost does not
  depend on the tables). model_devices == 1: one device, the table whole;
  > 1: a 1 x model_devices mesh with the table row-sharded over 'model'.
  Used by benchmarks/scaling.py and benchmarks/embedding_scaling.py.
  """
  config = copy.deepcopy(base)
  config.model.use_image = False
  config.mesh.shape = (1, model_devices)
  config.mesh.shard_embeddings = model_devices > 1
  info = data_info(config)
  column = info.feature_index("item_id")
  mesh = mesh_lib.make_mesh(config)
  out = []
  for n in rows:
    vocab = list(info.vocab_sizes)
    vocab[column] = n
    sized = batch_lib.DataInfo(
        info.sparse_features, tuple(vocab), info.num_dense,
        info.num_categories, info.image_size, info.num_behaviors)
    start = time.perf_counter()
    steps = steps_lib.build_steps(config, sized, mesh)
    state = init_state(steps)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    spec = next(s.spec for path, s in jax.tree_util.tree_flatten_with_path(
        steps.shardings["params"])[0] if "item_id" in jax.tree_util.keystr(path))
    r = time_train_step(config, sized, mesh, steps=steps, state=state,
                        **timing)
    del state  # donated: the next point's table is the only one alive
    out.append({"rows": n, "devices": model_devices,
                "table_spec": str(spec),
                "table_bytes": n * config.model.embed_dim * 4,
                "init_s": init_s, **r})
    print(f"  rows={n:.0e} devices={model_devices}: "
          f"{r['step_s'] * 1e3:.1f} ms/step, "
          f"{r.get('peak_bytes', 0) / 2**20:.1f} MiB/device", flush=True)
  return out


def run_worker(script: str, args: list[str], devices: int,
               timeout: float = 600) -> Any:
  """`script --worker ARGS` in a fresh process (on N fake CPU devices if N > 1).

  Fake devices (XLA_FLAGS=--xla_force_host_platform_device_count) exist only
  in a process that sets the flag before JAX starts. The worker prints its
  result as one 'RESULT <json>' line; its other output is passed through.
  """
  env = dict(os.environ)
  if devices > 1:  # fake devices are CPU devices
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_"
                        f"platform_device_count={devices}")
  # As `python -m benchmarks.NAME` from the repository root, so that the
  # worker imports like its parent whether or not the package is installed.
  script = os.path.abspath(script)
  module = "benchmarks." + os.path.splitext(os.path.basename(script))[0]
  proc = subprocess.run([sys.executable, "-m", module, "--worker", *args],
                        env=env, cwd=os.path.dirname(os.path.dirname(script)),
                        capture_output=True, text=True, timeout=timeout)
  sys.stdout.write("".join(line + "\n" for line in proc.stdout.splitlines()
                           if not line.startswith("RESULT ")))
  if proc.returncode:
    raise RuntimeError(f"{os.path.basename(script)} worker on {devices} "
                       f"device(s) failed (exit {proc.returncode}; -9: "
                       f"killed, e.g. out of memory):\n{proc.stderr[-3000:]}")
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])
