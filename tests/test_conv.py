"""im2col convolution equals lax.conv_general_dilated, values and gradients."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csctr.model import conv as conv_lib
from testutil import rbg_rngs

_DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, k, strides, padding, **kw):
  return jax.lax.conv_general_dilated(x, k, strides, padding,
                                      dimension_numbers=_DN, **kw)


def _im2col(x, k, strides, padding, **kw):
  dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, _DN)
  return conv_lib.im2col_conv_general_dilated(x, k, strides, padding,
                                              dimension_numbers=dn, **kw)


def _arrays(shape, kernel, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  k = jnp.asarray(rng.standard_normal(kernel) * 0.3, jnp.float32)
  return x, k


@pytest.mark.parametrize("shape,kernel,padding", [
    ((3, 8, 8, 3), (3, 3, 3, 4), "SAME"),   # the small CNN's first layer
    ((2, 5, 7, 6), (3, 3, 6, 5), "SAME"),   # non-square map
    ((2, 6, 6, 2), (2, 2, 2, 3), "SAME"),   # even kernel: 0 before, 1 after
    ((2, 9, 9, 3), (5, 5, 3, 2), "VALID"),
    ((2, 4, 4, 3), (1, 1, 3, 7), "SAME"),   # 1x1: no taps to stack
    ((2, 6, 6, 2), (3, 3, 2, 2), ((2, 0), (1, 3))),  # explicit, asymmetric
])
def test_equals_lax_conv_values_and_gradients(shape, kernel, padding):
  x, k = _arrays(shape, kernel)
  out_shape = jax.eval_shape(lambda: _lax(x, k, (1, 1), padding)).shape
  # A non-uniform cotangent, so every output position matters.
  w = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape),
                  jnp.float32)

  def both(x, k):  # one program per case: (value, d/dx, d/dk) of each
    def run(f):
      y, vjp = jax.vjp(lambda x, k: f(x, k, (1, 1), padding), x, k)
      return (y,) + vjp(w)
    return run(_lax), run(_im2col)

  want, got = jax.jit(both).lower(x, k).compile(
      {"xla_backend_optimization_level": 0})(x, k)
  for g, e in zip(got, want):
    assert g.shape == e.shape
    np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


def test_uncovered_calls_fall_back_to_lax():
  x, k = _arrays((2, 9, 9, 3), (3, 3, 3, 4))
  for kw in ({"strides": (2, 2)}, {"rhs_dilation": (2, 2)}):
    strides = kw.pop("strides", (1, 1))
    np.testing.assert_array_equal(_im2col(x, k, strides, "SAME", **kw),
                                  _lax(x, k, strides, "SAME", **kw))


def test_bfloat16_close_to_float32():
  x, k = _arrays((2, 8, 8, 4), (3, 3, 4, 4))
  want = _lax(x, k, (1, 1), "SAME")
  got = _im2col(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), (1, 1), "SAME")
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.1, rtol=0.05)


def test_nnx_conv_with_im2col_equals_plain_nnx_conv():
  plain = nnx.Conv(3, 5, (3, 3), padding="SAME", rngs=rbg_rngs(0))
  fast = nnx.Conv(3, 5, (3, 3), padding="SAME", rngs=rbg_rngs(0),
                  conv_general_dilated=conv_lib.im2col_conv_general_dilated)
  # Same parameter tree and values: checkpoints do not see the change.
  assert jax.tree.structure(nnx.state(plain)) == jax.tree.structure(
      nnx.state(fast))
  x, _ = _arrays((2, 7, 7, 3), (1, 1, 1, 1))
  np.testing.assert_allclose(fast(x), plain(x), atol=1e-5, rtol=1e-5)
