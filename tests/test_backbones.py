"""Backbones: exact parameter counts by formula, map sizes, shapes, pooling."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csctr.model import attention
from csctr.model import backbones
from testutil import jit_o0, rbg_rngs

N, CP, R, K = 5, 4, 4, 7  # categories, C', r, spatial kernel
KINDS = attention.ATTENTION_CHOICES


def _spec(kind):
  return attention.AttentionSpec(kind=kind, num_categories=N,
                                 channel_prior_dim=CP, reduction=R,
                                 spatial_kernel=K)


def _attn(kind, c, h):
  """Parameters of one attention module on an h x h x c map (eqs. 1-2)."""
  hid = max(c // R, 1)
  mlp = lambda d_in: d_in * hid + hid + hid * c + c
  return {
      "cscnn": mlp(c + CP) + N * CP + K * K * 3 + 1 + N * h * h,
      "cscnn_channel": mlp(c + CP) + N * CP,
      "cscnn_spatial": K * K * 3 + 1 + N * h * h,
      "cbam": mlp(c) + K * K * 2 + 1,
      "se": mlp(c),
      "none": 0,
  }[kind]


def _conv(k, c_in, c_out, bias=True):
  return k * k * c_in * c_out + (c_out if bias else 0)


def _fc(d_in, d_out):
  return d_in * d_out + d_out


def small_params(kind, s, channels, d):
  """conv3x3 (+bias) + attention per layer; 2x2 pools between; GAP; FC."""
  n, c_in = 0, 3
  for i, c in enumerate(channels):
    n += _conv(3, c_in, c) + _attn(kind, c, s)
    if i < len(channels) - 1:
      s = -(-s // 2)
    c_in = c
  return n + _fc(c_in, d)


def cnnf_params(kind, s, fc, d):
  """conv1 11x11/4 VALID, pools 3x3/2 pad (0, 1), conv2 5x5, conv3-5 3x3; FC-FC-FC."""
  pool = lambda n: n // 2 if n >= 2 else n
  s1 = (s - 11) // 4 + 1
  s2 = pool(s1)
  s3 = pool(s2)
  s4 = pool(s3)
  n = _conv(11, 3, 64) + _attn(kind, 64, s1)
  n += _conv(5, 64, 256) + _attn(kind, 256, s2)
  n += 3 * (_conv(3, 256, 256) + _attn(kind, 256, s3))
  return n + _fc(s4 * s4 * 256, fc) + _fc(fc, fc) + _fc(fc, d)


def resnet18_params(kind, s, w, d):
  """Bias-free convs, GroupNorm (2C each), attention after each 3x3/7x7 conv."""
  gn = lambda c: 2 * c
  s = -(-s // 2)
  n = _conv(7, 3, w, False) + gn(w) + _attn(kind, w, s)
  s = -(-s // 2)
  c_in = w
  for stage in range(4):
    c = w * 2**stage
    for i in range(2):
      stride = 2 if stage > 0 and i == 0 else 1
      s = -(-s // stride)
      n += _conv(3, c_in, c, False) + gn(c) + _attn(kind, c, s)
      n += _conv(3, c, c, False) + gn(c) + _attn(kind, c, s)
      if stride != 1 or c_in != c:
        n += _conv(1, c_in, c, False) + gn(c)
      c_in = c
  return n + _fc(c_in, d)


def _uniform(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape),
                     jnp.float32)


def _abstract(name, kind, size, d, **kw):
  return nnx.eval_shape(lambda: backbones.build_backbone(
      name, size, d, _spec(kind), rngs=rbg_rngs(), **kw))


def _numpy_params(abstract, seed=0):
  """Fills an abstract module's parameters from numpy, scaled by 1/sqrt(fan-in).

  Eager init compiles one RNG program per parameter shape, seconds for a
  ResNet-18 on a busy CPU; the test using this checks computation, not init.
  """
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(x):
    fan_in = max(int(np.prod(x.shape[:-1])), 1)
    return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(fan_in), x.dtype)

  return nnx.merge(graphdef, jax.tree.map(fill, state))


def _count(module):
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("kind", KINDS)
def test_small_param_count(kind):
  for size in (32, 33):
    m = _abstract("small", kind, size, 24, small_channels=(8, 16, 32))
    assert _count(m) == small_params(kind, size, (8, 16, 32), 24)


@pytest.mark.parametrize("kind", KINDS)
def test_cnnf_param_count(kind):
  m = _abstract("cnnf", kind, 64, 16, fc_dim=48)
  assert _count(m) == cnnf_params(kind, 64, 48, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_resnet18_param_count(kind):
  m = _abstract("resnet18", kind, 40, 16, resnet_width=16)
  assert _count(m) == resnet18_params(kind, 40, 16, 16)


def test_full_size_counts():
  # ResNet-18 without attention, 1000 outputs: torchvision's 11,689,512
  # (GroupNorm has the same 2C affine parameters as BatchNorm).
  m = _abstract("resnet18", "none", 224, 1000)
  assert _count(m) == resnet18_params("none", 224, 64, 1000) == 11_689_512
  # CNN-F at 224 px with its 1000-way fc8 and no attention is the published
  # model: the weights the authors released (MatConvNet imagenet-vgg-f)
  # hold conv1 11x11x3x64, conv2 5x5x64x256, conv3-5 3x3x256x256,
  # fc6 6x6x256x4096, fc7 4096x4096, fc8 4096x1000, plus biases:
  # 60,834,536 parameters, 6x6x256 before fc6.
  m = _abstract("cnnf", "none", 224, 1000)
  assert _count(m) == 60_834_536
  assert m.fc6.kernel.shape == (6 * 6 * 256, 4096)
  m = _abstract("cnnf", "cscnn", 224, 64)
  assert _count(m) == cnnf_params("cscnn", 224, 4096, 64)


def test_spatial_priors_follow_feature_map_sizes():
  def prior_sizes(attns):
    return [a.spatial_prior.shape[1:] for a in attns]
  cnnf = _abstract("cnnf", "cscnn", 224, 8, fc_dim=8)
  assert prior_sizes(cnnf.attns) == [
      (54, 54), (27, 27), (13, 13), (13, 13), (13, 13)]
  assert prior_sizes(_abstract("small", "cscnn", 32, 8).attns) == [
      (32, 32), (16, 16), (8, 8), (4, 4)]
  resnet = _abstract("resnet18", "cscnn", 224, 8, resnet_width=8)
  sizes = prior_sizes([resnet.stem_attn] + [
      a for b in resnet.blocks for a in (b.attn1, b.attn2)])
  assert sizes == [(112, 112)] + [(56, 56)] * 4 + [(28, 28)] * 4 + [
      (14, 14)] * 4 + [(7, 7)] * 4


@pytest.mark.parametrize("name,size,kw", [
    ("small", 20, dict(small_channels=(4, 8))),
    ("cnnf", 32, dict(fc_dim=16)),
    ("resnet18", 24, dict(resnet_width=4)),
])
def test_output_shapes_and_dtypes(name, size, kw):
  for dtype in (jnp.float32, jnp.bfloat16):
    m = nnx.eval_shape(lambda: backbones.build_backbone(
        name, size, 12, _spec("cscnn"), dtype=dtype, rngs=rbg_rngs(), **kw))
    x = jax.ShapeDtypeStruct((3, size, size, 3), dtype)
    c = jax.ShapeDtypeStruct((3,), jnp.int32)
    out = nnx.eval_shape(lambda m, x, c: m(x, c), m, x, c)
    assert out.shape == (3, 12) and out.dtype == dtype


def test_resnet18_rows_are_independent_and_category_conditioned():
  """GroupNorm statistics are per image: an embedding depends on its own
  pixels and category only, never on the other rows of the batch."""
  m = _numpy_params(_abstract("resnet18", "cscnn", 16, 6, resnet_width=4))
  fwd = jit_o0(lambda m, x, c: m(x, c))
  x = _uniform(0, (4, 16, 16, 3))
  c = jnp.array([1, 2, 3, 4])
  y = fwd(m, x, c)
  x2 = x.at[1:].set(_uniform(1, (3, 16, 16, 3)))
  y2 = fwd(m, x2, c.at[1:].set(0))
  np.testing.assert_allclose(y2[0], y[0], rtol=1e-5, atol=1e-6)
  y3 = fwd(m, x, c.at[0].set(2))
  assert float(jnp.max(jnp.abs(y3[0] - y[0]))) > 1e-4
  # bfloat16 compute (GroupNorm statistics included) stays close to float32.
  graphdef16 = nnx.split(_abstract("resnet18", "cscnn", 16, 6, resnet_width=4,
                                   dtype=jnp.bfloat16))[0]
  m16 = nnx.merge(graphdef16, nnx.state(m))  # the same float32 parameters
  y16 = fwd(m16, x.astype(jnp.bfloat16), c)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(y16.astype(jnp.float32), y,
                             atol=0.05 * float(jnp.max(jnp.abs(y))) + 0.02)


def test_max_pool_fast_path_matches_reduce_window():
  x = _uniform(2, (2, 8, 6, 3))
  fast = backbones.max_pool(x, 2, 2)
  ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                              (1, 2, 2, 1), "VALID")
  np.testing.assert_array_equal(fast, ref)
  # Odd maps take the general path with ceil-mode padding.
  assert backbones.max_pool(x[:, :7, :5], 2, 2).shape == (2, 4, 3, 3)
  np.testing.assert_array_equal(
      backbones.max_pool(x, 3, 2, ((1, 1), (1, 1)))[:, 1, 1],
      x[:, 1:4, 1:4].max(axis=(1, 2)))


def test_rejects_bad_config():
  with pytest.raises(ValueError):
    backbones.build_backbone("vgg", 32, 8, _spec("none"), rngs=rbg_rngs())
  with pytest.raises(ValueError):
    backbones.build_backbone("cnnf", 8, 8, _spec("none"), rngs=rbg_rngs())


def test_cnnf_fc_dropout_only_with_a_key():
  m = _numpy_params(_abstract("cnnf", "none", 40, 6, fc_dim=32))
  x = jax.random.normal(jax.random.key(0), (3, 40, 40, 3))
  cats = jnp.zeros((3,), jnp.int32)
  plain = m(x, cats)
  np.testing.assert_array_equal(plain, m(x, cats))  # deterministic
  a = m(x, cats, dropout_rng=jax.random.key(1))
  b = m(x, cats, dropout_rng=jax.random.key(2))
  assert not np.allclose(a, plain) and not np.allclose(a, b)
  m.fc_dropout = 0.0
  np.testing.assert_allclose(m(x, cats, dropout_rng=jax.random.key(1)), plain,
                             rtol=1e-6)
