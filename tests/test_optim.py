"""The embed/dense optimizer split, schedules and clipping."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from configs import default
from csctr.training import optim


class _Toy(nnx.Module):
  """An ID table and a dense layer: the two parameter kinds of a CTR model."""

  def __init__(self, rngs: nnx.Rngs):
    self.table = nnx.Embed(20, 4, rngs=rngs)
    self.dense = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, ids):
    return self.dense(self.table(ids))[..., 0]


def _label(path):
  return "embed" if path[0] == "table" else "dense"


def _optim_config(**kw) -> ml_collections.ConfigDict:
  config = default.get_config().optim
  config.update(kw)
  return config


def test_key_path_to_tuple_matches_nnx_paths():
  params = nnx.state(_Toy(nnx.Rngs(0)), nnx.Param)
  paths = [optim.key_path_to_tuple(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert sorted(paths) == sorted(
      p for p, _ in nnx.to_flat_state(params))
  labels = jax.tree.leaves(optim.label_tree(params, _label))
  assert sorted(labels) == ["dense", "dense", "embed"]


def _first_update(config, gradient, total_steps):
  """The optimizer's first update of the toy params for grads gradient(p)."""
  params = nnx.state(_Toy(nnx.Rngs(0)), nnx.Param)
  tx = optim.make_optimizer(config, total_steps, _label)
  grads = jax.tree.map(gradient, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_embed_and_dense_get_different_optimizers():
  """Same gradient, different updates: Adagrad(embed_lr) vs SGD(lr)."""
  config = _optim_config(embed_optimizer="adagrad", embed_lr=0.5,
                         dense_optimizer="sgd", lr=0.01, warmup_steps=0,
                         schedule="constant", clip_norm=0.0)
  updates = _first_update(config, jnp.ones_like, 100)
  up = {optim.key_path_to_tuple(p): np.asarray(v) for p, v in
        jax.tree_util.tree_flatten_with_path(updates)[0]}
  # SGD: -lr * g.
  np.testing.assert_allclose(up[("dense", "kernel")], -0.01, rtol=1e-6)
  # Adagrad: -lr * g / sqrt(0.1 + g^2) with the default accumulator 0.1.
  np.testing.assert_allclose(up[("table", "embedding")],
                             -0.5 / np.sqrt(1.1), rtol=1e-5)


def test_embed_rows_without_gradient_do_not_move():
  """Adagrad leaves absent IDs alone; weight decay never touches tables."""
  config = _optim_config(weight_decay=0.5)
  model = _Toy(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make_optimizer(config, 100, _label)
  opt_state = tx.init(params)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p)(jnp.array([1, 2])) ** 2)

  new = params
  for _ in range(3):
    grads = jax.grad(loss)(new)
    updates, opt_state = tx.update(grads, opt_state, new)
    new = optax.apply_updates(new, updates)
  before = np.asarray(params["table"]["embedding"][...])
  after = np.asarray(new["table"]["embedding"][...])
  np.testing.assert_array_equal(before[3:], after[3:])
  assert np.all(before[1:3] != after[1:3])


def test_schedule_warmup_then_cosine():
  config = _optim_config(lr=1.0, warmup_steps=10, schedule="cosine")
  sched = optim.dense_schedule(config, 110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(10)), 1.0)
  np.testing.assert_allclose(float(sched(60)), 0.5, atol=1e-6)
  assert float(sched(110)) < 1e-6
  const = optim.dense_schedule(_optim_config(lr=2.0, warmup_steps=4,
                                             schedule="constant"), 100)
  np.testing.assert_allclose([float(const(s)) for s in (2, 4, 99)],
                             [1.0, 2.0, 2.0])


def test_clip_by_joint_global_norm():
  config = _optim_config(embed_optimizer="sgd", embed_lr=1.0,
                         dense_optimizer="sgd", lr=1.0, warmup_steps=0,
                         schedule="constant", clip_norm=1.0)
  updates = _first_update(config, lambda p: 100 * jnp.ones_like(p), 10)
  np.testing.assert_allclose(float(optax.tree.norm(updates)), 1.0, rtol=1e-5)


def test_frozen_params_do_not_move_even_with_weight_decay():
  """Late fusion: the encoder gets set_to_zero, so decay cannot shrink it."""
  config = _optim_config(weight_decay=0.5, warmup_steps=0, schedule="constant")
  params = nnx.state(_Toy(nnx.Rngs(0)), nnx.Param)
  tx = optim.make_optimizer(config, 10, _label,
                            frozen=lambda path: path[0] == "dense")
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert not np.any(np.asarray(updates["dense"]["kernel"][...]))
  assert np.all(np.asarray(updates["table"]["embedding"][...]) != 0)


def test_real_model_labels_split_tables_from_the_rest():
  """ctr.param_label on the real model: ID tables embed, all else dense."""
  from csctr.data import batch as batch_lib  # pylint: disable=g-import-not-at-top
  from csctr.model import ctr  # pylint: disable=g-import-not-at-top
  info = batch_lib.DataInfo(sparse_features=("user_id", "item_id"),
                            vocab_sizes=(10, 12), num_dense=0,
                            num_categories=3, image_size=16)
  model_config = default.get_config().model
  model_config.small_channels = (4, 4)
  model = nnx.eval_shape(lambda: ctr.build_model(model_config, info,
                                                    nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  labels = optim.label_tree(params, ctr.param_label)
  flat = {optim.key_path_to_tuple(p): l for p, l in
          jax.tree_util.tree_flatten_with_path(labels)[0]}
  embed = {p for p, l in flat.items() if l == "embed"}
  assert embed == {("id_embed", "user_id", "embedding"),
                   ("id_embed", "item_id", "embedding")}
  assert len(flat) > len(embed) + 5  # CNN, attention priors, head: dense
