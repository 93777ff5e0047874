"""The optimizer of the dense parameters; ID tables have their own engine.

CTR models mix two kinds of parameters. ID embedding rows get a gradient only
when their ID occurs in the batch, so they want a per-row adaptive optimizer
(Adagrad, as in production CTR systems), a larger step, and updates that
touch only those rows: csctr/model/embeddings.py does that, outside optax.
The dense weights (CNN, attention, DCN) want AdamW with warmup and decay:
this module. `csctr.model.ctr.param_label` tells the two apart; the train
step clips both kinds of gradient by their joint global norm, so one
exploding table cannot hide behind the other optimizer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax

Path = tuple[Any, ...]


def key_path_to_tuple(path: tuple[Any, ...]) -> Path:
  """A jax key path of an nnx.State leaf as the plain tuple nnx uses.

  ('emb', 'embedding') for DictKey('emb')/DictKey('embedding')/.value: the
  trailing `.value` of nnx Variables is dropped, list indices stay ints.
  """
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(k.key)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    else:
      out.append(str(k))
  if out and out[-1] == "value":
    out = out[:-1]
  return tuple(out)


def label_tree(params: Any, param_label: Callable[[Path], str]) -> Any:
  """Pytree of 'embed' | 'dense' labels with the structure of `params`."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: param_label(key_path_to_tuple(p)), params)


def dense_schedule(config: ml_collections.ConfigDict,
                   num_train_steps: int) -> optax.Schedule:
  """Linear warmup to config.lr, then cosine decay to 0 or constant."""
  warmup = min(int(config.warmup_steps), max(num_train_steps - 1, 0))
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
        decay_steps=max(num_train_steps, warmup + 1), end_value=0.0)
  if config.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(config.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.lr, warmup),
         optax.constant_schedule(config.lr)], [warmup])
  raise ValueError(f"unknown schedule {config.schedule!r}")


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices and kernels only; biases and scales are exempt."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _dense_tx(config: ml_collections.ConfigDict,
              schedule: optax.Schedule) -> optax.GradientTransformation:
  name = config.dense_optimizer
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=config.weight_decay,
                       mask=_decay_mask)
  if name == "adam":
    return optax.adam(schedule)
  if name == "sgd":
    return optax.sgd(schedule)
  raise ValueError(f"unknown dense_optimizer {name!r}")


def make_optimizer(
    config: ml_collections.ConfigDict, num_train_steps: int,
    frozen: Callable[[Path], bool] | None = None,
) -> optax.GradientTransformation:
  """The optimizer of the dense parameters (everything but the ID tables).

  Clipping is not part of it: the train step clips the dense gradients and
  the touched table rows' gradients by their joint norm
  (csctr/training/steps.py).

  Args:
    config: config.optim (dense_optimizer, lr, weight_decay, warmup_steps,
      schedule).
    num_train_steps: length of the cosine schedule.
    frozen: path -> True for parameters that must not move at all (late
      fusion's encoder: a stop-gradient alone would still let weight decay
      shrink it).
  """
  tx = _dense_tx(config, dense_schedule(config, num_train_steps))
  if frozen is None:
    return tx
  return optax.multi_transform(
      {"dense": tx, "frozen": optax.set_to_zero()},
      lambda params: label_tree(
          params, lambda path: "frozen" if frozen(path) else "dense"))
