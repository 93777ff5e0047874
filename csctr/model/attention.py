"""Category-conditioned attention after every conv layer (CSCNN, KDD 2020).

For a conv layer's output F [U, H, W, C] and each image's category k:

  channel:  Mc = sigmoid(MLP([AvgPool(F); Ac_k]) + MLP([MaxPool(F); Ac_k])) (1)
            F' = Mc * F
  spatial:  Ms = sigmoid(conv_kxk([mean_c(F'); max_c(F'); As_k]))            (2)
            F'' = Ms * F'

Ac_k (a C'-vector) and As_k (an H x W map) are learned per layer and per
category; row 0 is the out-of-vocabulary category. One MLP (hidden width
C // r) is shared by both branches of (1). The ablations drop pieces:

  cscnn          (1) and (2) with the category priors Ac, As
  cscnn_channel  (1) with Ac only;   cscnn_spatial  (2) with As only
  cbam           (1) and (2) without priors (Woo et al., ECCV 2018)
  se             sigmoid(MLP(AvgPool(F))) only (Hu et al., CVPR 2018)
  none           identity, no parameters

Everything is per image (no statistics across rows), so an image's output
does not depend on which other images share its batch.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

ATTENTION_CHOICES = ("cscnn", "cscnn_channel", "cscnn_spatial", "cbam", "se",
                     "none")

# Priors are looked up like embeddings; unit scale makes them as large as the
# pooled features they are concatenated with, so categories matter from step 0.
_PRIOR_INIT = nnx.initializers.normal(stddev=1.0)
# Gates start open, sigmoid(2) = 0.88, rather than at sigmoid(0) = 0.5: two
# half-closed gates per layer would shrink a plain (normalisation-free) CNN's
# activations 4x per layer at init, ~1e-3 after CNN-F's five conv layers.
_GATE_LOGIT = 2.0


def _planes_corr(xp: jax.Array, kernel: jax.Array, h: int, w: int
                 ) -> jax.Array:
  """[U, Cin, h+k-1, w+k-1] (*) [k, k, Cin, Cout] -> [U, Cout, h, w].

  Multiply-adds of shifted channel planes, vectorised along w: a loop over
  the k row taps (so the program, and its compile time, stays small), each
  step adding its k x Cin column taps in one fused pass.
  """
  k, _, cin, cout = kernel.shape

  def row_tap(i, acc):
    rows = jax.lax.dynamic_slice_in_dim(xp, i, h, axis=2)  # [U, Cin, h, w+k-1]
    taps = jax.lax.dynamic_index_in_dim(kernel, i, 0, keepdims=False)
    outs = []
    for co in range(cout):
      out = acc[:, co]
      for ci in range(cin):
        for j in range(k):
          out = out + taps[j, ci, co] * rows[:, ci, :, j:j + w]
      outs.append(out)
    return jnp.stack(outs, axis=1)

  init = jnp.zeros((xp.shape[0], cout, h, w), xp.dtype)
  return jax.lax.fori_loop(0, k, row_tap, init)


def _pads(k: int) -> tuple[int, int]:
  return (k - 1) // 2, k // 2  # SAME: the extra row/column goes after


def _conv_to_one_map_fwd(x, kernel):
  lo, hi = _pads(kernel.shape[0])
  h, w = x.shape[1], x.shape[2]
  xp = jnp.pad(jnp.transpose(x, (0, 3, 1, 2)),
               ((0, 0), (0, 0), (lo, hi), (lo, hi)))
  y = jnp.transpose(_planes_corr(xp, kernel, h, w), (0, 2, 3, 1))
  return y, (xp, kernel)


def _conv_to_one_map_bwd(residuals, dy):
  xp, kernel = residuals
  k = kernel.shape[0]
  lo, hi = _pads(k)
  h, w = dy.shape[1], dy.shape[2]
  d = jnp.transpose(dy, (0, 3, 1, 2))  # [U, 1, h, w]
  # Input gradient: the same correlation of dy with the flipped kernel.
  dp = jnp.pad(d, ((0, 0), (0, 0), (hi, lo), (hi, lo)))
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  dx = jnp.transpose(_planes_corr(dp, flipped, h, w), (0, 2, 3, 1))
  # Kernel gradient: per row tap i, one matmul over (U, h); the k diagonals
  # of its [Cin, w+k-1, w] result are the k column taps.
  cols = jnp.arange(k)[:, None] + jnp.arange(w)[None, :]  # [k, w]: v + j
  diag = jnp.broadcast_to(jnp.arange(w), (k, w))

  def row_tap(i, dk):
    rows = jax.lax.dynamic_slice_in_dim(xp, i, h, axis=2)
    m = jnp.einsum("uchx,uhv->cxv", rows, d[:, 0])
    taps = jnp.sum(m[:, cols, diag], axis=-1).T  # [k(j), Cin]
    return jax.lax.dynamic_update_index_in_dim(dk, taps.astype(dk.dtype),
                                               i, 0)

  dk = jax.lax.fori_loop(0, k, row_tap, jnp.zeros(kernel.shape[:3],
                                                  kernel.dtype))
  return dx, dk[..., None]


@jax.custom_vjp
def _conv_to_one_map(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """SAME (zero-padded) kxk cross-correlation of x [U, H, W, c] to [U, H, W, 1].

  Equal to lax.conv_general_dilated(x, kernel, 1, 'SAME') with an HWIO
  kernel [k, k, c, 1], in values and gradients. XLA:CPU runs that conv (2-3
  input channels, one output) and its gradients pathologically slowly: at
  U = 1000 maps of 32 x 32 it took 2.4 s forward + backward, as long as the
  3x3 conv layer it follows. Here the forward pass and the input gradient
  are multiply-adds of shifted channel planes, and the kernel gradient is
  one matmul over (U, H) per row tap, each in a k-step loop (an unrolled
  form ran as fast but compiled 4x slower): 0.35 s forward + backward there,
  1.1 s to compile against lax.conv's 0.6 s (docs/performance.md).
  """
  return _conv_to_one_map_fwd(x, kernel)[0]


_conv_to_one_map.defvjp(_conv_to_one_map_fwd, _conv_to_one_map_bwd)
# Jitted: called eagerly (colabs/attention_maps.ipynb), the loops' bodies
# would otherwise be traced and compiled again on every call.
conv_to_one_map = jax.jit(_conv_to_one_map)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """The config of the attention module, shared by every layer of a backbone.

  Attributes:
    kind: one of ATTENTION_CHOICES.
    num_categories: rows of the prior tables (OOV category 0 included).
    channel_prior_dim: C', the size of the channel prior Ac_k.
    reduction: r, the hidden width of the shared MLP is max(C // r, 1).
    spatial_kernel: side of the spatial-attention convolution (7 in the
      papers).
  """

  kind: str = "cscnn"
  num_categories: int = 1
  channel_prior_dim: int = 8
  reduction: int = 4
  spatial_kernel: int = 7

  def __post_init__(self):
    if self.kind not in ATTENTION_CHOICES:
      raise ValueError(
          f"attention={self.kind!r} not in {ATTENTION_CHOICES}")

  @property
  def use_channel(self) -> bool:
    return self.kind in ("cscnn", "cscnn_channel", "cbam", "se")

  @property
  def use_spatial(self) -> bool:
    return self.kind in ("cscnn", "cscnn_spatial", "cbam")

  @property
  def channel_prior(self) -> bool:
    return self.kind in ("cscnn", "cscnn_channel")

  @property
  def spatial_prior(self) -> bool:
    return self.kind in ("cscnn", "cscnn_spatial")

  def hidden(self, channels: int) -> int:
    return max(channels // self.reduction, 1)

  def num_params(self, channels: int, height: int, width: int) -> int:
    """Parameter count of one module, by formula (documentation and tests)."""
    n = 0
    if self.use_channel:
      h = self.hidden(channels)
      prior = self.channel_prior_dim if self.channel_prior else 0
      d_in = channels + prior
      n += d_in * h + h + h * channels + channels  # shared 2-layer MLP
      if self.channel_prior:
        n += self.num_categories * self.channel_prior_dim  # Ac
    if self.use_spatial:
      c_in = 3 if self.spatial_prior else 2
      n += self.spatial_kernel**2 * c_in + 1  # conv kxk -> 1 map, with bias
      if self.spatial_prior:
        n += self.num_categories * height * width  # As
    return n

  def make(self, channels: int, height: int, width: int, *,
           dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs) -> CategoryAttention:
    return CategoryAttention(self, channels, height, width, dtype=dtype,
                             rngs=rngs)


class CategoryAttention(nnx.Module):
  """Eqs. (1)-(2) for one conv layer of fixed size H x W x C."""

  def __init__(self, spec: AttentionSpec, channels: int, height: int,
               width: int, *, dtype: jnp.dtype = jnp.float32,
               param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    self.spec = spec
    self.shape = (height, width, channels)
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if spec.use_channel:
      hidden = spec.hidden(channels)
      prior = spec.channel_prior_dim if spec.channel_prior else 0
      d_in = channels + prior
      self.mlp_hidden = nnx.Linear(d_in, hidden, **kw)
      # The logit of eq. (1) sums one bias per branch (one for SE, two else).
      branches = 1 if spec.kind == "se" else 2
      self.mlp_out = nnx.Linear(
          hidden, channels,
          bias_init=nnx.initializers.constant(_GATE_LOGIT / branches), **kw)
    if spec.channel_prior:
      self.channel_prior = nnx.Param(_PRIOR_INIT(
          rngs.params(), (spec.num_categories, spec.channel_prior_dim),
          param_dtype))
    if spec.use_spatial:
      c_in = 3 if spec.spatial_prior else 2
      k = spec.spatial_kernel
      # The kxk conv of eq. (2) to one map: kernel [k, k, c_in, 1] (HWIO).
      self.spatial_kernel = nnx.Param(nnx.initializers.lecun_normal()(
          rngs.params(), (k, k, c_in, 1), param_dtype))
      self.spatial_bias = nnx.Param(jnp.full((1,), _GATE_LOGIT, param_dtype))
    if spec.spatial_prior:
      self.spatial_prior = nnx.Param(_PRIOR_INIT(
          rngs.params(), (spec.num_categories, height, width), param_dtype))

  def channel_map(self, x: jax.Array, categories: jax.Array) -> jax.Array:
    """Mc [U, C] of eq. (1) (SE: avg branch only, no prior)."""
    pooled = [jnp.mean(x, axis=(1, 2))]
    if self.spec.kind != "se":
      pooled.append(jnp.max(x, axis=(1, 2)))
    z = jnp.stack(pooled)  # [branches, U, C]: one MLP call for both branches
    if self.spec.channel_prior:
      ac = self.channel_prior[...][categories].astype(z.dtype)  # [U, C']
      z = jnp.concatenate([z, jnp.broadcast_to(ac, z.shape[:2] + ac.shape[1:])],
                          axis=-1)
    z = self.mlp_out(jax.nn.relu(self.mlp_hidden(z)))
    return jax.nn.sigmoid(jnp.sum(z, axis=0))

  def spatial_map(self, x: jax.Array, categories: jax.Array) -> jax.Array:
    """Ms [U, H, W, 1] of eq. (2)."""
    maps = [jnp.mean(x, axis=-1, keepdims=True),
            jnp.max(x, axis=-1, keepdims=True)]
    if self.spec.spatial_prior:
      prior = self.spatial_prior[...][categories][..., None]  # As_k
      maps.append(prior.astype(x.dtype))
    s = conv_to_one_map(jnp.concatenate(maps, axis=-1),
                        self.spatial_kernel[...].astype(x.dtype))
    return jax.nn.sigmoid(s + self.spatial_bias[...].astype(x.dtype))

  def with_maps(self, x: jax.Array, categories: jax.Array
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(F'', gates) for inspection (colabs/attention_maps.ipynb).

    __call__ is this without the gates. gates: 'channel' Mc [U, C] and
    'spatial' Ms [U, H, W], where this module has them.
    """
    if x.shape[1:] != self.shape:
      raise ValueError(f"attention built for {self.shape}, got {x.shape[1:]}")
    gates = {}
    if self.spec.use_channel:
      gates["channel"] = self.channel_map(x, categories)
      x = x * gates["channel"][:, None, None, :].astype(x.dtype)
    if self.spec.use_spatial:
      ms = self.spatial_map(x, categories)
      gates["spatial"] = ms[..., 0]
      x = x * ms.astype(x.dtype)
    return x, gates

  def __call__(self, x: jax.Array, categories: jax.Array) -> jax.Array:
    """F [U, H, W, C], categories int32 [U] -> F'' [U, H, W, C]."""
    # The gates are dead code under jit, so XLA drops them from the step.
    return self.with_maps(x, categories)[0]
