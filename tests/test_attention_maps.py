"""The inspection hooks behind colabs/attention_maps.ipynb.

CategoryAttention.with_maps and SmallCNN.attention_maps must compute exactly
what the training path computes, or the pictures would show a different
model from the one that was trained.
"""

from flax import nnx
import jax
import numpy as np
import pytest

from csctr.model import attention
from csctr.model import backbones

U, S, C = 3, 16, (8, 8, 8)


def _net(kind):
  spec = attention.AttentionSpec(kind=kind, num_categories=4,
                                 channel_prior_dim=4, reduction=2,
                                 spatial_kernel=3)
  return backbones.SmallCNN(S, 5, spec, C, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", attention.ATTENTION_CHOICES)
def test_maps_match_the_forward_pass(kind):
  net = _net(kind)
  x = jax.random.normal(jax.random.key(1), (U, S, S, 3))
  cats = np.array([1, 2, 3], np.int32)
  emb, layers = net.attention_maps(x, cats)
  np.testing.assert_allclose(emb, net(x, cats), rtol=1e-6, atol=1e-6)
  assert len(layers) == len(C)
  spec = net.attns[0].spec
  sizes = (16, 8, 4)  # 2x2 pools after every layer but the last
  for gates, size, c in zip(layers, sizes, C):
    assert set(gates) == ({"channel"} if spec.use_channel else set()) | (
        {"spatial"} if spec.use_spatial else set())
    if spec.use_channel:
      assert gates["channel"].shape == (U, c)
    if spec.use_spatial:
      assert gates["spatial"].shape == (U, size, size)
    for g in gates.values():  # sigmoid gates
      assert np.all((np.asarray(g) > 0) & (np.asarray(g) < 1))


def test_only_category_priors_make_maps_depend_on_the_category():
  x = jax.random.normal(jax.random.key(2), (1, S, S, 3))
  same = np.concatenate([x, x])
  for kind, differs in (("cscnn", True), ("cscnn_spatial", True),
                        ("cbam", False)):
    _, layers = _net(kind).attention_maps(same, np.array([1, 2], np.int32))
    spatial = np.asarray(layers[0]["spatial"])
    assert (not np.allclose(spatial[0], spatial[1])) == differs, kind
