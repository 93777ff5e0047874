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
