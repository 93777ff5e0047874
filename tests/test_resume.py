"""SIGKILL anywhere, rerun the same command: bitwise the uninterrupted result.

Runs `python -m csctr.main` as users do, in subprocesses sharing a persistent
XLA compilation cache (so only the first run pays for compiling). Two kills:
one just after a checkpoint has been committed (wherever the run happens to
be by then), and one deterministic kill inside a save, after Orbax created
the tmp directory and before it renamed it (IteratorHandler.save patched by
the command, _HANG_IN_SAVE).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 60

# Reading a checkpoint without a target restores the shardings it was saved
# with, which is what these single-device comparisons want.
pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("xla_cache")
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


# `python -m csctr.main`, except that the save of checkpoint STEP touches
# MARKER and hangs inside the save (after Orbax created the tmp directory,
# before the rename), so that the test can SIGKILL it there.
_HANG_IN_SAVE = """
import sys, time
from absl import app
from etils import epath
from csctr import main
from csctr.training import checkpointing
step, marker = sys.argv.pop(1), sys.argv.pop(1)
save = checkpointing.IteratorHandler.save
def hanging_save(self, directory, *args, **kwargs):
  # directory is <root>/<step>.orbax-checkpoint-tmp*/data.
  if epath.Path(directory).parent.name.split(".")[0] == step:
    epath.Path(marker).write_text(str(directory))
    time.sleep(3600)
  return save(self, directory, *args, **kwargs)
checkpointing.IteratorHandler.save = hanging_save
app.run(main.main)
"""


def _command(workdir, data_dir, hang_in_save=None):
  """The training command; hang_in_save=(step, marker) runs _HANG_IN_SAVE."""
  run = (["-c", _HANG_IN_SAVE, *map(str, hang_in_save)] if hang_in_save
         else ["-m", "csctr.main"])
  return [sys.executable, *run, "--config=configs/tiny.py",
          f"--config.data_dir={data_dir}", f"--config.num_train_steps={STEPS}",
          "--config.eval_every=12", "--config.checkpoint_every=6",
          # Validation evals select a best checkpoint, which must resume
          # exactly too (a second Orbax manager beside the train state).
          "--config.data.validation_fraction=0.2",
          # ID dropout draws from the checkpointed rng: resume must redraw
          # exactly what the uninterrupted run drew.
          "--config.model.id_dropout=0.1", f"--workdir={workdir}"]


def _run(workdir, data_dir, env):
  proc = subprocess.run(_command(workdir, data_dir), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]


def _run_and_kill(workdir, data_dir, env, ready, what, hang_in_save=None):
  """Starts a run, SIGKILLs it once ready() holds; asserts it was unfinished."""
  proc = subprocess.Popen(_command(workdir, data_dir, hang_in_save), cwd=ROOT,
                          env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while not ready():
    if proc.poll() is not None:
      raise AssertionError(f"run ended before {what}: "
                           f"{proc.stderr.read().decode()[-3000:]}")
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(workdir, "checkpoints", str(STEPS)))


def _committed(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _final(workdir):
  ckpt = os.path.join(workdir, "checkpoints", str(STEPS))
  state = ocp.PyTreeCheckpointer().restore(os.path.join(ckpt, "state"))
  with open(os.path.join(ckpt, "data", "process_0-of-1.json")) as f:
    data = json.load(f)
  with open(os.path.join(workdir, "eval_metrics.jsonl")) as f:
    evals = f.read()
  best_dir = os.path.join(workdir, "best_checkpoint")
  (best_step,) = os.listdir(best_dir)  # pruned to the one best checkpoint
  best = ocp.PyTreeCheckpointer().restore(
      os.path.join(best_dir, best_step, "state"))
  return state, data, evals, (best_step, best)


def _assert_identical(a, b):
  state_a, data_a, evals_a, (best_a, best_state_a) = a
  state_b, data_b, evals_b, (best_b, best_state_b) = b
  assert best_a == best_b
  for tree_a, tree_b in ((state_a, state_b), (best_state_a, best_state_b)):
    flat_a = ocp.tree.to_flat_dict(tree_a)
    flat_b = ocp.tree.to_flat_dict(tree_b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
      np.testing.assert_array_equal(np.asarray(flat_a[key]),
                                    np.asarray(flat_b[key]), err_msg=str(key))
  assert data_a == data_b  # the same data position: no batch skipped or repeated
  assert evals_a == evals_b  # every eval once, bit for bit


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, env):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  _run(workdir, data_dir, env)
  evals = [json.loads(l) for l in open(os.path.join(workdir, "eval_metrics.jsonl"))]
  assert [(e["step"], e["split"]) for e in evals] == [
      (12, "validation"), (24, "validation"), (36, "validation"),
      (48, "validation"), (60, "validation"), (60, "test")]
  return _final(workdir)


def test_kill_after_checkpoint_then_resume_is_exact(reference, data_dir, env,
                                                    tmp_path):
  workdir = str(tmp_path / "killed")
  _run_and_kill(workdir, data_dir, env, lambda: bool(_committed(workdir)),
                "the first checkpoint")
  assert _committed(workdir)
  _run(workdir, data_dir, env)
  _assert_identical(_final(workdir), reference)


def test_kill_inside_a_save_then_resume_is_exact(reference, data_dir, env,
                                                 tmp_path):
  workdir = str(tmp_path / "killed_mid_save")
  marker = str(tmp_path / "hanging")
  _run_and_kill(workdir, data_dir, env, lambda: os.path.exists(marker),
                "the save of step 12", hang_in_save=(12, marker))
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert any(n.startswith("12.orbax-checkpoint-tmp") for n in names), names
  assert _committed(workdir) == [6]  # the half-written 12 is not a checkpoint
  # The eval of step 12 ran before its save; the resumed run must redo it,
  # not log it twice.
  _run(workdir, data_dir, env)
  assert not any("tmp" in n for n in os.listdir(os.path.join(workdir, "checkpoints")))
  _assert_identical(_final(workdir), reference)
