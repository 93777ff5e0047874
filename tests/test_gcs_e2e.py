"""gs:// end to end on a real GCS emulator: the same results as on local disk.

`python -m csctr.main --workdir=gs://BUCKET/run --config.data_dir=gs://BUCKET/data`
(STORAGE_EMULATOR_HOST is the only setting) is SIGKILLed inside the save of
step 12, after step 6 was committed, and rerun; `python -m csctr.export`
writes its table to gs://; `Scorer.from_workdir("gs://...")` scores from
the bucket. The reference is the same commands on local disk: the eval log,
the parameters and the scores must be identical.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import gcs_emulator
import kill_in_save

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = gcs_emulator.BUCKET
REMOTE = f"gs://{BUCKET}/run"
ARGS = ("--config=configs/tiny.py", "--config.num_train_steps=12",
        "--config.eval_every=6", "--config.checkpoint_every=6")


def _run(args, env, **kwargs):
  return subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1200, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("gcs")
  with gcs_emulator.running() as url:
    env = {**gcs_emulator.environ(url), "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(out / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "CSCTR_REMOTE_CACHE": str(out / "mirror"), "PYTHONPATH": str(ROOT)}
    local = subprocess.Popen(
        [sys.executable, "-m", "csctr.main", *ARGS,
         f"--workdir={out / 'run'}", f"--config.data_dir={out / 'data'}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    remote = (*ARGS, f"--workdir={REMOTE}",
              f"--config.data_dir=gs://{BUCKET}/data")
    killed = _run(kill_in_save.command(*remote), {**env, kill_in_save.ENV: "12"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _run([sys.executable, "-m", "csctr.main", *remote], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _, local_err = local.communicate(timeout=1200)
    assert local.returncode == 0, local_err[-3000:]
    for workdir, table in ((REMOTE, f"gs://{BUCKET}/table"),
                           (out / "run", out / "table")):
      exported = _run([sys.executable, "-m", "csctr.export",
                       f"--workdir={workdir}", f"--output={table}"], env)
      assert exported.returncode == 0, exported.stderr[-3000:]
    os.environ["STORAGE_EMULATOR_HOST"] = url  # this process reads it too
    from csctr import storage  # pylint: disable=g-import-not-at-top
    storage.configure()
    try:
      yield {"dir": out, "killed": killed.stderr, "resumed": resumed.stderr,
             "storage": storage}
    finally:
      del os.environ["STORAGE_EMULATOR_HOST"]


def test_run_in_the_bucket_resumes_and_equals_the_local_run(runs):
  storage, out = runs["storage"], runs["dir"]
  assert "Restored step 6" in runs["resumed"]
  assert not (pathlib.Path.cwd() / "gs:").exists()  # no local dir named gs:
  names = storage.listdir(REMOTE)
  assert {"config.json", "data_info.json", "eval_metrics.jsonl",
          "checkpoints"} <= set(names)
  assert any(n.startswith("events.out.tfevents") for n in names)
  # Orbax's commit protocol on an object store: a marker, written last.
  assert storage.exists(f"{REMOTE}/checkpoints/12/commit_success.txt")
  # Every eval once, bit for bit the local run's (the killed run had logged
  # step 12 before dying; the resumed run dropped it and redid it).
  remote_log = storage.read_text(f"{REMOTE}/eval_metrics.jsonl")
  assert [json.loads(l)["step"] for l in remote_log.splitlines()] == [6, 12]
  assert remote_log == (out / "run" / "eval_metrics.jsonl").read_text()
  # The dataset was prepared into the bucket, committed by info.json.
  (dataset,) = storage.listdir(f"gs://{BUCKET}/data")
  assert storage.exists(f"gs://{BUCKET}/data/{dataset}/info.json")
  assert json.loads(storage.read_text(f"{REMOTE}/data_info.json"))[
      "data_path"] == f"gs://{BUCKET}/data/{dataset}"


def test_parameters_equal(runs):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from csctr import rundir  # pylint: disable=g-import-not-at-top
  remote, _, _, remote_step = rundir.restore_model(REMOTE)
  local, _, _, local_step = rundir.restore_model(str(runs["dir"] / "run"))
  assert remote_step == local_step == 12
  a = jax.tree.leaves(nnx.state(remote, nnx.Param))
  b = jax.tree.leaves(nnx.state(local, nnx.Param))
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_scorer_from_the_bucket_scores_as_from_disk(runs):
  from csctr import serving  # pylint: disable=g-import-not-at-top
  out = runs["dir"]
  remote = serving.Scorer.from_workdir(REMOTE, f"gs://{BUCKET}/table")
  local = serving.Scorer.from_workdir(str(out / "run"), str(out / "table"))
  rng = np.random.default_rng(0)
  for user in range(3):
    n = 7
    request = {"user": {"user_id": user},
               "candidates": {"image_id": rng.integers(0, 120, n),
                              "item_id": rng.integers(0, 120, n),
                              "category_id": rng.integers(0, 3, n),
                              "position": rng.integers(0, 5, n)}}
    a, b = remote.score(request), local.score(request)
    assert a.misses == b.misses == 0
    np.testing.assert_array_equal(a.logits, b.logits)
  # The table in the bucket is the one exported from there: same rows.
  np.testing.assert_array_equal(np.asarray(remote.table.embeddings),
                                np.asarray(local.table.embeddings))
