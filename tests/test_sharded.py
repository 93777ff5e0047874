"""A run on an 8-device mesh matches the single-device run.

Eight fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)
exist only in a fresh process, so one subprocess runs the tiny config three
times: on one device (the reference), data parallel on 8x1, and on 4x2 with
the ID tables row-sharded over 'model' and FSDP over 'data' for leaves of at
least FSDP_MIN_SIZE elements (lowered from the default so that the tiny
model has some). Reduction order differs between meshes, so results agree to
float tolerance, not bitwise.
"""

import json
import os
import pathlib
import subprocess
import sys
import types

from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from configs import tiny
from csctr.training import mesh as mesh_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FSDP_MIN_SIZE = 256  # elements

_SCRIPT = r"""
import json, sys
import jax
import numpy as np
import orbax.checkpoint as ocp
from configs import tiny
from csctr.training import mesh as mesh_lib
from csctr.training import loop as train

out, data_dir = sys.argv[1], sys.argv[2]
results = {}
for name, shape, shard in [("single", (1, 1), False), ("dp8", (8, 1), False),
                           ("dp4_mp2", (4, 2), True)]:
  c = tiny.get_config()
  c.data_dir = data_dir
  c.num_train_steps = c.eval_every = c.checkpoint_every = 12
  c.mesh.shape, c.mesh.shard_embeddings, c.mesh.fsdp = shape, shard, shard
  c.mesh.fsdp_min_size = FSDP_MIN_SIZE
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
      [sys.executable, "-c", f"FSDP_MIN_SIZE = {FSDP_MIN_SIZE}\n" + _SCRIPT,
       str(out),
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
  res, params = results
  assert res["single"]["devices"] == 1
  assert res["dp8"]["devices"] == 8
  def axes(spec):
    while spec and spec[-1] is None:
      spec = spec[:-1]
    return tuple(spec)

  assert {axes(s) for s in res["dp8"]["specs"].values()} == {()}
  specs = {k: axes(v) for k, v in res["dp4_mp2"]["specs"].items()}
  shapes = {k: v.shape for k, v in params["dp4_mp2"].items()}
  # Every table is padded to model.table_row_multiple rows (e.g. 97 item ids
  # -> 128 rows), so every one splits over model=2: none is replicated.
  multiple = tiny.get_config().model.table_row_multiple
  for feature in ("user_id", "item_id", "category_id", "position"):
    assert specs[f"id_embed/{feature}/embedding/value"] == ("model",)
    assert shapes[f"id_embed/{feature}/embedding/value"][0] % multiple == 0
  # FSDP: the largest dim that divides over data=4, for big enough leaves.
  assert specs["head/mlp/layers/0/kernel/value"] == ("data",)  # (24, 16)
  # Ties go to the first dim: (3, 3, 8, 8), 576 elements; (4, 16, 16).
  assert specs["encoder/backbone/convs/1/kernel/value"] == (None, None, "data")
  assert specs["encoder/backbone/attns/0/spatial_prior/value"] == (
      None, "data")
  for key, spec in specs.items():
    size = int(np.prod(shapes[key]))
    if "id_embed" not in key and size < FSDP_MIN_SIZE:
      assert spec == (), (key, shapes[key], spec)  # small: replicated
    if "data" in spec:
      assert size >= FSDP_MIN_SIZE and shapes[key][spec.index("data")] % 4 == 0
  assert res["dp4_mp2"]["devices"] == 8


def test_sharding_table_by_rule():
  # The rules read only the axis sizes, so no devices are needed.
  mesh = types.SimpleNamespace(shape={"data": 4, "model": 2})

  def spec(path, shape, shard=True, fsdp=True, min_size=1024,
           axes=("model",)):
    return mesh_lib.partition_spec(tuple(path.split("/")), shape, mesh, shard,
                                   fsdp, min_size, axes)

  table = "params/id_embed/user_id/embedding"
  slot = "embed_opt/accumulator/" + table[7:]
  assert spec(table, (1000, 16)) == P("model", None)
  assert spec(slot, (1000, 16)) == P("model", None)  # follows its table
  assert spec(slot, (1000,)) == P("model")  # a row-wise accumulator too
  assert spec(table, (1000, 16), shard=False) == P("data", None)  # FSDP
  assert spec(table, (1000, 16), shard=False, fsdp=False) == P()
  # Over every device, by mesh.embedding_axes.
  assert spec(table, (1000, 16), axes=("data", "model")) == P(
      ("data", "model"), None)
  # Rows that do not split are an error, never a silent replication.
  with pytest.raises(ValueError, match="table_row_multiple"):
    spec(table, (1001, 16))
  kernel = "params/head/mlp/layers/0/kernel"
  assert spec(kernel, (96, 4096)) == P(None, "data")  # the largest dim
  assert spec(kernel, (512, 512)) == P("data", None)  # ties: the first
  assert spec(kernel, (1001, 999)) == P()  # nothing divides over 'data'
  assert spec(kernel, (16, 32)) == P()  # under fsdp_min_size
  assert spec(kernel, (96, 4096), fsdp=False) == P()
  assert spec("params/encoder/embedding", (1000, 16)) == P("data", None)
