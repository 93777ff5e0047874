"""No table-sized collective in the compiled train step, on 8 fake devices.

The ID tables must cost O(rows a batch touches) in communication as well as
in compute: under data parallelism only the batch's ids and the touched
rows' gradients may cross devices, and row-sharded tables must be looked up
and updated where their rows live, never all-gathered. One subprocess (8 fake
CPU devices exist only in a fresh process) compiles the trainer's own train
and eval steps (steps.build_steps) for three meshes and lists every
collective of their HLO; the test fails on any whose data is table-sized.
Compiling needs no data: the state and the batch are abstract.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = 100_000  # user_id and item_id rows: far above any batch-sized array

_SCRIPT = r"""
import json, re, sys
import jax
import numpy as np
from configs import tiny
from csctr.data import batch as batch_lib
from csctr.training import mesh as mesh_lib
from csctr.training import steps as steps_lib

rows = int(sys.argv[1])
# Tables drawn row by row in small chunks (as a 10^8-row table is), so the
# init program's memory and collectives can be checked at this size.
from csctr.model import embeddings
embeddings.ONE_SHOT_ENTRIES, embeddings.CHUNK_ENTRIES = 0, 1 << 14
COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|all-to-all|reduce-scatter|"
    r"collective-permute|collective-broadcast)(-start)?\(")
SHAPE = re.compile(r"[a-z]+[0-9]*\[([0-9,]*)\]")


def collectives(hlo):
  # (kind, [shape, ...]) of every collective instruction's result.
  out = []
  for line in hlo.splitlines():
    m = COLLECTIVE.search(line)
    if m:
      shapes = [[int(d) for d in s.split(",") if d]
                for s in SHAPE.findall(m.group(1))]
      out.append((m.group(2), shapes))
  return out


def abstract(tree, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


results = {}
c = tiny.get_config()
c.model.use_image = False  # the CNN has nothing table-sized; it only compiles
info = batch_lib.DataInfo(("user_id", "item_id", "category_id", "position"),
                          (rows, rows, 4, 11), 0, 4, 16)
for name, shape, shard, axes, opt in [
    ("dp8", (8, 1), False, ("model",), "rowwise_adagrad"),
    ("dp4_mp2", (4, 2), True, ("model",), "adagrad"),
    ("all8", (4, 2), True, ("data", "model"), "lazy_adam")]:
  c.mesh.shape, c.mesh.shard_embeddings = shape, shard
  c.mesh.embedding_axes = axes
  c.optim.embed_optimizer = opt
  mesh = mesh_lib.make_mesh(c)
  steps = steps_lib.build_steps(c, info, mesh)
  local = batch_lib.dummy_batch(info, c.data.groups_per_batch,
                                c.data.group_size, c.data.unique_images)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                   sharding=steps.data_sharding)
           for k, v in local.items()}
  state = abstract(steps.abstract, steps.shardings)
  table = steps.shardings["params"]["id_embed"]["item_id"]["embedding"]
  init = jax.jit(steps.init_fn, out_shardings=steps.shardings).lower().compile()
  drawn = init()["params"]["id_embed"]["item_id"]["embedding"].get_value()
  results[name] = {
      "table_spec": [str(a) for a in table.get_value().spec],
      "init": collectives(init.as_text()),
      "init_temp_bytes": init.memory_analysis().temp_size_in_bytes,
      "table_shard_bytes": drawn.addressable_shards[0].data.nbytes,
      "table_sum": float(np.asarray(drawn, np.float64).sum()),
      "table_head": np.asarray(drawn[:3]).tolist(),
      "train": collectives(
          steps.train_step.lower(state, batch).compile().as_text()),
      "eval": collectives(
          steps.eval_step.lower(state, batch).compile().as_text())}

# The control: a dense table gradient under data parallelism, as the step
# had before the engine, must be caught by the same scan.
mesh = mesh_lib.make_mesh(c)
rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
dense = jax.jit(lambda t, i: jax.grad(lambda t: (t[i] ** 2).sum())(t),
                in_shardings=(rep, data), out_shardings=rep)
results["control"] = {"train": collectives(dense.lower(
    jax.ShapeDtypeStruct((rows, 4), np.float32, sharding=rep),
    jax.ShapeDtypeStruct((32,), np.int32, sharding=data)).compile().as_text())}
with open(sys.argv[2], "w") as f:
  json.dump(results, f)
"""


@pytest.fixture(scope="module")
def hlo_collectives(tmp_path_factory):
  out = tmp_path_factory.mktemp("hlo") / "collectives.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(ROWS), str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(out.read_text())


def _table_sized(entries, devices=8):
  """Collectives moving at least one device's share of a table's rows."""
  limit = ROWS // devices
  return [(kind, shapes) for kind, shapes in entries
          if any(max(s, default=0) >= limit for s in shapes)]


def test_the_scan_catches_a_dense_table_gradient(hlo_collectives):
  caught = _table_sized(hlo_collectives["control"]["train"])
  assert caught and caught[0][0] == "all-reduce", hlo_collectives["control"]


@pytest.mark.parametrize("mesh", ["dp8", "dp4_mp2", "all8"])
@pytest.mark.parametrize("step", ["train", "eval"])
def test_no_table_sized_collective(hlo_collectives, mesh, step):
  entries = hlo_collectives[mesh][step]
  assert entries, "a multi-device step without any collective?"
  assert not _table_sized(entries), _table_sized(entries)


@pytest.mark.parametrize("mesh", ["dp8", "dp4_mp2", "all8"])
def test_table_init_stays_in_its_shards(hlo_collectives, mesh):
  """Huge tables are drawn in place, each shard its rows (table_init).

  No table-sized collective, temporaries far below a shard, and the same
  values whatever the mesh (replicated dp8 is the single-device draw).
  """
  r = hlo_collectives[mesh]
  assert not _table_sized(r["init"]), _table_sized(r["init"])
  assert r["init_temp_bytes"] < r["table_shard_bytes"] / 2, r
  assert r["table_sum"] == hlo_collectives["dp8"]["table_sum"]
  assert r["table_head"] == hlo_collectives["dp8"]["table_head"]


def test_tables_are_sharded_as_configured(hlo_collectives):
  assert hlo_collectives["dp8"]["table_spec"] == []
  assert hlo_collectives["dp4_mp2"]["table_spec"][0] == "model"
  assert hlo_collectives["all8"]["table_spec"][0] == "('data', 'model')"
