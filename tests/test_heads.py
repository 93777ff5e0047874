"""CTR heads: cross layers vs eqs. (3)-(4) in numpy, parameter counts, dtype."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csctr.model import heads

B, D = 5, 7


def _rngs(seed=0):
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _x0(seed=0):
  return np.random.default_rng(seed).normal(size=(B, D))


def _np(p):
  return np.asarray(p[...], np.float64)


def test_dcn_cross_layers_match_formula():
  net = heads.CrossNetwork(D, 3, dtype=jnp.float32, rngs=_rngs())
  # Non-zero biases so that the + b_l term is checked too.
  net.bias[...] = jnp.asarray(np.random.default_rng(1).normal(size=(3, D)),
                              jnp.float32)
  x0 = _x0()
  w, b = _np(net.kernel), _np(net.bias)
  x = x0
  for l in range(3):
    # x_{l+1} = x0 * (x_l . w_l) + b_l + x_l, row by row.
    x = np.stack([x0[i] * np.dot(x[i], w[l]) + b[l] + x[i] for i in range(B)])
  np.testing.assert_allclose(net(jnp.asarray(x0, jnp.float32)), x, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("rank", [0, 2])
def test_dcnv2_cross_layers_match_formula(rank):
  net = heads.CrossNetworkV2(D, 2, rank, dtype=jnp.float32, rngs=_rngs())
  net.bias[...] = jnp.asarray(np.random.default_rng(1).normal(size=(2, D)),
                              jnp.float32)
  x0 = _x0()
  b = _np(net.bias)
  x = x0
  for l in range(2):
    if rank:
      mat = _np(net.v)[l] @ _np(net.u)[l]  # (U V^T)^T for row vectors
      assert np.linalg.matrix_rank(mat) == rank
    else:
      mat = _np(net.kernel)[l]
    # x_{l+1} = x0 * (W_l x_l + b_l) + x_l, with x as row vectors.
    x = x0 * (x @ mat + b[l]) + x
  np.testing.assert_allclose(net(jnp.asarray(x0, jnp.float32)), x, rtol=1e-5,
                             atol=1e-5)


def _expected_params(kind, d, layers, rank, mlp):
  mlp_n, prev = 0, d
  for m in mlp:
    mlp_n, prev = mlp_n + prev * m + m, m
  cross = {"dcn": layers * 2 * d,
           "dcnv2": layers * ((2 * d * rank if rank else d * d) + d)}
  logit_in = {"dcn": d + prev, "dcnv2": d + prev, "lr": d, "dnn": prev}[kind]
  return (cross.get(kind, 0) + (mlp_n if kind != "lr" else 0)
          + logit_in + 1)


@pytest.mark.parametrize("kind,rank", [("dcn", 0), ("dcnv2", 0), ("dcnv2", 3),
                                       ("lr", 0), ("dnn", 0)])
def test_param_count_and_output(kind, rank):
  head = heads.CTRHead(kind, D, cross_layers=2, cross_low_rank=rank,
                       mlp_dims=(8, 4), rngs=_rngs())
  n = sum(x.size for x in jax.tree.leaves(nnx.state(head, nnx.Param)))
  assert n == _expected_params(kind, D, 2, rank, (8, 4))
  assert n == heads.head_num_params(kind, D, 2, rank, (8, 4))
  out = head(jnp.asarray(_x0(), jnp.float32))
  assert out.shape == (B,) and out.dtype == jnp.float32


def test_lr_is_linear_in_x0():
  head = heads.CTRHead("lr", D, rngs=_rngs())
  x0 = _x0()
  expected = x0 @ _np(head.logit.kernel)[:, 0] + _np(head.logit.bias)[0]
  np.testing.assert_allclose(head(jnp.asarray(x0, jnp.float32)), expected,
                             rtol=1e-5, atol=1e-5)


def test_dcn_logit_combines_cross_and_deep_parts():
  head = heads.CTRHead("dcn", D, cross_layers=2, mlp_dims=(8,), rngs=_rngs())
  x0 = jnp.asarray(_x0(), jnp.float32)
  h = jnp.concatenate([head.cross(x0), head.mlp(x0)], -1)
  expected = np.asarray(h) @ _np(head.logit.kernel)[:, 0] + _np(
      head.logit.bias)[0]
  np.testing.assert_allclose(head(x0), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", heads.HEAD_CHOICES)
def test_bfloat16_compute_float32_logits(kind):
  h32 = heads.CTRHead(kind, D, cross_layers=2, mlp_dims=(8,), rngs=_rngs())
  h16 = heads.CTRHead(kind, D, cross_layers=2, mlp_dims=(8,),
                      dtype=jnp.bfloat16, rngs=_rngs())
  assert all(p.dtype == jnp.float32
             for p in jax.tree.leaves(nnx.state(h16, nnx.Param)))
  x0 = jnp.asarray(_x0(), jnp.float32) * 0.5
  y16 = nnx.jit(lambda h, x: h(x))(h16, x0)
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(y16, h32(x0), rtol=5e-2, atol=5e-2)


def test_rejects_unknown_head():
  with pytest.raises(ValueError):
    heads.CTRHead("fm", D, rngs=_rngs())
