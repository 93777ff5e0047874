"""The train state, the jitted train and eval steps, and how they are built.

The loop is functional: the nnx model is split once into a static graphdef
and a state pytree, and a jitted step maps (state, batch) to (state, metrics),
so each step costs one dispatch (no nnx.jit graph traversal).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import optax

from csctr import rundir
from csctr.data import batch as batch_lib
from csctr.model import ctr
from csctr.model import embeddings
from csctr.training import losses
from csctr.training import mesh as mesh_lib
from csctr.training import optim

State = dict[str, Any]


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """optax for the dense parameters (the ID tables: make_row_optimizer)."""
  frozen = ctr.is_encoder_param if config.model.late_fusion else None
  return optim.make_optimizer(config.optim, config.num_train_steps,
                              frozen=frozen)


def make_row_optimizer(config: ml_collections.ConfigDict
                       ) -> embeddings.RowOptimizer:
  return embeddings.RowOptimizer.from_config(config.optim)


def _is_table(path: tuple[Any, ...], _: Any) -> bool:
  return ctr.param_label(path) == "embed"


def split_tables(params: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(ID tables, dense parameters) of a params state; nnx.merge_state joins."""
  return nnx.split_state(params, _is_table, ...)


def make_init_fn(config: ml_collections.ConfigDict, info: batch_lib.DataInfo,
                 tx: optax.GradientTransformation,
                 row_tx: embeddings.RowOptimizer) -> Callable[[], State]:
  """The train state as a function of nothing, so it can be traced abstractly.

  Keys: params (nnx.Param state: ID tables and dense parameters), rest (other
  nnx variables), opt_state (optax's, of the dense parameters), embed_opt
  (the tables' slots, {slot: tree like the tables}), step, rng (key data of
  the base PRNG key: id dropout draws from it, folded with the step, and
  CNN-F's fc dropout from that key folded with 1, so a resumed run draws the
  same).
  """

  def init() -> State:
    model = ctr.build_model(config.model, info, nnx.Rngs(config.seed))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    tables, dense = split_tables(params)
    return {"params": params, "rest": rest, "opt_state": tx.init(dense),
            "embed_opt": embeddings.init_slots(row_tx, tables),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(config.seed))}

  return init


def init_state(init_fn: Callable[[], State], shardings: State) -> State:
  """Runs init_fn once, each leaf created directly in its shards.

  No full copy ever sits on one device. On CPU the init program (threefry
  for every parameter) of a small state is compiled without LLVM
  optimisation: it runs once, and optimising it took longer than the
  training step's compile. A table drawn row by row (above
  embeddings.ONE_SHOT_ENTRIES) is the other way round: 10^7 rows x 16 took
  42 s unoptimised and 7 s (+ 4 s more compiling) optimised.
  """
  lowered = jax.jit(init_fn, out_shardings=shardings).lower()
  small = all(x.size <= embeddings.ONE_SHOT_ENTRIES
              for x in jax.tree.leaves(lowered.out_info))
  options = ({"xla_backend_optimization_level": 0}
             if jax.default_backend() == "cpu" and small else None)
  return lowered.compile(compiler_options=options)()


def make_graphdef(config: ml_collections.ConfigDict,
                  info: batch_lib.DataInfo) -> nnx.GraphDef:
  abstract_model = nnx.eval_shape(
      lambda: ctr.build_model(config.model, info, nnx.Rngs(config.seed)))
  return nnx.split(abstract_model, nnx.Param, ...)[0]


# ---------------------------------------------------------------- step


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    row_tx: embeddings.RowOptimizer,
                    loss_fn: Callable[..., jax.Array],
                    schedule: optax.Schedule, config: ml_collections.ConfigDict,
                    features: tuple[str, ...]):
  """(state, batch) -> (state, metrics); pure, so jit can donate the state.

  The ID tables are never differentiated: their batch rows are gathered
  once, the loss is differentiated with respect to those rows, and only
  they are updated (csctr/model/embeddings.py). Clipping and the logged
  grad_norm cover the dense gradients and the touched rows' gradients.
  """
  clip_norm = config.optim.clip_norm
  id_dropout = config.model.id_dropout

  def step(state: State, batch: dict[str, jax.Array]):
    tables, dense = split_tables(state["params"])
    sparse = batch["sparse"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]),
                             state["step"])
    if id_dropout > 0:
      sparse = embeddings.drop_ids(sparse, id_dropout, key)
    dropout_rng = jax.random.fold_in(key, 1)  # CNN-F's fc dropout
    found = embeddings.lookup_tables(tables, sparse, batch["weight"], features)

    def objective(dense, id_embeddings):
      model = nnx.merge(graphdef, nnx.merge_state(tables, dense),
                        state["rest"])
      # The model sees the ids it was given (after id dropout), so that a
      # dropped id is OOV everywhere, content back-off included.
      loss = loss_fn(model(dict(batch, sparse=sparse), id_embeddings,
                           dropout_rng=dropout_rng), batch)
      return loss, nnx.state(model, nnx.Not(nnx.Param))

    per_impression = {n: f.rows[f.inverse] for n, f in found.items()}
    (loss, rest), (grads, id_grads) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(dense, per_impression)
    row_grads = {n: embeddings.row_gradients(id_grads[n], found[n])
                 for n in found}
    norm = jnp.sqrt(optax.tree.norm(grads, squared=True)
                    + embeddings.sum_of_squares(row_grads))
    scale = embeddings.clip_scale(norm, clip_norm)
    updates, opt_state = tx.update(jax.tree.map(lambda g: g * scale, grads),
                                   state["opt_state"], dense)
    tables, embed_opt = embeddings.update_tables(
        row_tx, tables, state["embed_opt"], found,
        {n: g * scale for n, g in row_grads.items()}, state["step"] + 1)
    params = nnx.merge_state(tables, optax.apply_updates(dense, updates))
    new_state = dict(state, params=params, rest=rest, opt_state=opt_state,
                     embed_opt=embed_opt, step=state["step"] + 1)
    step_metrics = {"loss": loss, "grad_norm": norm,
                    "impressions": jnp.sum(batch["weight"] > 0),
                    "learning_rate": schedule(state["step"])}
    if "behavior_dropped" in batch:  # DICM: references the budget dropped
      dropped = jnp.sum(batch["behavior_dropped"])
      step_metrics["dropped_behavior_refs"] = dropped
      step_metrics["behavior_refs"] = jnp.sum(batch["behavior_mask"]) + dropped
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
  tx, row_tx = make_optimizer(config), make_row_optimizer(config)
  graphdef = make_graphdef(config, info)
  init_fn = make_init_fn(config, info, tx, row_tx)
  abstract = jax.eval_shape(init_fn)
  shardings = mesh_lib.mesh_shardings(abstract, mesh, config)
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  train_step = jax.jit(
      make_train_step(graphdef, tx, row_tx, losses.LOSSES[config.loss],
                      optim.dense_schedule(config.optim, config.num_train_steps),
                      config, tuple(info.sparse_features)),
      in_shardings=(shardings, data_sharding),
      out_shardings=(shardings, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(graphdef),
                      in_shardings=(shardings, data_sharding),
                      out_shardings=replicated)
  return Steps(train_step, eval_step, init_fn, abstract, shardings,
               data_sharding)


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
  abstract = {"params": rundir.abstract_with_shardings(
      state["params"], shardings["params"])}
  restored, step = rundir.restore_items(
      rundir.checkpoint_dir(source_workdir), abstract)
  logging.info("image encoder initialised from %s step %d", source_workdir,
               step)
  params = jax.tree_util.tree_map_with_path(
      lambda path, new, old: new if ctr.is_encoder_param(
          optim.key_path_to_tuple(path)) else old,
      restored["params"], state["params"])
  return dict(state, params=params)
