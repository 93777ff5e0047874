"""Two processes on this machine train exactly as one process on the same batches.

launch/local_multiprocess.sh 2 runs the normal entry point as two CPU
processes (one device each) joined by jax.distributed: Grain shards the data
by process, global batches come from jax.make_array_from_process_local_data,
process 0 alone writes metrics and logs, and both write the Orbax checkpoint.

The reference is one process training on the same global batches. Those are
not the batches of a plain run with the same global groups_per_batch (Grain
shuffles each process's shard of groups separately), so the reference builds
them as the two processes do, from both processes' iterators, offsetting the
second one's image rows by its table size (mesh_lib.global_batch's rule). Evals
cover the whole test split in both runs, so their metrics compare directly.

A persistent XLA compile cache ($JAX_COMPILATION_CACHE_DIR, else one under
the system temp dir) makes reruns much faster than the first.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from csctr.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "local_multiprocess.sh"
STEPS = 12
OVERRIDES = (f"--config.num_train_steps={STEPS}", f"--config.eval_every={STEPS}",
             "--config.checkpoint_every=6", "--config.log_every=6")

# One process, the global batches of `n` processes (see the module docstring).
_REFERENCE = r"""
import json, sys
import numpy as np
from absl import flags
from csctr.data import pipeline
from csctr.training import loop as train

from csctr import main  # the entry point's own flags parse the arguments

n = int(sys.argv[1])
flags.FLAGS(["reference", *sys.argv[2:]])
config, workdir = main._CONFIG.value, main._WORKDIR.value
per_process = pipeline.train_iterator

# How main reads a multi-process run from flags or the environment; checked
# here because importing csctr.main defines its flags process-wide.
env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
       "JAX_PROCESS_ID": "3"}
print("KWARGS " + json.dumps([
    main.distributed_kwargs(False, None, None, None, 60, env={}),
    main.distributed_kwargs(False, None, None, None, 60, env=env),
    main.distributed_kwargs(False, "h:1", 2, 0, 9, env=env),
    main.distributed_kwargs(True, None, None, None, 300, env={})]))


class Merged:
  '''The iterators of processes 0..n-1, concatenated as global_batch does.'''

  def __init__(self, iterators, rows):
    self.iterators, self.rows = iterators, rows

  def __next__(self):
    parts = [dict(next(it)) for it in self.iterators]
    for i, part in enumerate(parts):
      for key in ("ad_image", "behavior_images"):
        if key in part:
          part[key] = part[key] + np.int32(i * self.rows)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return {"processes": [it.get_state() for it in self.iterators]}

  def set_state(self, state):
    for it, s in zip(self.iterators, state["processes"]):
      it.set_state(s)


def train_iterator(config, path, process_index=0, process_count=1):
  return Merged([per_process(config, path, i, n) for i in range(n)],
                config.data.unique_images // n)


pipeline.train_iterator = train_iterator
record = train.train_and_evaluate(config, workdir)
print("RECORD " + json.dumps(record))
"""


def _env(cache_dir: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # Unoptimised XLA: this checks equality, not speed, and compiling the
  # train step at -O0 takes half the time (process 1 always compiles: JAX
  # writes the persistent cache from process 0 only, under keys that differ
  # between processes).
  env.update(XLA_FLAGS="--xla_backend_optimization_level=0")
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHON=sys.executable, PYTHONPATH=str(ROOT), TIMEOUT="400",
             INIT_TIMEOUT="60")
  return env


def _params(step_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """Saved params as numpy, whatever devices the checkpoint was written from."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
  state = checkpointer.restore(step_dir / "state", restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in ocp.tree.to_flat_dict(state["params"]).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("multiprocess")
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      tempfile.gettempdir(), "csctr-test-jax-cache")
  data_dir = str(out / "data")
  config = tiny.get_config()
  config.data_dir = data_dir
  pipeline.prepare_dataset(config)  # once, before both runs read it
  args = ["--config=configs/tiny.py", f"--config.data_dir={data_dir}",
          *OVERRIDES]
  env = _env(cache)
  # Both runs at once: the two processes spend part of their time waiting
  # on each other, which the reference fills.
  reference = subprocess.Popen(
      [sys.executable, "-c", _REFERENCE, "2", f"--workdir={out / 'single'}",
       *args],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  multi = subprocess.run(
      ["bash", str(SCRIPT), "2", f"--workdir={out / 'multi'}", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=450)
  ref_out, ref_err = reference.communicate(timeout=450)
  assert multi.returncode == 0, (multi.stdout + multi.stderr)[-4000:]
  assert reference.returncode == 0, ref_err[-4000:]
  record, kwargs = (json.loads(re.search(rf"^{tag} (.*)$", ref_out, re.M)[1])
                    for tag in ("RECORD", "KWARGS"))
  return {"dir": out, "multi_log": multi.stdout + multi.stderr,
          "single_record": record, "kwargs": kwargs}


def test_two_processes_match_one_process_on_the_same_batches(runs):
  out = runs["dir"]
  with open(out / "multi" / "eval_metrics.jsonl") as f:
    (multi,) = [json.loads(line) for line in f]  # one eval, logged once
  single = runs["single_record"]
  assert multi["step"] == single["step"] == STEPS
  s = tiny.get_config().synthetic
  assert multi["num_impressions"] == single["num_impressions"] == round(
      s.num_impressions * s.test_fraction)
  for key in ("auc", "gauc", "cold_auc"):
    assert abs(multi[key] - single[key]) < 2e-3, key
  for key in ("logloss", "calibration"):
    np.testing.assert_allclose(multi[key], single[key], rtol=1e-4, err_msg=key)
  got = _params(out / "multi" / "checkpoints" / str(STEPS))
  ref = _params(out / "single" / "checkpoints" / str(STEPS))
  assert got.keys() == ref.keys()
  for key in ref:
    np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-5,
                               err_msg=key)


def test_checkpoints_are_collective_and_process_0_alone_logs(runs):
  out, log = runs["dir"], runs["multi_log"]
  for step in (6, STEPS):
    data = out / "multi" / "checkpoints" / str(step) / "data"
    # Each process saved its own Grain position into the one checkpoint.
    assert sorted(p.name for p in data.glob("process_*.json")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert json.loads((data / "process_1-of-2.json").read_text()) == {
        "next_index": step}  # process 1's own position (its shard, 6 batches)
  assert re.search(r"^\[0\] I.*eval test step 12", log, re.M)
  assert re.search(r"^\[0\] I.*process 0/2", log, re.M)
  # Process 1 ran (it joined the Gloo group) but logged nothing at INFO.
  assert re.search(r"^\[1\] ", log, re.M)
  assert not re.search(r"^\[1\] I\d{4}", log, re.M), log[-3000:]
  assert len(list((out / "multi").glob("events.out.tfevents*"))) == 1


def test_dry_run_prints_one_command_per_process():
  proc = subprocess.run(
      ["bash", str(SCRIPT), "--dry-run", "3", "--config=configs/tiny.py",
       "--workdir=/tmp/a b"],
      env={**os.environ, "PORT": "12345", "TIMEOUT": "99", "INIT_TIMEOUT": "7"},
      capture_output=True, text=True, check=True)
  lines = proc.stdout.splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    # Bounded twice: connecting (initialization_timeout) and the whole run.
    assert line.startswith("timeout --kill-after=10 99 ")
    assert "-m csctr.main --coordinator_address=127.0.0.1:12345" in line
    assert f"--num_processes=3 --process_id={i} " in line
    assert "--initialization_timeout=7 " in line
    assert line.rstrip().endswith(r"--config=configs/tiny.py --workdir=/tmp/a\ b")


_FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: process 1 fails at once, the others would run long.
if [[ " $* " == *" --process_id=1 "* ]]; then echo failing; exit 3; fi
echo started; exec sleep 60
"""


def test_one_failing_process_stops_the_others(tmp_path):
  fake = tmp_path / "python"
  fake.write_text(_FAKE_PYTHON)
  fake.chmod(0o755)
  start = time.monotonic()
  proc = subprocess.run(
      ["bash", str(SCRIPT), "3", "--workdir=/unused"],
      env={**os.environ, "PYTHON": str(fake), "PORT": "1"},
      capture_output=True, text=True, timeout=50)
  assert time.monotonic() - start < 30  # not the 60 s the others would take
  assert proc.returncode == 3, proc.stderr
  assert "[1] failing" in proc.stdout
  assert "exited with 3; stopping the others" in proc.stderr


def test_usage_without_process_count():
  proc = subprocess.run(["bash", str(SCRIPT), "two"], capture_output=True,
                        text=True)
  assert proc.returncode == 2 and "local_multiprocess.sh" in proc.stdout


def test_distributed_arguments_from_flags_or_environment(runs):
  single, from_env, from_flags, detected = runs["kwargs"]  # see _REFERENCE
  assert single is None  # nothing asks for processes: one-process run
  assert from_env == {"coordinator_address": "10.0.0.1:1234",
                      "num_processes": 4, "process_id": 3,
                      "initialization_timeout": 60}
  # Flags win over the environment.
  assert from_flags == {"coordinator_address": "h:1", "num_processes": 2,
                        "process_id": 0, "initialization_timeout": 9}
  # --distributed alone leaves everything to JAX's cluster detection.
  assert detected == {"coordinator_address": None, "num_processes": None,
                      "process_id": None, "initialization_timeout": 300}
