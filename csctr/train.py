"""Training and evaluation loop: jit on a device mesh, exact resume, full-split evals.

`train_and_evaluate(config, workdir)` is the whole experiment; main.py only
parses flags. The loop is functional: the nnx model is split once into a
static graphdef and a state pytree, and a jitted step maps (state, batch) to
(state, metrics), so each step costs one dispatch (no nnx.jit graph traversal).

Sections: mesh, data, model and optimizer, step, restore, evals, loop.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tensorboardX import SummaryWriter

from csctr import batch as batch_lib
from csctr import checkpointing
from csctr import input_pipeline
from csctr import metrics as metrics_lib
from csctr import models
from csctr import optim
from csctr import prepare as prepare_lib

State = dict[str, Any]
METRICS_FILE = "eval_metrics.jsonl"
# The run's config and DataInfo, written at every start: what restore_model
# (export, serving) needs to rebuild the model without the config file or
# the prepared dataset.
CONFIG_FILE = "config.json"
DATA_INFO_FILE = "data_info.json"

# ---------------------------------------------------------------- mesh


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
  return jax.make_mesh(tuple(shape), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:used] if used < n else None)


# The sharding table: (path regex, config.mesh switch, spec), first match
# wins. A leaf's path is its key path joined by '/', e.g.
# 'params/id_embed/user_id/embedding'; optimizer slots end with their
# parameter's path ('opt_state/.../sum_of_squares/id_embed/user_id/embedding'),
# so they always follow their parameter. A rule is skipped when its switch is
# off or its spec does not split the leaf evenly (XLA needs even shards), so
# e.g. a table whose rows do not divide over 'model' falls through.
FSDP = "fsdp"  # spec placeholder: the largest dim that divides over 'data'
SHARDING_RULES: tuple[tuple[str, str | None, P | str], ...] = (
    # ID tables: rows over 'model' (the large, sparsely updated part).
    (r"(^|/)id_embed/[^/]+/embedding$", "shard_embeddings", P("model", None)),
    # Dense leaves of at least mesh.fsdp_min_size elements: FSDP over 'data'.
    (r"", "fsdp", FSDP),
    # Everything else: replicated (plain data parallelism).
    (r"", None, P()),
)
FSDP_MIN_SIZE = 1 << 18  # elements (1 MiB in f32): smaller leaves replicate


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


def _divides(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> bool:
  if len(spec) > len(shape):
    return False
  return all(axis is None or shape[i] % mesh.shape[axis] == 0
             for i, axis in enumerate(spec))


def partition_spec(path: tuple[Any, ...], shape: tuple[int, ...],
                   mesh: jax.sharding.Mesh, shard_embeddings: bool,
                   fsdp: bool = False, fsdp_min_size: int = FSDP_MIN_SIZE) -> P:
  """The spec of one train-state leaf (params and optimizer slots), by SHARDING_RULES."""
  name = "/".join(str(k) for k in path)
  switches = {"shard_embeddings": shard_embeddings, "fsdp": fsdp}
  for pattern, switch, spec in SHARDING_RULES:
    if switch is not None and not switches[switch]:
      continue
    if not re.search(pattern, name):
      continue
    if spec == FSDP:
      spec = _fsdp_spec(tuple(shape), mesh, fsdp_min_size)
    if spec is not None and _divides(spec, tuple(shape), mesh):
      return spec
  return P()


def state_shardings(abstract: State, mesh: jax.sharding.Mesh,
                    shard_embeddings: bool, fsdp: bool = False,
                    fsdp_min_size: int = FSDP_MIN_SIZE) -> State:
  return jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, partition_spec(
          optim.key_path_to_tuple(p), x.shape, mesh, shard_embeddings, fsdp,
          fsdp_min_size)),
      abstract)


def mesh_shardings(abstract: State, mesh: jax.sharding.Mesh,
                   config: ml_collections.ConfigDict) -> State:
  """state_shardings with the switches of config.mesh."""
  m = config.mesh
  return state_shardings(abstract, mesh, m.shard_embeddings,
                         m.get("fsdp", False),
                         m.get("fsdp_min_size", FSDP_MIN_SIZE))


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


# ---------------------------------------------------------------- data


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


def prepare_data(config: ml_collections.ConfigDict) -> str:
  """Prepares the dataset once per run, not once per process.

  Process 0 prepares first; the others wait at a barrier, then find the
  shared cache (a shared filesystem) or prepare their own copy (local disks,
  as on TPU VMs). Concurrent preparers would be safe (prepare renames a
  finished directory into place) but would redo the same work.
  """
  if jax.process_count() == 1:
    return input_pipeline.prepare_dataset(config)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  path = input_pipeline.prepare_dataset(config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("csctr:prepare_dataset")
  return path or input_pipeline.prepare_dataset(config)


def global_batch(local: dict[str, np.ndarray],
                 sharding: NamedSharding) -> dict[str, jax.Array]:
  """One global batch from every process's local part (rows on 'data').

  Image-row indices are local to a process's image table; the global table
  stacks the processes' tables in process order, so they are offset here.
  """
  if jax.process_count() > 1:
    offset = jax.process_index() * local["images"].shape[0]
    local = dict(local)
    for key in ("ad_image", "behavior_images"):
      if key in local:
        local[key] = local[key] + np.int32(offset)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


# ---------------------------------------------------------------- model and optimizer


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  frozen = models.is_encoder_param if config.model.late_fusion else None
  return optim.make_optimizer(config.optim, config.num_train_steps,
                              models.param_label, frozen=frozen)


def make_init_fn(config: ml_collections.ConfigDict, info: batch_lib.DataInfo,
                 tx: optax.GradientTransformation) -> Callable[[], State]:
  """The train state as a function of nothing, so it can be traced abstractly.

  Keys: params (nnx.Param state), rest (other nnx variables), opt_state, step,
  rng (key data of the base PRNG key: no layer draws randomness today, but a
  checkpointed key keeps resume exact once one does).
  """

  def init() -> State:
    model = models.build_model(config.model, info, nnx.Rngs(config.seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {"params": params, "rest": rest, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(config.seed))}

  return init


def init_state(init_fn: Callable[[], State], shardings: State) -> State:
  """Runs init_fn once, each leaf created directly in its shards.

  No full copy ever sits on one device. On CPU the init program (threefry
  for every parameter) is compiled without LLVM optimisation: it runs once,
  and optimising it took longer than the training step's compile.
  """
  lowered = jax.jit(init_fn, out_shardings=shardings).lower()
  options = ({"xla_backend_optimization_level": 0}
             if jax.default_backend() == "cpu" else None)
  return lowered.compile(compiler_options=options)()


def make_graphdef(config: ml_collections.ConfigDict,
                  info: batch_lib.DataInfo) -> nnx.GraphDef:
  abstract_model = nnx.eval_shape(
      lambda: models.build_model(config.model, info, nnx.Rngs(config.seed)))
  return nnx.split(abstract_model, nnx.Param, ...)[0]


# ---------------------------------------------------------------- step


def bce_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Sigmoid cross entropy averaged over real impressions (padding weighs 0)."""
  w = batch["weight"]
  loss = optax.sigmoid_binary_cross_entropy(logits, batch["label"])
  total = jnp.sum(w)
  return jnp.sum(w * loss) / jnp.where(total > 0, total, 1.0)


def bpr_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Pairwise BPR (Rendle et al.; the DVBPR/CSCNN Amazon protocol).

  Pairing: each real positive i is paired with every real negative j of the
  same user in the batch; a positive whose user has no negative in the batch
  is paired with all negatives of the batch (uniform in-batch negatives, as
  BPR's sampled negative items). loss_i = mean_j -log sigmoid(s_i - s_j);
  the batch loss is the weighted mean over positives that have a pair.
  """
  w = batch["weight"]
  real = w > 0
  pos = real & (batch["label"] > 0.5)
  neg = real & (batch["label"] <= 0.5)
  pair = pos[:, None] & neg[None, :]
  same_user = pair & (batch["user_id"][:, None] == batch["user_id"][None, :])
  pair = jnp.where(jnp.any(same_user, axis=1, keepdims=True), same_user, pair)
  pair_w = jnp.where(pair, w[None, :], 0.0)
  nll = -jax.nn.log_sigmoid(logits[:, None] - logits[None, :])
  per_pos = (jnp.sum(pair_w * nll, axis=1)
             / jnp.maximum(jnp.sum(pair_w, axis=1), 1e-9))
  pos_w = jnp.where(jnp.any(pair, axis=1), w, 0.0)
  total = jnp.sum(pos_w)
  return jnp.sum(pos_w * per_pos) / jnp.where(total > 0, total, 1.0)


LOSSES = {"bce": bce_loss, "bpr": bpr_loss}


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_fn: Callable[..., jax.Array],
                    schedule: optax.Schedule):
  """(state, batch) -> (state, metrics); pure, so jit can donate the state."""

  def step(state: State, batch: dict[str, jax.Array]):
    def objective(params):
      model = nnx.merge(graphdef, params, state["rest"])
      loss = loss_fn(model(batch), batch)
      return loss, nnx.state(model, nnx.Not(nnx.Param))

    (loss, rest), grads = jax.value_and_grad(objective, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = dict(state, params=optax.apply_updates(state["params"], updates),
                     rest=rest, opt_state=opt_state, step=state["step"] + 1)
    step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                    "impressions": jnp.sum(batch["weight"] > 0),
                    "learning_rate": schedule(state["step"])}
    return new_state, step_metrics

  return step


def make_eval_step(graphdef: nnx.GraphDef):
  """(state, batch) -> logits and the fields metrics need, all replicated."""

  def step(state: State, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, state["params"], state["rest"])
    out = {k: batch[k] for k in ("label", "weight", "user_id", "is_cold")}
    out["logits"] = model(batch)
    return out

  return step


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted train and eval steps of a config on a mesh, with their state.

  The one place the step is built: the training loop and
  benchmarks/throughput.py both use it, so the benchmark times exactly the
  program the trainer runs.

  Attributes:
    train_step: jitted (state, batch) -> (state, metrics); donates state.
    eval_step: jitted (state, batch) -> logits and label fields, replicated.
    init_fn: () -> train state (trace it, or run it with init_state).
    abstract: ShapeDtypeStructs of the train state.
    shardings: NamedShardings of the train state (the sharding table's).
    data_sharding: batch rows over 'data'.
  """

  train_step: Any
  eval_step: Any
  init_fn: Callable[[], State]
  abstract: State
  shardings: State
  data_sharding: NamedSharding


def build_steps(config: ml_collections.ConfigDict, info: batch_lib.DataInfo,
                mesh: jax.sharding.Mesh) -> Steps:
  """Optimizer, model and sharded, jitted steps for `config` on `mesh`."""
  tx = make_optimizer(config)
  graphdef = make_graphdef(config, info)
  init_fn = make_init_fn(config, info, tx)
  abstract = jax.eval_shape(init_fn)
  shardings = mesh_shardings(abstract, mesh, config)
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  train_step = jax.jit(
      make_train_step(graphdef, tx, LOSSES[config.loss],
                      optim.dense_schedule(config.optim, config.num_train_steps)),
      in_shardings=(shardings, data_sharding),
      out_shardings=(shardings, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef),
                      in_shardings=(shardings, data_sharding),
                      out_shardings=replicated)
  return Steps(train_step, eval_step, init_fn, abstract, shardings,
               data_sharding)


# ---------------------------------------------------------------- restore


def read_eval_log(workdir: str) -> list[dict[str, Any]]:
  """The evals logged so far; a line cut short by a kill is skipped."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  entries = []
  with open(path) as f:
    for line in f:
      try:
        entries.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("skipping a partial line of %s: %r", path, line)
  return entries


def truncate_eval_log(workdir: str, last_step: int) -> None:
  """Drops evals after the restored step: the resumed run redoes them.

  A run killed between an eval and the next checkpoint would otherwise log
  that eval twice.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  keep = [e for e in read_eval_log(workdir) if e["step"] <= last_step]
  # Rewritten whole (it is small), which also drops a line a kill cut short.
  with open(path + ".tmp", "w") as f:
    f.writelines(json.dumps(e) + "\n" for e in keep)
  os.replace(path + ".tmp", path)  # atomic: a kill here loses nothing


def _write_json_atomic(path: str, obj: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(path + ".tmp", path)


def save_run_files(workdir: str, config: ml_collections.ConfigDict,
                   info: batch_lib.DataInfo, data_path: str) -> None:
  """Writes WORKDIR/config.json and data_info.json (+ the dataset path)."""
  _write_json_atomic(os.path.join(workdir, CONFIG_FILE),
                     json.loads(config.to_json_best_effort()))
  _write_json_atomic(os.path.join(workdir, DATA_INFO_FILE),
                     {**prepare_lib.info_to_json(info), "data_path": data_path})


def load_run_files(workdir: str) -> tuple[ml_collections.ConfigDict,
                                          batch_lib.DataInfo, str]:
  """(config, info, prepared dataset path) of the run in `workdir`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: was {workdir} written by "
                            "train.train_and_evaluate?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(os.path.join(workdir, DATA_INFO_FILE)) as f:
    d = json.load(f)
  info = batch_lib.DataInfo(
      sparse_features=tuple(d["sparse_features"]),
      vocab_sizes=tuple(d["vocab_sizes"]), num_dense=d["num_dense"],
      num_categories=d["num_categories"], image_size=d["image_size"],
      num_behaviors=d["num_behaviors"], bayes_auc=d["bayes_auc"],
      extras=d["extras"])
  return config, info, d["data_path"]


def restore_model(workdir: str, step: int | None = None
                  ) -> tuple[models.CTRModel, ml_collections.ConfigDict,
                             batch_lib.DataInfo, int]:
  """(model, config, info, step) of a checkpoint (default: the latest).

  For inference on this process's first device: only params and the other
  model variables are read, not the optimizer state.
  """
  config, info, _ = load_run_files(workdir)
  abstract_model = nnx.eval_shape(
      lambda: models.build_model(config.model, info, nnx.Rngs(config.seed)))
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      {"params": params, "rest": rest})
  restored, step = checkpointing.restore_items(
      os.path.join(workdir, "checkpoints"), abstract, step)
  model = nnx.merge(graphdef, restored["params"], restored["rest"])
  return model, config, info, step


def init_encoder_from(state: State, shardings: State, source_workdir: str
                      ) -> State:
  """A fresh state whose image-encoder params come from another run.

  config.model.encoder_init names that run's workdir; its latest checkpoint
  must hold the same parameter tree (same model config up to late_fusion).
  With late_fusion this is the papers' "late fusion" baseline done honestly:
  a CNN trained elsewhere (e.g. attention=none end to end on the same train
  split), then frozen, rather than a frozen random CNN. Only params are read;
  the head, ID tables and optimizer state stay freshly initialised.
  """
  abstract = {"params": checkpointing.abstract_with_shardings(
      state["params"], shardings["params"])}
  restored, step = checkpointing.restore_items(
      os.path.join(source_workdir, "checkpoints"), abstract)
  logging.info("image encoder initialised from %s step %d", source_workdir,
               step)
  params = jax.tree_util.tree_map_with_path(
      lambda path, new, old: new if models.is_encoder_param(
          optim.key_path_to_tuple(path)) else old,
      restored["params"], state["params"])
  return dict(state, params=params)


# ---------------------------------------------------------------- evals


def evaluate(eval_step, state: State, config: ml_collections.ConfigDict,
             data_path: str, info: batch_lib.DataInfo, sharding: NamedSharding,
             split: str = "test") -> dict[str, Any]:
  """Metrics over the whole split: predictions are collected, then scored once."""
  collector = metrics_lib.Collector()
  for local in input_pipeline.eval_batches(
      config, data_path, split=split, process_index=jax.process_index(),
      process_count=jax.process_count()):
    out = jax.device_get(eval_step(state, global_batch(local, sharding)))
    collector.add(out["logits"], out)
  return collector.compute(info.bayes_auc)


def write_eval(workdir: str, writer: SummaryWriter | None, step: int,
               split: str, values: dict[str, Any]) -> dict[str, Any]:
  record = {"step": step, "split": split,
            **metrics_lib.json_safe(values)}
  logging.info("eval %s step %d: %s", split, step, " ".join(
      f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
      for k, v in values.items()))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, METRICS_FILE), "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in values.items():
      if isinstance(v, (int, float)) and v == v:
        writer.add_scalar(f"{split}/{k}", v, step)
    writer.flush()
  return record


# ---------------------------------------------------------------- loop


class _Progress:
  """Deferred loss checks and progress lines.

  Step metrics stay on device until a log, eval or checkpoint boundary, so
  the host never waits on a step it just dispatched; every boundary checks all
  steps since the last one, before anything is saved.
  """

  def __init__(self, start_step: int, total: int, writer):
    self.pending: list[tuple[int, dict[str, jax.Array]]] = []
    self.total, self.writer = total, writer
    self.t0, self.s0 = time.perf_counter(), start_step

  def flush(self, log: bool) -> None:
    if not self.pending:
      return
    values = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending = []
    for s, v in zip(steps, values):
      if not (np.isfinite(v["loss"]) and np.isfinite(v["grad_norm"])):
        raise FloatingPointError(
            f"non-finite loss at step {s} (loss={v['loss']}, "
            f"grad_norm={v['grad_norm']}); the last checkpoint is the last "
            "good state")
    if not log:
      return
    step = steps[-1]
    dt = max(time.perf_counter() - self.t0, 1e-9)
    rate = sum(int(v["impressions"]) for v in values) / dt
    steps_per_s = (step - self.s0) / dt
    eta = (self.total - step) / max(steps_per_s, 1e-9)
    loss = float(np.mean([v["loss"] for v in values]))
    lr = float(values[-1]["learning_rate"])
    logging.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e | %.0f "
                 "impressions/s, %.2f steps/s, ETA %.0fs", step, self.total,
                 loss, float(values[-1]["grad_norm"]), lr, rate, steps_per_s,
                 eta)
    if self.writer is not None:
      for k, v in (("loss", loss), ("impressions_per_sec", rate),
                   ("learning_rate", lr),
                   ("grad_norm", float(values[-1]["grad_norm"]))):
        self.writer.add_scalar(f"train/{k}", v, step)
    self.restart(step)

  def restart(self, step: int) -> None:
    """Starts a new timing window (after evals and saves, which aren't steps)."""
    self.t0, self.s0 = time.perf_counter(), step


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains config's model, evaluating and checkpointing; resumes from workdir.

  Returns the final eval record (step, split, auc, gauc, logloss,
  calibration, cold_auc, bayes_auc when known).
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(config)
  check_batch_divides(config, mesh)
  data_sharding = NamedSharding(mesh, P("data"))
  data_path = prepare_data(config)
  info = input_pipeline.load_info(data_path)
  logging.info("mesh %s; dataset %s: %s", dict(mesh.shape), data_path, info)
  if jax.process_index() == 0:
    save_run_files(workdir, config, info, data_path)

  steps = build_steps(config, info, mesh)
  init_fn, abstract, shardings = steps.init_fn, steps.abstract, steps.shardings
  train_step, eval_step = steps.train_step, steps.eval_step
  num_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))
  logging.info("model: %d parameters", num_params)
  log_shardings(abstract["params"], shardings["params"])

  train_iter = input_pipeline.train_iterator(
      config, data_path, process_index=jax.process_index(),
      process_count=jax.process_count())
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    keep=config.keep_checkpoints)
  start_step = ckpt.latest_step() or 0
  if start_step:
    state = ckpt.restore(start_step, checkpointing.abstract_with_shardings(
        abstract, shardings), train_iter)
  else:
    state = init_state(init_fn, shardings)
    if config.model.get("encoder_init"):
      state = init_encoder_from(state, shardings, config.model.encoder_init)
  if jax.process_index() == 0:
    truncate_eval_log(workdir, start_step)
  writer = (SummaryWriter(workdir, purge_step=start_step + 1 if start_step
                          else None) if jax.process_index() == 0 else None)

  total = config.num_train_steps
  progress = _Progress(start_step, total, writer)
  record = None
  try:
    for step in range(start_step + 1, total + 1):
      local = next(train_iter)
      state, step_metrics = train_step(state, global_batch(local, data_sharding))
      progress.pending.append((step, step_metrics))
      last = step == total
      if (config.log_every and step % config.log_every == 0) or last:
        progress.flush(log=True)
      # Eval before checkpoint: a committed checkpoint at step s implies the
      # eval of step s is logged, so a resume from s never skips it.
      if (config.eval_every and step % config.eval_every == 0) or last:
        progress.flush(log=False)
        record = write_eval(workdir, writer, step, "test", evaluate(
            eval_step, state, config, data_path, info, data_sharding))
        progress.restart(step)
      if (config.checkpoint_every and step % config.checkpoint_every == 0
          or last):
        progress.flush(log=False)  # never save a state after a bad step
        ckpt.save(step, state, train_iter)
        progress.restart(step)
  finally:
    ckpt.wait()  # a good checkpoint in flight is committed even on error
    ckpt.close()
    if writer is not None:
      writer.close()

  if record is None:
    # Nothing left to train: the run was complete. Every process evaluates
    # (the eval is collective, and only process 0 may see the log file);
    # the result is the logged final eval, bit for bit, and is not re-logged.
    values = evaluate(eval_step, state, config, data_path, info, data_sharding)
    record = {"step": total, "split": "test",
              **metrics_lib.json_safe(values)}
    if jax.process_index() == 0 and record not in read_eval_log(workdir):
      with SummaryWriter(workdir) as writer:
        write_eval(workdir, writer, total, "test", values)
  return record
