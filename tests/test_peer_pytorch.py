"""The PyTorch twin of benchmarks/peer_pytorch.py is the same model as csctr's.

Same parameter count, and with csctr's weights copied in, the same logits,
loss and gradient norm on one batch: so the benchmark compares two
implementations of one computation. Skipped where torch is not installed
(it is the optional `[peer]` extra).
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import peer_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import peer_pytorch  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import step_timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from csctr.data import batch as batch_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from csctr.model import ctr  # pylint: disable=g-import-not-at-top,wrong-import-position
from csctr.training import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from testutil import rbg_rngs  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope="module")
def tiny_pair():
  """(config, info, csctr model, torch twin) at a tiny shape, built once."""
  config = peer_pytorch.peer_config(tiny.get_config(), k=3, impressions=12)
  config.model.small_channels = (8, 16)  # tiny: 16 px, two layers
  config.model.mlp_dims = (16, 8)
  info = step_timing.data_info(config)
  model = ctr.build_model(config.model, info, rbg_rngs(0))
  twin = peer_model.build(config, info)
  return config, info, model, twin


def test_same_parameter_count(tiny_pair):
  _, _, model, twin = tiny_pair
  n_csctr = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_csctr == sum(p.numel() for p in twin.parameters())


def test_same_logits_loss_and_gradient_norm(tiny_pair):
  config, info, model, twin = tiny_pair
  params = nnx.state(model, nnx.Param)
  peer_model.load_csctr_params(twin, params.to_pure_dict(),
                               info.sparse_features)
  d = config.data
  batch = batch_lib.dummy_batch(info, d.groups_per_batch, d.group_size,
                                d.unique_images, seed=1)
  jbatch = jax.tree.map(jnp.asarray, batch)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    logits = nnx.merge(graphdef, p, rest)(jbatch)
    return losses.bce_loss(logits, jbatch), logits

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, logits), grads = grad_fn.lower(params).compile({"xla_backend_optimization_level": 0})(params)
  tbatch = peer_model.to_torch_batch(batch)
  t_logits = twin(tbatch)
  t_loss = peer_model.bce_loss(t_logits, tbatch)
  t_loss.backward()
  np.testing.assert_allclose(t_logits.detach().numpy(), np.asarray(logits), atol=1e-5,
                             rtol=1e-4)
  np.testing.assert_allclose(t_loss.item(), float(loss), rtol=1e-5)
  g_norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
  t_norm = float(torch.sqrt(sum((p.grad**2).sum() for p in twin.parameters()
                                if p.grad is not None)))
  assert g_norm > 0
  np.testing.assert_allclose(t_norm, g_norm, rtol=1e-4)
