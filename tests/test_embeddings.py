"""The row-sparse embedding engine against dense optax and numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from csctr.model import embeddings

ROWS, DIM, N = 20, 4, 12


def _batches(steps: int, seed: int = 0):
  """Ids with duplicates (12 draws from 8 of 20 rows) and some padding."""
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    ids = rng.integers(0, 8, N).astype(np.int32)
    weight = (rng.random(N) > 0.25).astype(np.float32)
    target = rng.normal(size=N).astype(np.float32)
    yield jnp.asarray(ids), jnp.asarray(weight), jnp.asarray(target)


def _loss_of_embeddings(e, weight, target):
  """A weighted regression on the embeddings; padding (weight 0) adds 0."""
  pred = jnp.sum(e * jnp.arange(1, DIM + 1, dtype=jnp.float32), -1)
  return jnp.sum(weight * (jnp.tanh(pred) - target) ** 2)


def _table(seed=1):
  return jax.random.normal(jax.random.key(seed), (ROWS, DIM))


def _sparse_steps(opt, steps, table=None):
  table = _table() if table is None else table
  slots = opt.init(table)
  for t, (ids, weight, target) in enumerate(_batches(steps), start=1):
    found = embeddings.lookup(table, ids, weight)
    g = jax.grad(_loss_of_embeddings)(found.rows[found.inverse], weight,
                                      target)
    grads = embeddings.row_gradients(g, found)
    table, slots = opt.apply(table, slots, found, grads, jnp.int32(t))
  return table, slots


def _dense_steps(tx, steps):
  table = _table()
  state = tx.init(table)
  for ids, weight, target in _batches(steps):
    g = jax.grad(lambda tab: _loss_of_embeddings(tab[ids], weight, target))(
        table)
    updates, state = tx.update(g, state, table)
    table = optax.apply_updates(table, updates)
  return table


@pytest.mark.parametrize("kind,tx", [
    ("sgd", optax.sgd(0.3)),
    ("adagrad", optax.adagrad(0.3, initial_accumulator_value=0.1, eps=1e-7)),
])
def test_sparse_path_equals_dense_optax(kind, tx):
  opt = embeddings.RowOptimizer(kind, lr=0.3)
  sparse, _ = _sparse_steps(opt, 6)
  dense = _dense_steps(tx, 6)
  np.testing.assert_allclose(sparse, dense, rtol=0, atol=1e-6)
  # And the rows no batch touched are bit-identical to the initial table.
  np.testing.assert_array_equal(sparse[8:], _table()[8:])
  assert np.abs(sparse[:8] - _table()[:8]).max() > 1e-2  # rows did move


def _numpy_row_gradients(table: np.ndarray, steps: int):
  """(row, its summed gradient) per touched row of each batch, in numpy.

  Each batch's gradients are taken at the table as the caller left it after
  the previous batch; rows of padding impressions only are not touched.
  """
  for ids, weight, target in _batches(steps):
    ids, weight = np.asarray(ids), np.asarray(weight)
    e = jnp.asarray(table[ids], jnp.float32)
    g = np.asarray(jax.grad(_loss_of_embeddings)(e, weight, target))
    row_g = np.zeros_like(table)
    np.add.at(row_g, ids, g)
    for r in np.unique(ids[weight > 0]):
      yield r, row_g[r]


def test_rowwise_adagrad_equals_numpy_reference():
  opt = embeddings.RowOptimizer("rowwise_adagrad", lr=0.3,
                                initial_accumulator=0.1, eps=1e-7)
  got, slots = _sparse_steps(opt, 6)
  table = np.asarray(_table(), np.float64)
  acc = np.full(ROWS, 0.1)
  for r, g in _numpy_row_gradients(table, 6):
    acc[r] += np.mean(g ** 2)
    table[r] -= 0.3 * g / np.sqrt(acc[r] + 1e-7)
  np.testing.assert_allclose(got, table, rtol=0, atol=1e-5)
  np.testing.assert_allclose(slots["accumulator"], acc, rtol=1e-5)
  assert slots["accumulator"].shape == (ROWS,)  # one value per row


def test_ftrl_equals_numpy_reference():
  """FTRL-Proximal per coordinate (McMahan et al. 2013), touched rows only."""
  lr, l1, l2, beta = 0.3, 2.0, 0.01, 1.0
  opt = embeddings.RowOptimizer("ftrl", lr=lr, initial_accumulator=0.1,
                                l1=l1, l2=l2, beta=beta)
  got, slots = _sparse_steps(opt, 6)
  table = np.asarray(_table(), np.float64)
  z, n = np.zeros_like(table), np.full_like(table, 0.1)
  for r, g in _numpy_row_gradients(table, 6):
    for j in range(DIM):
      n_new = n[r, j] + g[j] ** 2
      sigma = (np.sqrt(n_new) - np.sqrt(n[r, j])) / lr
      z[r, j] += g[j] - sigma * table[r, j]
      n[r, j] = n_new
      if abs(z[r, j]) <= l1:
        table[r, j] = 0.0
      else:
        table[r, j] = -(z[r, j] - np.sign(z[r, j]) * l1) / (
            (beta + np.sqrt(n_new)) / lr + 2 * l2)
  np.testing.assert_allclose(got, table, rtol=0, atol=1e-5)
  np.testing.assert_allclose(slots["z"], z, rtol=1e-4, atol=1e-6)  # float32 sums
  np.testing.assert_allclose(slots["n"], n, rtol=1e-5)
  zeros = np.asarray(got[:8]) == 0  # l1 zeroes coordinates exactly
  assert zeros.any() and not zeros.all()
  np.testing.assert_array_equal(got[8:], _table()[8:])  # never touched


def test_lazy_adam_equals_adam_when_every_row_is_touched():
  opt = embeddings.RowOptimizer("lazy_adam", lr=0.1, eps=1e-8)
  table, slots = _table(), None
  ref, ref_state = _table(), optax.adam(0.1, eps=1e-8).init(_table())
  slots = opt.init(table)
  ids = jnp.arange(ROWS, dtype=jnp.int32)
  weight = jnp.ones(ROWS)
  for t in range(1, 5):
    target = jnp.sin(jnp.arange(ROWS) * t).astype(jnp.float32)
    found = embeddings.lookup(table, ids, weight)
    g = jax.grad(_loss_of_embeddings)(found.rows[found.inverse], weight,
                                      target)
    table, slots = opt.apply(table, slots, found,
                             embeddings.row_gradients(g, found), jnp.int32(t))
    g_ref = jax.grad(lambda tab: _loss_of_embeddings(tab, weight, target))(ref)
    updates, ref_state = optax.adam(0.1, eps=1e-8).update(g_ref, ref_state)
    ref = optax.apply_updates(ref, updates)
  np.testing.assert_allclose(table, ref, rtol=0, atol=1e-6)


def test_lazy_adam_leaves_untouched_rows_and_moments_alone():
  opt = embeddings.RowOptimizer("lazy_adam", lr=0.1)
  table, slots = _sparse_steps(opt, 4)
  np.testing.assert_array_equal(table[8:], _table()[8:])
  assert not np.any(slots["m"][8:]) and not np.any(slots["v"][8:])


def test_lookup_pads_with_an_out_of_range_id_and_ignores_padding():
  table = _table()
  ids = jnp.array([3, 3, 5, 0, 7, 7], jnp.int32)
  weight = jnp.array([1, 1, 1, 0, 0, 1], jnp.float32)
  found = embeddings.lookup(table, ids, weight, size=8)
  np.testing.assert_array_equal(found.ids, [0, 3, 5, 7, ROWS, ROWS, ROWS,
                                            ROWS])
  np.testing.assert_array_equal(found.ids[found.inverse], ids)
  # Row 0 is used only by a padding impression: gathered but not touched.
  np.testing.assert_array_equal(found.touched, [0, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(found.rows[:4], table[jnp.array([0, 3, 5, 7])])
  assert not np.any(found.rows[4:])
  g = jnp.ones((6, DIM))
  grads = embeddings.row_gradients(g, found)
  np.testing.assert_array_equal(grads[:, 0], [0, 2, 1, 2, 0, 0, 0, 0])
  opt = embeddings.RowOptimizer("sgd", lr=1.0)
  new, _ = opt.apply(table, {}, found, grads, jnp.int32(1))
  moved = np.flatnonzero(np.any(np.asarray(new) != np.asarray(table), -1))
  np.testing.assert_array_equal(moved, [3, 5, 7])
  np.testing.assert_allclose(new[3], table[3] - 2)


def test_clip_scale_matches_optax():
  g = {"a": jnp.full((3,), 10.0), "b": jnp.full((2, 2), -4.0)}
  norm = optax.tree.norm(g)
  ours = jax.tree.map(lambda x: x * embeddings.clip_scale(norm, 1.5), g)
  ref, _ = optax.clip_by_global_norm(1.5).update(g, None)
  for k in g:
    np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6)
  assert float(embeddings.clip_scale(norm, 0.0)) == 1.0
  assert float(embeddings.clip_scale(jnp.float32(0.5), 1.0)) == 1.0


def test_drop_ids_rate_and_determinism():
  sparse = jnp.arange(1, 20001, dtype=jnp.int32).reshape(5000, 4)
  key = jax.random.key(3)
  out = embeddings.drop_ids(sparse, 0.1, key)
  dropped = np.asarray(out == 0)
  assert abs(dropped.mean() - 0.1) < 0.01
  np.testing.assert_array_equal(np.asarray(out)[~dropped],
                                np.asarray(sparse)[~dropped])
  np.testing.assert_array_equal(out, embeddings.drop_ids(sparse, 0.1, key))
  assert embeddings.drop_ids(sparse, 0.0, key) is sparse


def test_padded_rows():
  assert embeddings.padded_rows(97, 64) == 128
  assert embeddings.padded_rows(128, 64) == 128
  assert embeddings.padded_rows(5, 1) == 5
  with pytest.raises(ValueError, match="table_row_multiple"):
    embeddings.padded_rows(5, 0)


def test_table_init_of_a_small_table_is_nnx_embeds_own():
  """Tables up to ONE_SHOT_ENTRIES keep the values nnx.Embed always drew."""
  from flax import nnx
  key = jax.random.key(3)
  ours = nnx.Embed(640, 16, rngs=nnx.Rngs(params=key), embedding_init=(
      lambda k, s, d: embeddings.table_init(k, s, d, groups=64)))
  theirs = nnx.Embed(640, 16, rngs=nnx.Rngs(params=key))
  np.testing.assert_array_equal(ours.embedding[...], theirs.embedding[...])


def test_table_init_row_by_row(monkeypatch):
  """Above the threshold row r comes from fold_in(key, r) alone.

  So the values do not depend on the grouping (the row-sharding layout) nor
  on the chunk size, and every row has nnx.Embed's N(0, 1/d) law.
  """
  monkeypatch.setattr(embeddings, "ONE_SHOT_ENTRIES", 0)
  key, shape = jax.random.key(5), (3 * 64 * 7, 8)
  tables = []
  for groups, chunk_entries in [(1, 10**9), (64, 64 * 8 * 5), (3, 8 * 4)]:
    monkeypatch.setattr(embeddings, "CHUNK_ENTRIES", chunk_entries)
    tables.append(np.asarray(jax.jit(
        lambda k: embeddings.table_init(k, shape, groups=groups))(key)))
  np.testing.assert_array_equal(tables[0], tables[1])
  np.testing.assert_array_equal(tables[0], tables[2])
  for r in (0, 1, 777, shape[0] - 1):
    row = jax.random.normal(jax.random.fold_in(key, r), (shape[1],))
    np.testing.assert_allclose(tables[0][r], row / np.sqrt(shape[1]),
                               rtol=1e-6)
  assert len(np.unique(tables[0][:, 0])) == shape[0]
  assert abs(tables[0].std() * np.sqrt(shape[1]) - 1) < 0.02
  assert abs(tables[0].mean()) < 0.01


def test_unknown_optimizer_is_an_error():
  with pytest.raises(ValueError, match="embed_optimizer"):
    embeddings.RowOptimizer("adamax", lr=0.1)


def _reference_train(config, info, batches):
  """The step before the engine: every parameter differentiated, tables on
  optax (dense [rows, d] gradients), clipping by optax's global norm."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from csctr.model import ctr  # pylint: disable=g-import-not-at-top
  from csctr.training import losses  # pylint: disable=g-import-not-at-top
  from csctr.training import optim  # pylint: disable=g-import-not-at-top
  o = config.optim
  embed_tx = {"sgd": optax.sgd(o.embed_lr),
              "adagrad": optax.adagrad(
                  o.embed_lr, initial_accumulator_value=o.embed_initial_accumulator,
                  eps=o.embed_eps)}[o.embed_optimizer]
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.multi_transform(
          {"embed": embed_tx,
           "dense": optim.make_optimizer(o, config.num_train_steps)},
          lambda p: optim.label_tree(p, ctr.param_label)))
  model = ctr.build_model(config.model, info, nnx.Rngs(config.seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    def objective(p):
      return losses.LOSSES[config.loss](nnx.merge(graphdef, p, rest)(batch),
                                        batch)
    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state,
            optax.tree.norm(grads))

  norms = []
  for batch in batches:
    params, opt_state, norm = step(params, opt_state, batch)
    norms.append(float(norm))
  return params, norms


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_train_step_equals_the_dense_optax_step(kind):
  """The trainer's sparse step == all-params value_and_grad + optax, to 1e-6.

  Small vocabularies, so ids repeat within a batch; padding impressions; a
  clip norm low enough to clip, so the joint norm must count the same rows.
  """
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from csctr.data import batch as batch_lib  # pylint: disable=g-import-not-at-top
  from csctr.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from csctr.training import steps as steps_lib  # pylint: disable=g-import-not-at-top
  config = tiny.get_config("use_image=False")
  config.mesh.shape = (1, 1)
  config.optim.embed_optimizer = kind
  config.optim.embed_lr = 0.3
  config.optim.clip_norm = 0.5
  info = batch_lib.DataInfo(("user_id", "item_id", "category_id", "position"),
                            (7, 13, 4, 11), 0, 4, 16)
  batches = []
  for seed in range(5):
    b = batch_lib.dummy_batch(info, config.data.groups_per_batch,
                              config.data.group_size, config.data.unique_images,
                              seed=seed)
    b["weight"][:3] = 0  # padding impressions: their rows must not move
    batches.append({k: jnp.asarray(v) for k, v in b.items()})
  steps = steps_lib.build_steps(config, info, mesh_lib.make_mesh(config))
  state = steps_lib.init_state(steps.init_fn, steps.shardings)
  norms = []
  for batch in batches:
    state, metrics = steps.train_step(state, batch)
    norms.append(float(metrics["grad_norm"]))
  ref, ref_norms = _reference_train(config, info, batches)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
  assert max(ref_norms) > config.optim.clip_norm  # clipping was exercised
  flat = dict(jax.tree_util.tree_flatten_with_path(state["params"])[0])
  for path, want in jax.tree_util.tree_flatten_with_path(ref)[0]:
    np.testing.assert_allclose(flat[path], want, rtol=0, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
