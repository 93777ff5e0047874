"""The dense optimizer, schedules, frozen params and the table/dense split.

The ID tables' optimizer is tested in tests/test_embeddings.py, and the joint
clipping of both in the train step there too.
"""

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


def test_dense_optimizer_with_weight_decay_on_matrices_only():
  """AdamW's decay hits kernels, not biases; no clipping inside optax."""
  config = _optim_config(dense_optimizer="sgd", lr=0.01, warmup_steps=0,
                         schedule="constant", clip_norm=1e-3)
  params = nnx.state(_Toy(nnx.Rngs(0)), nnx.Param)["dense"]
  tx = optim.make_optimizer(config, 100)
  grads = jax.tree.map(lambda p: 100 * jnp.ones_like(p), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # SGD: -lr * g, unclipped (the train step clips, jointly with the tables).
  np.testing.assert_allclose(updates["kernel"][...], -1.0, rtol=1e-6)
  config = _optim_config(dense_optimizer="adamw", lr=0.0, weight_decay=0.5,
                         warmup_steps=0, schedule="constant")
  tx = optim.make_optimizer(config, 100)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert not np.any(updates["bias"][...])  # lr 0: only decay could move it


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


def test_frozen_params_do_not_move_even_with_weight_decay():
  """Late fusion: the encoder gets set_to_zero, so decay cannot shrink it."""
  config = _optim_config(weight_decay=0.5, warmup_steps=0, schedule="constant")
  params = nnx.state(_Toy(nnx.Rngs(0)), nnx.Param)["dense"]
  tx = optim.make_optimizer(config, 10,
                            frozen=lambda path: path[0] == "kernel")
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert not np.any(np.asarray(updates["kernel"][...]))
  assert np.all(np.asarray(updates["bias"][...]) != 0)


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
