"""JAX's CPU client set up for serving latency rather than training throughput.

Kept apart from the scorer because it must run before anything touches JAX:
a serving process (csctr/serve.py, benchmarks/serving.py) calls it first.
"""

from __future__ import annotations

import os

from absl import logging
import jax

# One request at a time: Eigen's thread pool only adds handoffs (and, on a
# busy machine, waits for a second core) to kernels this small.
SINGLE_THREAD_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false",)


def configure_cpu_serving(single_thread: bool = True) -> bool:
  """Sets up JAX's CPU client for latency; call before any JAX computation.

  By default JAX hands each CPU computation to a worker thread (async
  dispatch), and Eigen kernels use a thread pool: both serve throughput (a
  training loop runs ahead), but a scorer waits for every result at once,
  so each handoff is latency. Inline dispatch cut p50 by ~45% at N=1 and
  by ~25% at N=200 in benchmarks/serving.py. (XLA's CPU runtime still
  spreads the largest buckets' kernels over its own pool; no flag turns that
  off in jax 0.10.) Scale out with a process per core. Both options are read
  when JAX creates its CPU client: hence "before any JAX computation".

  Returns:
    False when a backend already existed (nothing then changes).
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    logging.warning("configure_cpu_serving(): JAX's backends already exist;"
                    " CPU dispatch and threads stay as they were")
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if single_thread:
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(
        flags + [f for f in SINGLE_THREAD_XLA_FLAGS if f not in flags])
  return True
