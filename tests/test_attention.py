"""Category attention: parameter counts, eqs. (1)-(2) in numpy, priors."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csctr.model import attention

C, H, W, N, CP, R = 6, 5, 5, 4, 3, 2  # channels, map, categories, C', r


def _rngs(seed=0):
  # The 'rbg' PRNG compiles init programs ~10x faster than threefry on CPU.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _uniform(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape),
                     jnp.float32)


def _spec(kind, kernel=7):
  return attention.AttentionSpec(kind=kind, num_categories=N,
                                 channel_prior_dim=CP, reduction=R,
                                 spatial_kernel=kernel)


def _count(module):
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _params(module):
  return {"/".join(map(str, p)): np.asarray(v[...], np.float64)
          for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _conv_same(x, kernel, bias):
  """Zero-padded SAME correlation: x [U, H, W, Cin], kernel [k, k, Cin, 1]."""
  k = kernel.shape[0]
  p = k // 2
  xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = np.zeros(x.shape[:3] + (1,))
  for i in range(x.shape[1]):
    for j in range(x.shape[2]):
      out[:, i, j, 0] = np.einsum("uabc,abc->u", xp[:, i:i + k, j:j + k, :],
                                  kernel[..., 0])
  return out + bias


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _reference(kind, p, f, cats):
  """Eqs. (1)-(2) of CSCNN written out in numpy; returns (Mc, Ms, F'')."""
  mc = ms = None
  if kind in ("cscnn", "cscnn_channel", "cbam", "se"):
    def mlp(z):
      h = np.maximum(z @ p["mlp_hidden/kernel"] + p["mlp_hidden/bias"], 0)
      return h @ p["mlp_out/kernel"] + p["mlp_out/bias"]
    avg, mx = f.mean(axis=(1, 2)), f.max(axis=(1, 2))
    if kind in ("cscnn", "cscnn_channel"):
      ac = p["channel_prior"][cats]
      avg, mx = np.concatenate([avg, ac], 1), np.concatenate([mx, ac], 1)
    mc = _sigmoid(mlp(avg) + (0 if kind == "se" else mlp(mx)))
    f = f * mc[:, None, None, :]
  if kind in ("cscnn", "cscnn_spatial", "cbam"):
    maps = [f.mean(-1, keepdims=True), f.max(-1, keepdims=True)]
    if kind in ("cscnn", "cscnn_spatial"):
      maps.append(p["spatial_prior"][cats][..., None])
    ms = _sigmoid(_conv_same(np.concatenate(maps, -1),
                             p["spatial_kernel"], p["spatial_bias"]))
    f = f * ms
  return mc, ms, f


@pytest.mark.parametrize("kind", attention.ATTENTION_CHOICES)
@pytest.mark.parametrize("kernel", [3, 7])
def test_param_count_by_formula(kind, kernel):
  m = nnx.eval_shape(lambda: _spec(kind, kernel).make(C, H, W, rngs=_rngs()))
  hid = C // R
  mlp = lambda d_in: d_in * hid + hid + hid * C + C
  expected = {
      "cscnn": mlp(C + CP) + N * CP + kernel**2 * 3 + 1 + N * H * W,
      "cscnn_channel": mlp(C + CP) + N * CP,
      "cscnn_spatial": kernel**2 * 3 + 1 + N * H * W,
      "cbam": mlp(C) + kernel**2 * 2 + 1,
      "se": mlp(C),
      "none": 0,
  }[kind]
  assert _count(m) == expected
  assert _spec(kind, kernel).num_params(C, H, W) == expected


@pytest.mark.parametrize("k", [3, 4, 7])
def test_conv_to_one_map_is_a_same_conv(k):
  rng = np.random.default_rng(k)
  x = rng.normal(size=(2, 6, 5, 3))
  kernel = rng.normal(size=(k, k, 3, 1))
  got = attention.conv_to_one_map(jnp.asarray(x, jnp.float32),
                                  jnp.asarray(kernel, jnp.float32))
  ref = jax.lax.conv_general_dilated(
      jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), (1, 1),
      "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  if k % 2:
    np.testing.assert_allclose(got, _conv_same(x, kernel, 0.0), rtol=1e-5,
                               atol=1e-5)
  # Its own VJP (planes + matmuls) equals the conv's, both gradients.
  def loss(conv):
    return lambda a, b: jnp.sum(jnp.sin(conv(a, b)))
  args = (jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32))
  lax_conv = lambda a, b: jax.lax.conv_general_dilated(  # pylint: disable=g-long-lambda
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want = jax.grad(loss(lax_conv), argnums=(0, 1))(*args)
  got = jax.jit(jax.grad(loss(attention.conv_to_one_map), argnums=(0, 1)))(
      *args)
  for g, r in zip(got, want):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", attention.ATTENTION_CHOICES)
def test_matches_equations_in_numpy(kind):
  m = _spec(kind).make(C, H, W, rngs=_rngs(1))
  rng = np.random.default_rng(0)
  f = np.maximum(rng.normal(size=(3, H, W, C)), 0)  # post-ReLU features
  cats = np.array([0, 2, 3], np.int32)
  mc, ms, out = _reference(kind, _params(m), f, cats)
  x = jnp.asarray(f, jnp.float32)
  if mc is not None:
    np.testing.assert_allclose(m.channel_map(x, cats), mc, rtol=1e-5, atol=1e-6)
  if ms is not None:
    x1 = x * mc[:, None, None, :] if mc is not None else x
    got = m.spatial_map(jnp.asarray(x1, jnp.float32), cats)
    np.testing.assert_allclose(got, ms, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m(x, cats), out, rtol=1e-5, atol=1e-6)
  if kind == "none":
    np.testing.assert_array_equal(m(x, cats), x)


@pytest.mark.parametrize("kind,depends", [
    ("cscnn", True), ("cscnn_channel", True), ("cscnn_spatial", True),
    ("cbam", False), ("se", False), ("none", False)])
def test_category_dependence(kind, depends):
  m = _spec(kind).make(C, H, W, rngs=_rngs(0))
  x = _uniform(0, (1, H, W, C))
  x2 = jnp.concatenate([x, x])
  out = m(x2, jnp.array([1, 2]))
  differs = float(jnp.max(jnp.abs(out[0] - out[1]))) > 1e-4
  assert differs == depends


def test_gradients_reach_only_used_prior_rows():
  # r = 1 (hidden width C): with only C // 2 hidden ReLUs an image may have
  # them all inactive, and then no gradient reaches its Ac row.
  spec = attention.AttentionSpec(kind="cscnn", num_categories=N,
                                 channel_prior_dim=CP, reduction=1,
                                 spatial_kernel=7)
  m = spec.make(C, H, W, rngs=_rngs(0))
  x = _uniform(1, (2, H, W, C))
  cats = jnp.array([1, 3])
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, cats) ** 2)))(m)
  for name in ("channel_prior", "spatial_prior"):
    g = np.abs(np.asarray(getattr(grads, name)[...]))
    per_row = g.reshape(N, -1).sum(1)
    assert per_row[1] > 0 and per_row[3] > 0, name
    assert per_row[0] == 0 and per_row[2] == 0, name  # unused categories


def test_bfloat16_compute_float32_params():
  m32 = _spec("cscnn").make(C, H, W, rngs=_rngs(0))
  m16 = _spec("cscnn").make(C, H, W, dtype=jnp.bfloat16, rngs=_rngs(0))
  assert all(x.dtype == jnp.float32
             for x in jax.tree.leaves(nnx.state(m16, nnx.Param)))
  x = _uniform(2, (2, H, W, C))
  cats = jnp.array([0, 1])
  apply = nnx.jit(lambda m, x: m(x, cats))
  y16 = apply(m16, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(y16.astype(jnp.float32), apply(m32, x), atol=3e-2)


def test_rejects_unknown_kind_and_wrong_shape():
  with pytest.raises(ValueError):
    attention.AttentionSpec(kind="bogus")
  m = _spec("cbam").make(C, H, W, rngs=_rngs(0))
  with pytest.raises(ValueError):
    m(jnp.zeros((1, H + 1, W, C)), jnp.zeros((1,), jnp.int32))
