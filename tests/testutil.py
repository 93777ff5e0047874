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


def check_min_count_and_hashing(make_source, config, min_count=8):
  """Items with fewer than min_count train impressions share row 0 with the
  cold ones (so row 0 is trained); prepare saves the vocabularies used;
  hash_buckets sends those items to extra rows instead. For the simulated
  datasets (synthetic, fashion_mnist), whose chunks carry the raw item."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from csctr.data import pipeline  # pylint: disable=g-import-not-at-top
  from csctr.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top

  def collect(source, split):
    chunks = list(source.impressions(split))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

  config.data.min_count = min_count
  source = make_source(config)
  train, test = collect(source, "train"), collect(source, "test")
  col = source.sparse_features.index("item_id")
  counts = np.bincount(train["item"], minlength=source.num_items)
  rare = (counts > 0) & (counts < min_count)
  assert rare.any() and (counts >= min_count).any()
  np.testing.assert_array_equal(train["sparse"][:, col] == 0,
                                rare[train["item"]])
  assert (test["sparse"][test["is_cold"], col] == 0).all()
  vocab = source.vocabularies["item_id"]
  assert vocab.oov_count == counts[rare].sum()
  assert source.vocab_sizes[col] == vocab.size == 1 + (counts >= min_count).sum()
  # Saved with the prepared dataset: serving maps raw ids to the same rows.
  saved = vocab_lib.load_vocabularies(pipeline.prepare_dataset(config))
  assert saved["item_id"].ids == vocab.ids
  assert saved["item_id"].row(str(int(np.argmax(counts)))) == 1
  config.data.hash_buckets = 5
  hashed = make_source(config)
  train = collect(hashed, "train")
  assert hashed.vocab_sizes[col] == vocab.size + 5
  assert (train["sparse"][rare[train["item"]], col] >= vocab.size).all()


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

