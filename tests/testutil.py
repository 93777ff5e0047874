"""Helpers shared by the model tests."""

import jax
from flax import nnx

# Each test program runs once or twice: compiling it without LLVM
# optimisation (as the trainer's init does) halves the model tests' compile time.
_O0 = {"xla_backend_optimization_level": 0}


def jit_o0(fn):
  """Like nnx.jit for fn(module, *arrays), compiled at XLA CPU opt level 0."""
  cache = {}

  def call(module, *args):
    graphdef, state = nnx.split(module)
    leaves, tree = jax.tree.flatten((state, args))
    key = (graphdef, tree, tuple((x.shape, x.dtype) for x in leaves))
    if key not in cache:
      pure = jax.jit(lambda s, a: fn(nnx.merge(graphdef, s), *a))
      cache[key] = pure.lower(state, args).compile(_O0)
    return cache[key](state, args)

  return call


def rbg_rngs(seed: int = 0) -> nnx.Rngs:
  """The 'rbg' PRNG compiles model-init programs several times faster than threefry on CPU."""
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def trainer_eval_slots(workdir: str, data_path: str):
  """The trainer's own eval step over a run's test split, batch by batch.

  Yields (batch, logits [B], item [B], real): `item` is the image row of
  each impression slot (its group record's item; -1 for padding), `real`
  the indices of the real impressions. The serving tests compare the scorer
  with these logits.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from csctr import rundir  # pylint: disable=g-import-not-at-top
  from csctr.data import pipeline  # pylint: disable=g-import-not-at-top
  from csctr.training import steps  # pylint: disable=g-import-not-at-top
  model, config, _, _ = rundir.restore_model(workdir)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  eval_step = jax.jit(steps.make_eval_step(graphdef))
  state = {"params": params, "rest": rest}
  groups = pipeline.groups_source(data_path, "test")
  g, k = config.data.eval_groups_per_batch, config.data.group_size
  for b, batch in enumerate(pipeline.eval_batches(config, data_path)):
    logits = np.asarray(eval_step(state, batch)["logits"])
    item = np.full(g * k, -1)
    for j in range(g):
      if b * g + j < len(groups):
        item[j * k:(j + 1) * k] = groups[b * g + j]["item"]
    yield batch, logits, item, np.flatnonzero(batch["weight"] > 0)

