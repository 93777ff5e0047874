"""The device mesh and where every array lives on it.

A ('data', 'model') mesh; SHARDING_RULES map each train-state leaf (params
and optimizer slots) to a PartitionSpec; data_shards says which blocks of a
global batch this process's devices hold, and global_batch places them.
"""

from __future__ import annotations

import re
from typing import Any

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from csctr.data import batch as batch_lib
from csctr.training import optim

State = dict[str, Any]


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """('data', 'model') mesh over all devices; -1 in config.mesh.shape fills."""
  shape = list(config.mesh.shape)
  n = jax.device_count()
  if shape.count(-1) > 1:
    raise ValueError(f"at most one -1 in mesh.shape={shape}")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = n // rest
  used = int(np.prod(shape))
  if used > n or (-1 in config.mesh.shape and used != n):
    raise ValueError(f"mesh.shape={tuple(config.mesh.shape)} does not fit "
                     f"{n} devices")
  # A mesh on fewer devices than present (e.g. (1, 1) as a reference run)
  # takes the first ones. Auto axes: XLA propagates shardings through the
  # model code, which needs no annotations of its own.
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  if config.mesh.model_across_processes:
    # Consecutive devices (one process's) go along 'data', so each 'model'
    # group spans processes: the layout for ID tables larger than one host,
    # where the hosts of a 'model' group feed identical data blocks.
    grid = np.array(jax.devices()[:used], dtype=object).reshape(
        shape[1], shape[0]).T
    return jax.sharding.Mesh(grid, ("data", "model"), axis_types=axis_types)
  return jax.make_mesh(tuple(shape), ("data", "model"), axis_types=axis_types,
                       devices=jax.devices()[:used] if used < n else None)


# The sharding table: (path regex, config.mesh switch, spec), first match
# wins. A leaf's path is its key path joined by '/', e.g.
# 'params/id_embed/user_id/embedding'; optimizer slots end with their
# parameter's path ('opt_state/.../sum_of_squares/id_embed/user_id/embedding'),
# so they always follow their parameter; so do the ID tables' slots
# ('embed_opt/accumulator/id_embed/user_id/embedding'). A rule is skipped when
# its switch is off or, for FSDP, its spec does not split the leaf evenly (XLA
# needs even shards). A table whose rows do not split is an error instead:
# replicating it silently would cost every device the whole table.
FSDP = "fsdp"  # spec placeholder: the largest dim that divides over 'data'
ROWS = "rows"  # spec placeholder: dim 0 over mesh.embedding_axes
SHARDING_RULES: tuple[tuple[str, str | None, P | str], ...] = (
    # ID tables and their slots: rows over mesh.embedding_axes (the large,
    # sparsely updated part).
    (r"(^|/)id_embed/[^/]+/embedding$", "shard_embeddings", ROWS),
    # Dense leaves of at least mesh.fsdp_min_size elements: FSDP over 'data'.
    (r"", "fsdp", FSDP),
    # Everything else: replicated (plain data parallelism).
    (r"", None, P()),
)


def _fsdp_spec(shape: tuple[int, ...], mesh: jax.sharding.Mesh,
               min_size: int) -> P | None:
  """Largest dim that splits evenly over 'data'; None if none or too small.

  Small leaves stay replicated: gathering them every step costs more
  latency than their copies cost memory.
  """
  d = mesh.shape["data"]
  if d == 1 or int(np.prod(shape)) < min_size:
    return None
  dims = [i for i in range(len(shape)) if shape[i] % d == 0]
  if not dims:
    return None
  spec = [None] * len(shape)
  spec[max(dims, key=lambda i: shape[i])] = "data"  # ties: the first dim
  return P(*spec)


def axis_size(mesh: jax.sharding.Mesh, axes: str | tuple[str, ...]) -> int:
  """Devices along one mesh axis or the product of several."""
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def _divides(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> bool:
  if len(spec) > len(shape):
    return False
  return all(axis is None or shape[i] % axis_size(mesh, axis) == 0
             for i, axis in enumerate(spec))


def _rows_spec(name: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh,
               axes: tuple[str, ...]) -> P:
  """Dim 0 over `axes`; an error when the rows do not split evenly."""
  spec = P(axes[0] if len(axes) == 1 else tuple(axes),
           *[None] * (len(shape) - 1))
  if not _divides(spec, shape, mesh):
    n = axis_size(mesh, tuple(axes))
    raise ValueError(
        f"{name}: {shape[0]} rows do not split over the {n} devices of mesh "
        f"axes {tuple(axes)}; make model.table_row_multiple a multiple of "
        f"{n} (tables are padded to it)")
  return spec


def partition_spec(path: tuple[Any, ...], shape: tuple[int, ...],
                   mesh: jax.sharding.Mesh, shard_embeddings: bool,
                   fsdp: bool, fsdp_min_size: int,
                   embedding_axes: tuple[str, ...]) -> P:
  """The spec of one train-state leaf (params and optimizer slots), by SHARDING_RULES."""
  name = "/".join(str(k) for k in path)
  switches = {"shard_embeddings": shard_embeddings, "fsdp": fsdp}
  for pattern, switch, spec in SHARDING_RULES:
    if switch is not None and not switches[switch]:
      continue
    if not re.search(pattern, name):
      continue
    if spec == ROWS:
      return _rows_spec(name, tuple(shape), mesh, tuple(embedding_axes))
    if spec == FSDP:
      spec = _fsdp_spec(tuple(shape), mesh, fsdp_min_size)
    if spec is not None and _divides(spec, tuple(shape), mesh):
      return spec
  return P()


def state_shardings(abstract: State, mesh: jax.sharding.Mesh,
                    shard_embeddings: bool, fsdp: bool,
                    fsdp_min_size: int,
                    embedding_axes: tuple[str, ...]) -> State:
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, partition_spec(
          optim.key_path_to_tuple(p), x.shape, mesh, shard_embeddings, fsdp,
          fsdp_min_size, embedding_axes)),
      abstract)


def mesh_shardings(abstract: State, mesh: jax.sharding.Mesh,
                   config: ml_collections.ConfigDict) -> State:
  """state_shardings with the switches of config.mesh."""
  m = config.mesh
  return state_shardings(abstract, mesh, m.shard_embeddings,
                         m.fsdp, m.fsdp_min_size, tuple(m.embedding_axes))


def log_shardings(abstract_params: Any, shardings: Any) -> None:
  """One line per partitioned parameter, so a run's placement is on record."""
  replicated = 0
  for (path, x), s in zip(
      jax.tree_util.tree_flatten_with_path(abstract_params)[0],
      jax.tree.leaves(shardings)):
    if all(a is None for a in s.spec):
      replicated += 1
    else:
      logging.info("sharding %s %s -> %s", "/".join(
          map(str, optim.key_path_to_tuple(path))), tuple(x.shape), s.spec)
  logging.info("sharding: %d parameter arrays replicated", replicated)


def check_batch_divides(config: ml_collections.ConfigDict,
                        mesh: jax.sharding.Mesh) -> None:
  """Fail early (not deep in XLA) when a batch axis does not split evenly."""
  d = mesh.shape["data"]
  k = config.data.group_size
  sizes = {"groups_per_batch * group_size": config.data.groups_per_batch * k,
           "unique_images": config.data.unique_images,
           "eval_groups_per_batch * group_size":
               config.data.eval_groups_per_batch * k,
           "eval_unique_images": config.data.eval_unique_images}
  for name, size in sizes.items():
    if size % d:
      raise ValueError(f"{name}={size} is not divisible by the {d} devices "
                       "of mesh axis 'data'")


def _blocks(sharding: NamedSharding) -> int:
  """How many row blocks dim 0 of `sharding` splits into."""
  axes = sharding.spec[0] if len(sharding.spec) else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def data_shards(sharding: NamedSharding) -> batch_lib.Shards:
  """The blocks of a global batch that this process's devices hold.

  Read off the sharding itself (block j of D goes to the devices whose
  index along dim 0 is j), so it is right for any device order and when
  'model' spans processes: each replica's process builds the same blocks.
  """
  count = _blocks(sharding)
  index = sharding.addressable_devices_indices_map((count,))
  return batch_lib.Shards(count, tuple(sorted(
      {s[0].start or 0 for s in index.values()})))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding,
                 shards: batch_lib.Shards | None = None
                 ) -> dict[str, jax.Array]:
  """One global batch from this process's blocks of it (rows on 'data').

  `local` holds this process's `shards` (default: data_shards(sharding)),
  concatenated; each addressable device gets its block's rows.
  """
  shards = shards or data_shards(sharding)
  out = {}
  for key, value in local.items():
    per = value.shape[0] // len(shards.local)
    shape = (per * shards.count, *value.shape[1:])
    devices, parts = [], []
    for device, index in sharding.addressable_devices_indices_map(
        shape).items():
      p = shards.local.index((index[0].start or 0) // per)
      devices.append(device)
      parts.append(value[p * per:(p + 1) * per])
    out[key] = jax.make_array_from_single_device_arrays(
        shape, sharding, jax.device_put(parts, devices))
  return out
