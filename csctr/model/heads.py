"""CTR heads: x0 = concat(ID embeddings, dense, visual, behaviour) -> logit.

  dcn    Deep & Cross Network (Wang et al., ADKDD 2017), cross layer
           x_{l+1} = x0 * (x_l . w_l) + b_l + x_l                           (3)
         in parallel with an MLP; [x_L; mlp(x0)] -> linear -> logit.
  dcnv2  DCN-V2 (Wang et al., WWW 2021), matrix cross layer
           x_{l+1} = x0 * (W_l x_l + b_l) + x_l                              (4)
         with W_l = U_l V_l^T when cross_low_rank > 0; parallel to an MLP
         as in dcn.
  lr     logistic regression on x0.
  dnn    the MLP alone.

Heads compute in `dtype` (bfloat16 for mixed precision) and return float32
logits [B].
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

HEAD_CHOICES = ("dcn", "dcnv2", "lr", "dnn")


class MLP(nnx.Module):
  """Linear -> ReLU stack (ReLU after every layer, including the last)."""

  def __init__(self, in_dim: int, dims: Sequence[int], *, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.layers = nnx.List()
    for d in dims:
      self.layers.append(nnx.Linear(in_dim, d, dtype=dtype, rngs=rngs))
      in_dim = d
    self.out_dim = in_dim

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return x


class CrossNetwork(nnx.Module):
  """Eq. (3): rank-one feature crosses, 2 D parameters per layer."""

  def __init__(self, dim: int, num_layers: int, *, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(stddev=dim**-0.5)
    self.kernel = nnx.Param(init(rngs.params(), (num_layers, dim)))  # w_l
    self.bias = nnx.Param(jnp.zeros((num_layers, dim)))  # b_l
    self.num_layers = num_layers
    self.dtype = dtype

  def __call__(self, x0: jax.Array) -> jax.Array:
    w = self.kernel[...].astype(self.dtype)
    b = self.bias[...].astype(self.dtype)
    x0 = x0.astype(self.dtype)
    x = x0
    for l in range(self.num_layers):
      x = x0 * (x @ w[l])[:, None] + b[l] + x
    return x


class CrossNetworkV2(nnx.Module):
  """Eq. (4): full-rank (D^2 + D per layer) or low-rank (2 D r + D) crosses."""

  def __init__(self, dim: int, num_layers: int, low_rank: int = 0, *,
               dtype: jnp.dtype, rngs: nnx.Rngs):
    self.num_layers, self.low_rank, self.dtype = num_layers, low_rank, dtype
    init = nnx.initializers.lecun_normal()
    if low_rank > 0:
      self.u = nnx.Param(init(rngs.params(), (num_layers, low_rank, dim)))
      self.v = nnx.Param(init(rngs.params(), (num_layers, dim, low_rank)))
    else:
      # kernel[l] maps x_l (row vector) to W_l x_l: x_l @ kernel[l].
      self.kernel = nnx.Param(init(rngs.params(), (num_layers, dim, dim)))
    self.bias = nnx.Param(jnp.zeros((num_layers, dim)))

  def __call__(self, x0: jax.Array) -> jax.Array:
    x0 = x0.astype(self.dtype)
    b = self.bias[...].astype(self.dtype)
    x = x0
    for l in range(self.num_layers):
      if self.low_rank > 0:
        wx = (x @ self.v[l].astype(self.dtype)) @ self.u[l].astype(self.dtype)
      else:
        wx = x @ self.kernel[l].astype(self.dtype)
      x = x0 * (wx + b[l]) + x
    return x


class CTRHead(nnx.Module):
  """x0 [B, D] -> logit float32 [B] for the head named by config.model.head."""

  def __init__(self, kind: str, in_dim: int, *, cross_layers: int = 3,
               cross_low_rank: int = 0, mlp_dims: Sequence[int] = (128, 64),
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if kind not in HEAD_CHOICES:
      raise ValueError(f"head={kind!r} not in {HEAD_CHOICES}")
    self.kind, self.dtype = kind, dtype
    cross = mlp = None
    out_dim = 0
    if kind == "dcn":
      cross = CrossNetwork(in_dim, cross_layers, dtype=dtype, rngs=rngs)
    elif kind == "dcnv2":
      cross = CrossNetworkV2(in_dim, cross_layers, cross_low_rank, dtype=dtype,
                             rngs=rngs)
    if kind in ("dcn", "dcnv2", "lr"):
      out_dim += in_dim
    if kind in ("dcn", "dcnv2", "dnn"):
      mlp = MLP(in_dim, tuple(mlp_dims), dtype=dtype, rngs=rngs)
      out_dim += mlp.out_dim
    self.cross, self.mlp = nnx.data(cross), nnx.data(mlp)
    self.logit = nnx.Linear(out_dim, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x0: jax.Array) -> jax.Array:
    x0 = x0.astype(self.dtype)
    parts = []
    if self.cross is not None:
      parts.append(self.cross(x0))
    elif self.kind == "lr":
      parts.append(x0)
    if self.mlp is not None:
      parts.append(self.mlp(x0))
    h = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    return self.logit(h)[:, 0].astype(jnp.float32)


def head_num_params(kind: str, in_dim: int, cross_layers: int = 3,
                    cross_low_rank: int = 0,
                    mlp_dims: Sequence[int] = (128, 64)) -> int:
  """Parameter count of CTRHead, by formula (documentation and tests)."""
  n, out_dim, d = 0, 0, in_dim
  if kind == "dcn":
    n += cross_layers * 2 * d
  elif kind == "dcnv2":
    per = 2 * d * cross_low_rank if cross_low_rank > 0 else d * d
    n += cross_layers * (per + d)
  if kind in ("dcn", "dcnv2", "lr"):
    out_dim += d
  if kind in ("dcn", "dcnv2", "dnn"):
    prev = d
    for m in mlp_dims:
      n += prev * m + m
      prev = m
    out_dim += prev
  return n + out_dim + 1
