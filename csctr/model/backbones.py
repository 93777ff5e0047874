"""CNN backbones with a category-conditioned attention module after every conv.

All backbones are NHWC, take images already normalised to the compute dtype
plus the category of every image, and return one embedding [U, d] per image.

  small     conv3x3 stacks (default 32-32-64-64 channels), 2x2 max pools,
            global average pool, FC -> d. Sized for 32-64 px images on CPU.
  cnnf      CNN-F as used by DVBPR and CSCNN (Chatfield et al., BMVC 2014):
            conv 11x11/4 x64, 5x5 x256, three 3x3 x256, 3x3/2 max pools,
            FC fc_dim - fc_dim - d (4096-4096 at full size), dropout after
            fc6 and fc7; 6x6x256 before fc6 at 224 px.
  resnet18  ResNet-18 (He et al., CVPR 2016) with GroupNorm, base width
            configurable (64 at full size).

No BatchNorm anywhere: batch statistics would make an image's embedding depend
on the other images of its batch, which breaks (a) the exact equivalence
between grouped and per-impression batches and (b) invariance to padding rows.
ResNet-18 therefore uses GroupNorm (per-image statistics, Wu & He, ECCV 2018)
with 16 channels per group, so groups stay meaningful on the 1x1 maps that
small images reach in the last stage; the attention module sits on the
residual branch after each 3x3 conv (and after the stem), before the addition,
as CBAM places it. CNN-F drops its LRN layers (VGG, Simonyan & Zisserman 2015,
found LRN does not improve accuracy). Spatial priors As_k follow each layer's
own feature-map size, computed here from the input size.
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from csctr.model import attention as attention_lib
from csctr.model import conv as conv_lib

BACKBONE_CHOICES = ("small", "cnnf", "resnet18")

# He initialisation for layers followed by ReLU: without normalisation layers
# (small, cnnf) LeCun init would halve the activations' second moment per layer.
_HE = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


def max_pool(x: jax.Array, window: int, stride: int,
             padding: str | Sequence[tuple[int, int]] = "SAME") -> jax.Array:
  """Max pool over H, W of NHWC `x`.

  When the window tiles the map exactly this is a reshape + max, which XLA on
  CPU runs much faster than reduce_window (and whose gradient is cheaper).
  """
  _, h, w, c = x.shape
  if window == stride and h % window == 0 and w % window == 0:
    return x.reshape(-1, h // window, window, w // window, window, c).max(
        axis=(2, 4))
  return nnx.max_pool(x, (window, window), (stride, stride),
                      padding if isinstance(padding, str) else tuple(padding))


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


class SmallCNN(nnx.Module):
  """conv3x3 -> ReLU -> attention [-> 2x2 max pool] per layer; GAP; FC."""

  def __init__(self, image_size: int, out_dim: int,
               spec: attention_lib.AttentionSpec,
               channels: Sequence[int] = (32, 32, 64, 64), *,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, rngs=rngs)
    self.convs, self.attns, pools = nnx.List(), nnx.List(), []
    size, c_in = image_size, 3
    # On CPU the 3x3 convs run as one matmul each (csctr/model/conv.py):
    # XLA:CPU's own small convs, and above all their gradients, are slower
    # (1.45x on the K=1 train step, docs/performance.md). Same parameters
    # and equations either way; accelerators keep their native convs.
    conv_fn = (conv_lib.im2col_conv_general_dilated
               if jax.default_backend() == "cpu" else
               jax.lax.conv_general_dilated)
    for i, c in enumerate(channels):
      self.convs.append(nnx.Conv(c_in, c, (3, 3), padding="SAME",
                                 kernel_init=_HE, conv_general_dilated=conv_fn,
                                 **kw))
      self.attns.append(spec.make(c, size, size, **kw))
      # Pool after every layer but the last while the map can still shrink.
      pool = i < len(channels) - 1 and size > 1
      pools.append(pool)
      size, c_in = (_ceil_div(size, 2) if pool else size), c
    self.pool = tuple(pools)
    self.fc = nnx.Linear(c_in, out_dim, **kw)

  def __call__(self, x: jax.Array, categories: jax.Array,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    del dropout_rng  # no dropout layers
    return self.attention_maps(x, categories)[0]  # gates: dead code under jit

  def attention_maps(self, x: jax.Array, categories: jax.Array
                     ) -> tuple[jax.Array, list[dict[str, jax.Array]]]:
    """(embedding, per-layer attention gates): __call__, with its gates kept.

    For looking inside the encoder (colabs/attention_maps.ipynb); see
    CategoryAttention.with_maps for the gates of one layer.
    """
    layers = []
    for conv, attn, pool in zip(self.convs, self.attns, self.pool):
      x, gates = attn.with_maps(jax.nn.relu(conv(x)), categories)
      layers.append(gates)
      if pool:
        x = max_pool(x, 2, 2)
    return self.fc(jnp.mean(x, axis=(1, 2))), layers


class CNNF(nnx.Module):
  """CNN-F (DVBPR / CSCNN backbone), as published (Chatfield et al. 2014).

  The layer shapes and paddings of the authors' released model
  (MatConvNet's imagenet-vgg-f): conv1 11x11/4 unpadded; 3x3/2 max pools
  padded by one row and column at the bottom/right, so a map of n becomes
  n // 2; at 224 px that is 54 -> 27 -> 13 -> 6, and fc6 reads 6x6x256 =
  9216 inputs. fc6 and fc7 are followed by dropout (rate fc_dropout, 0.5 in
  CNN-F) when a dropout_rng is given, i.e. in training. Maps smaller than
  2 (images under 35 px) pool with SAME padding instead, so small images
  still work. LRN is dropped (see the module docstring).
  """

  def __init__(self, image_size: int, out_dim: int,
               spec: attention_lib.AttentionSpec, fc_dim: int = 4096, *,
               fc_dropout: float = 0.5, dtype: jnp.dtype = jnp.float32,
               rngs: nnx.Rngs):
    if image_size < 11:
      raise ValueError(f"cnnf needs images of >= 11 px, got {image_size}")
    if not 0.0 <= fc_dropout < 1.0:
      raise ValueError(f"fc_dropout={fc_dropout} outside [0, 1)")
    kw = dict(dtype=dtype, rngs=rngs)
    # (out channels, kernel, stride, padding, pool after)
    layers = [(64, 11, 4, "VALID", True), (256, 5, 1, "SAME", True),
              (256, 3, 1, "SAME", False), (256, 3, 1, "SAME", False),
              (256, 3, 1, "SAME", True)]
    self.convs, self.attns, pools = nnx.List(), nnx.List(), []
    size, c_in = image_size, 3
    for c, k, s, pad, pool in layers:
      self.convs.append(nnx.Conv(c_in, c, (k, k), (s, s), padding=pad,
                                 kernel_init=_HE, **kw))
      size = (size - k) // s + 1 if pad == "VALID" else _ceil_div(size, s)
      self.attns.append(spec.make(c, size, size, **kw))
      pools.append(pool)
      size = _cnnf_pool_size(size) if pool else size
      c_in = c
    self.pool = tuple(pools)
    self.final_size = size
    self.fc_dropout = fc_dropout
    self.fc6 = nnx.Linear(size * size * c_in, fc_dim, kernel_init=_HE, **kw)
    self.fc7 = nnx.Linear(fc_dim, fc_dim, kernel_init=_HE, **kw)
    self.fc8 = nnx.Linear(fc_dim, out_dim, **kw)

  def __call__(self, x: jax.Array, categories: jax.Array,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    for conv, attn, pool in zip(self.convs, self.attns, self.pool):
      x = attn(jax.nn.relu(conv(x)), categories)
      if pool:
        x = max_pool(x, 3, 2, ((0, 1), (0, 1)) if x.shape[1] >= 2 else "SAME")
    x = x.reshape(x.shape[0], -1)
    keys = (jax.random.split(dropout_rng) if dropout_rng is not None
            else (None, None))
    x = _dropout(jax.nn.relu(self.fc6(x)), self.fc_dropout, keys[0])
    x = _dropout(jax.nn.relu(self.fc7(x)), self.fc_dropout, keys[1])
    return self.fc8(x)


def _cnnf_pool_size(n: int) -> int:
  """Output size of CNN-F's 3x3/2 pool padded (0, 1): n // 2 (SAME below 2)."""
  return n // 2 if n >= 2 else n


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity without an rng (eval, export, serving)."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _group_norm(c: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
  return nnx.GroupNorm(c, num_groups=None, group_size=min(16, c), dtype=dtype,
                       rngs=rngs)


class BasicBlock(nnx.Module):
  """ResNet basic block; attention after each conv (on the residual branch,
  before the addition, as CBAM places it)."""

  def __init__(self, c_in: int, c_out: int, stride: int, size: int,
               spec: attention_lib.AttentionSpec, *, dtype: jnp.dtype,
               rngs: nnx.Rngs):
    kw = dict(use_bias=False, kernel_init=_HE, dtype=dtype, rngs=rngs)
    self.conv1 = nnx.Conv(c_in, c_out, (3, 3), (stride, stride),
                          padding=((1, 1), (1, 1)), **kw)
    self.norm1 = _group_norm(c_out, dtype, rngs)
    self.attn1 = spec.make(c_out, size, size, dtype=dtype, rngs=rngs)
    self.conv2 = nnx.Conv(c_out, c_out, (3, 3), padding=((1, 1), (1, 1)), **kw)
    self.norm2 = _group_norm(c_out, dtype, rngs)
    self.attn2 = spec.make(c_out, size, size, dtype=dtype, rngs=rngs)
    proj = proj_norm = None
    if stride != 1 or c_in != c_out:
      proj = nnx.Conv(c_in, c_out, (1, 1), (stride, stride), padding="VALID",
                      **kw)
      proj_norm = _group_norm(c_out, dtype, rngs)
    self.proj, self.proj_norm = nnx.data(proj), nnx.data(proj_norm)

  def __call__(self, x: jax.Array, categories: jax.Array) -> jax.Array:
    y = self.attn1(jax.nn.relu(self.norm1(self.conv1(x))), categories)
    y = self.attn2(self.norm2(self.conv2(y)), categories)
    if self.proj is not None:
      x = self.proj_norm(self.proj(x))
    return jax.nn.relu(x + y)


class ResNet18(nnx.Module):
  """ResNet-18: 7x7/2 stem, 3x3/2 max pool, 4 stages of 2 basic blocks, GAP."""

  def __init__(self, image_size: int, out_dim: int,
               spec: attention_lib.AttentionSpec, width: int = 64, *,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    size = _ceil_div(image_size, 2)  # pad 3, k 7, stride 2
    self.stem = nnx.Conv(3, width, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
                         use_bias=False, kernel_init=_HE, dtype=dtype,
                         rngs=rngs)
    self.stem_norm = _group_norm(width, dtype, rngs)
    self.stem_attn = spec.make(width, size, size, dtype=dtype, rngs=rngs)
    size = _ceil_div(size, 2)  # max pool 3x3/2, pad 1
    self.blocks = nnx.List()
    c_in = width
    for stage, mult in enumerate((1, 2, 4, 8)):
      for i in range(2):
        stride = 2 if stage > 0 and i == 0 else 1
        size = _ceil_div(size, stride)
        self.blocks.append(BasicBlock(c_in, width * mult, stride, size, spec,
                                      dtype=dtype, rngs=rngs))
        c_in = width * mult
    self.final_size = size
    self.fc = nnx.Linear(c_in, out_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, categories: jax.Array,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    del dropout_rng  # no dropout layers
    x = jax.nn.relu(self.stem_norm(self.stem(x)))
    x = self.stem_attn(x, categories)
    x = max_pool(x, 3, 2, ((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x, categories)
    return self.fc(jnp.mean(x, axis=(1, 2)))


def build_backbone(name: str, image_size: int, out_dim: int,
                   spec: attention_lib.AttentionSpec, *,
                   small_channels: Sequence[int] = (32, 32, 64, 64),
                   fc_dim: int = 4096, resnet_width: int = 64,
                   fc_dropout: float = 0.5, dtype: jnp.dtype = jnp.float32,
                   rngs: nnx.Rngs) -> nnx.Module:
  """The backbone named by config.model.backbone."""
  if name == "small":
    return SmallCNN(image_size, out_dim, spec, tuple(small_channels),
                    dtype=dtype, rngs=rngs)
  if name == "cnnf":
    return CNNF(image_size, out_dim, spec, fc_dim, fc_dropout=fc_dropout,
                dtype=dtype, rngs=rngs)
  if name == "resnet18":
    return ResNet18(image_size, out_dim, spec, resnet_width, dtype=dtype,
                    rngs=rngs)
  raise ValueError(f"backbone={name!r} not in {BACKBONE_CHOICES}")
