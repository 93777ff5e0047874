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
from csctr.training import losses
from csctr.training import mesh as mesh_lib
from csctr.training import optim

State = dict[str, Any]


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  frozen = ctr.is_encoder_param if config.model.late_fusion else None
  return optim.make_optimizer(config.optim, config.num_train_steps,
                              ctr.param_label, frozen=frozen)


def make_init_fn(config: ml_collections.ConfigDict, info: batch_lib.DataInfo,
                 tx: optax.GradientTransformation) -> Callable[[], State]:
  """The train state as a function of nothing, so it can be traced abstractly.

  Keys: params (nnx.Param state), rest (other nnx variables), opt_state, step,
  rng (key data of the base PRNG key; step s's dropout key is fold_in(rng,
  s), so a resumed run draws the same masks).
  """

  def init() -> State:
    model = ctr.build_model(config.model, info, nnx.Rngs(config.seed))
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
      lambda: ctr.build_model(config.model, info, nnx.Rngs(config.seed)))
  return nnx.split(abstract_model, nnx.Param, ...)[0]


# ---------------------------------------------------------------- step


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    loss_fn: Callable[..., jax.Array],
                    schedule: optax.Schedule):
  """(state, batch) -> (state, metrics); pure, so jit can donate the state."""

  def step(state: State, batch: dict[str, jax.Array]):
    # A fresh dropout key per step, from the checkpointed base key: resume
    # replays the same masks.
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]),
                                     state["step"])

    def objective(params):
      model = nnx.merge(graphdef, params, state["rest"])
      loss = loss_fn(model(batch, dropout_rng=dropout_rng), batch)
      return loss, nnx.state(model, nnx.Not(nnx.Param))

    (loss, rest), grads = jax.value_and_grad(objective, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = dict(state, params=optax.apply_updates(state["params"], updates),
                     rest=rest, opt_state=opt_state, step=state["step"] + 1)
    step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
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
  tx = make_optimizer(config)
  graphdef = make_graphdef(config, info)
  init_fn = make_init_fn(config, info, tx)
  abstract = jax.eval_shape(init_fn)
  shardings = mesh_lib.mesh_shardings(abstract, mesh, config)
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  train_step = jax.jit(
      make_train_step(graphdef, tx, losses.LOSSES[config.loss],
                      optim.dense_schedule(config.optim, config.num_train_steps)),
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
