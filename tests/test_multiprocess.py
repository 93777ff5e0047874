"""One global data order: 1, 2 and 4 processes, and a resume across counts agree.

launch/local_multiprocess.sh N runs the normal entry point as N CPU processes
joined by jax.distributed. Global batch i is a function of the config and the
seed only (csctr.data.pipeline): each process builds the blocks of it that
its devices hold. So, with the same arguments:

- 2 processes x 4 devices on a (data=4, model=2) mesh whose 'model' axis
  spans the two processes (each process feeds all four 'data' blocks, as
  replica hosts must) train as 1 process on 1 device: the same evals and
  parameters up to float reduction order; so do 4 processes x 1 device
  (each process one quarter of each global batch);
- a 2-process run killed inside a save, resumed as 1 process, ends where an
  uninterrupted run ends: no batch skipped or repeated.

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
import kill_in_save
from csctr.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "local_multiprocess.sh"
STEPS = 12
OVERRIDES = (f"--config.num_train_steps={STEPS}", "--config.eval_every=6",
             "--config.checkpoint_every=6", "--config.log_every=6")
# Multi-process layouts that must train as 1 process on 1 device:
# name -> (processes, CPU devices per process, extra flags, log patterns).
LAYOUTS = {
    # 'model' = 2 across the two processes, ID tables row-sharded over it.
    "2x4": (2, 4, ("--config.mesh.shape=(4,2)",
                   "--config.mesh.model_across_processes=True",
                   "--config.mesh.shard_embeddings=True"),
            (re.escape("mesh {'data': 4, 'model': 2}"),
             # An ID table row-sharded over the 'model' axis that spans
             # the processes.
             r"sharding \S*embed\S* \(.*\) -> (PartitionSpec|P)\('model'")),
    # Four processes, one device each: four hosts' slices of each batch.
    "4x1": (4, 1, (), (re.escape("mesh {'data': 4, 'model': 1}"),)),
}


def _env(cache_dir: str, devices: int = 1) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  # Unoptimised XLA: this checks equality, not speed, and compiling the
  # train step at -O0 takes half the time.
  env.update(XLA_FLAGS="--xla_backend_optimization_level=0")
  env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHON=sys.executable, PYTHONPATH=str(ROOT), TIMEOUT="900",
             INIT_TIMEOUT="120", DEVICES_PER_PROCESS=str(devices))
  return env


def _params(step_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """Saved params as numpy, whatever devices the checkpoint was written from."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
  state = checkpointer.restore(step_dir / "state", restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return {"/".join(map(str, k)): np.asarray(v)
          for k, v in ocp.tree.to_flat_dict(state["params"]).items()}


def _evals(workdir: pathlib.Path) -> list[dict]:
  with open(workdir / "eval_metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _assert_same_training(got: pathlib.Path, want: pathlib.Path) -> None:
  """Evals and final params equal up to float reduction order."""
  a, b = _evals(got), _evals(want)
  assert [e["step"] for e in a] == [e["step"] for e in b] == [6, STEPS]
  for x, y in zip(a, b):
    assert x["num_impressions"] == y["num_impressions"] == 600
    for key in ("auc", "gauc", "cold_auc", "logloss", "calibration"):
      assert abs(x[key] - y[key]) < 1e-4, (key, x, y)
  p, q = (_params(w / "checkpoints" / str(STEPS)) for w in (got, want))
  assert p.keys() == q.keys()
  for key in q:
    np.testing.assert_allclose(p[key], q[key], rtol=1e-4, atol=1e-5,
                               err_msg=key)


def _position(workdir: pathlib.Path, step: int) -> dict[str, dict]:
  data = workdir / "checkpoints" / str(step) / "data"
  return {p.name: json.loads(p.read_text())
          for p in sorted(data.glob("process_*.json"))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(directory, compile cache, shared arguments); the data prepared once."""
  out = tmp_path_factory.mktemp("multiprocess")
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      tempfile.gettempdir(), "csctr-test-jax-cache")
  config = tiny.get_config()
  config.data_dir = str(out / "data")
  pipeline.prepare_dataset(config)  # once, before every run reads it
  args = ["--config=configs/tiny.py", f"--config.data_dir={config.data_dir}",
          *OVERRIDES]
  return out, cache, args


@pytest.fixture(scope="module",
                params=["2x4", pytest.param("4x1", marks=pytest.mark.slow)])
def multi(request, setup):
  """One LAYOUTS run, alone (a starved process can miss the coordination
  service's heartbeats)."""
  out, cache, args = setup
  processes, devices, extra, _ = LAYOUTS[request.param]
  workdir = out / request.param
  proc = subprocess.run(
      ["bash", str(SCRIPT), str(processes), f"--workdir={workdir}", *args,
       *extra], cwd=ROOT, env=_env(cache, devices=devices),
      capture_output=True, text=True, timeout=1000)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-4000:]
  return {"name": request.param, "dir": workdir, "processes": processes,
          "log": log}


@pytest.fixture(scope="module")
def runs(setup):
  """The 1-process reference, and a 2-process run killed and resumed as 1."""
  out, cache, args = setup
  single = subprocess.Popen(
      [sys.executable, "-m", "csctr.main", f"--workdir={out / 'single'}",
       *args], cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  killed = subprocess.Popen(
      ["bash", str(SCRIPT), "2", f"--workdir={out / 'elastic'}", *args],
      cwd=ROOT, env={**_env(cache), kill_in_save.ENV: str(STEPS),
                     "PYTHON": kill_in_save.python_for_launcher(out)},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  killed_log, _ = killed.communicate(timeout=1000)
  _, single_err = single.communicate(timeout=1000)
  assert single.returncode == 0, single_err[-4000:]
  assert killed.returncode != 0, killed_log[-4000:]
  assert (out / "elastic" / "checkpoints").is_dir(), killed_log[-4000:]
  committed = sorted(int(p.name) for p in (out / "elastic" / "checkpoints")
                     .iterdir() if p.name.isdigit())
  # The resume: one process picks up the 2-process checkpoint of step 6.
  resumed = subprocess.run(
      [sys.executable, "-m", "csctr.main", f"--workdir={out / 'elastic'}",
       *args], cwd=ROOT, env=_env(cache), capture_output=True, text=True,
      timeout=1000)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  return {"dir": out, "committed_when_killed": committed,
          "resumed_log": resumed.stderr}


def test_processes_match_one_process(multi, runs):
  _assert_same_training(multi["dir"], runs["dir"] / "single")
  for pattern in LAYOUTS[multi["name"]][3]:
    assert re.search(pattern, multi["log"]), (pattern, multi["log"][-3000:])


def test_every_process_saves_the_one_global_position(multi, runs):
  n = multi["processes"]
  for step in (6, STEPS):
    want = {"process_0-of-1.json": {"next_index": step}}
    assert _position(runs["dir"] / "single", step) == want
    assert _position(multi["dir"], step) == {
        f"process_{i}-of-{n}.json": {"next_index": step} for i in range(n)}


def test_two_process_checkpoint_resumes_as_one_process(runs):
  out = runs["dir"]
  # Killed inside the save of the last step: only step 6 was committed, by
  # two processes; the eval of step 12 had been logged and is redone once.
  assert runs["committed_when_killed"] == [6]
  assert "process_0-of-2.json (written by 2 processes)" in runs["resumed_log"]
  assert "Restored step 6" in runs["resumed_log"]
  assert _position(out / "elastic", STEPS) == {
      "process_0-of-1.json": {"next_index": STEPS}}
  _assert_same_training(out / "elastic", out / "single")


def test_process_0_alone_logs(multi):
  log, n = multi["log"], multi["processes"]
  assert re.search(r"^\[0\] I.*eval test step 12", log, re.M)
  assert re.search(rf"^\[0\] I.*process 0/{n}", log, re.M)
  for i in range(1, n):
    # Process i ran (it joined the Gloo group) but logged nothing at INFO.
    assert re.search(rf"^\[{i}\] ", log, re.M)
    assert not re.search(rf"^\[{i}\] I\d{{4}}", log, re.M), log[-3000:]
  assert len(list(multi["dir"].glob("events.out.tfevents*"))) == 1


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


_KWARGS = r"""
import json
from csctr import main
env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
       "JAX_PROCESS_ID": "3"}
print(json.dumps([
    main.distributed_kwargs(False, None, None, None, 60, env={}),
    main.distributed_kwargs(False, None, None, None, 60, env=env),
    main.distributed_kwargs(False, "h:1", 2, 0, 9, env=env),
    main.distributed_kwargs(True, None, None, None, 300, env={})]))
"""


def test_distributed_arguments_from_flags_or_environment():
  # In a subprocess: importing csctr.main defines its flags process-wide.
  proc = subprocess.run([sys.executable, "-c", _KWARGS], cwd=ROOT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, check=True)
  single, from_env, from_flags, detected = json.loads(proc.stdout)
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
