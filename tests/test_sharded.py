"""A run on an 8-device mesh matches the single-device run.

Eight fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)
exist only in a fresh process, so one subprocess runs the tiny config three
times: on one device (the reference), data parallel on 8x1, and on 4x2 with
the ID tables row-sharded over 'model'. Reduction order differs between
meshes, so results agree to float tolerance, not bitwise.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
import jax
import numpy as np
import orbax.checkpoint as ocp
from configs import tiny
from csctr import train

out, data_dir = sys.argv[1], sys.argv[2]
results = {}
for name, shape, shard in [("single", (1, 1), False), ("dp8", (8, 1), False),
                           ("dp4_mp2", (4, 2), True)]:
  c = tiny.get_config()
  c.data_dir = data_dir
  c.num_train_steps = c.eval_every = c.checkpoint_every = 12
  c.mesh.shape, c.mesh.shard_embeddings = shape, shard
  record = train.train_and_evaluate(c, f"{out}/{name}")
  state = ocp.PyTreeCheckpointer().restore(f"{out}/{name}/checkpoints/12/state")
  flat = {"/".join(map(str, k)): v
          for k, v in ocp.tree.to_flat_dict(state["params"]).items()}
  np.savez(f"{out}/{name}.npz", **{k: np.asarray(v) for k, v in flat.items()})
  results[name] = {
      "metrics": record,
      # Partitioned axes per dim, trailing unpartitioned dims dropped.
      "specs": {k: [a for a in v.sharding.spec] for k, v in flat.items()},
      "devices": len(set().union(*(v.sharding.device_set
                                   for v in flat.values())))}
with open(f"{out}/results.json", "w") as f:
  json.dump(results, f)
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharded")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run(
      [sys.executable, "-c", _SCRIPT, str(out),
       str(tmp_path_factory.mktemp("data"))],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out / "results.json") as f:
    res = json.load(f)
  params = {name: dict(np.load(out / f"{name}.npz")) for name in res}
  return res, params


@pytest.mark.parametrize("name", ["dp8", "dp4_mp2"])
def test_sharded_run_matches_single_device(results, name):
  res, params = results
  ref, got = params["single"], params[name]
  assert ref.keys() == got.keys()
  for key in ref:
    np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-5,
                               err_msg=key)
  m_ref, m = res["single"]["metrics"], res[name]["metrics"]
  assert m["num_impressions"] == m_ref["num_impressions"]
  for key in ("auc", "gauc", "cold_auc"):
    assert abs(m[key] - m_ref[key]) < 2e-3, key
  for key in ("logloss", "calibration"):
    np.testing.assert_allclose(m[key], m_ref[key], rtol=1e-4)


def test_meshes_place_state_as_configured(results):
  res, _ = results
  assert res["single"]["devices"] == 1
  assert res["dp8"]["devices"] == 8
  def axes(spec):
    while spec and spec[-1] is None:
      spec = spec[:-1]
    return tuple(spec)

  assert {axes(s) for s in res["dp8"]["specs"].values()} == {()}
  specs = {k: axes(v) for k, v in res["dp4_mp2"]["specs"].items()}
  # 62 user rows and 4 category rows split over model=2; 97 item rows do
  # not divide, so that table stays replicated; dense weights replicate.
  sharded = {k for k, v in specs.items() if v}
  assert sharded == {k for k in specs if "id_embed" in k
                     and ("user_id" in k or "category_id" in k)}, specs
  assert all(specs[k] == ("model",) for k in sharded)
