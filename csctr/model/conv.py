"""Convolution as one matmul (im2col), for the small CNN on CPU.

XLA:CPU runs a small convolution (3-64 input channels, maps of 8-32 px) and
above all its two gradients (input and kernel) well below matmul speed: the
kernel gradient of a 3x3 conv over a batch of 32x32 maps was the largest
single op of the default train step (docs/performance.md). Written as

  cols = [x shifted by (i, j) for each of the kh x kw taps]   [N, H, W, kh*kw*C]
  y    = cols @ kernel.reshape(kh*kw*C, O)

the forward pass is one matmul, the kernel gradient is one matmul
cols^T @ dy, and the input gradient is a matmul plus shifted adds, all of
which XLA:CPU runs at matmul speed. The price is memory: cols is kh*kw times
the input (kept for the backward pass), which is small for 32 px images and
prohibitive for 224 px ones, so only the small backbone uses it.

`im2col_conv_general_dilated` has lax.conv_general_dilated's signature, so it
plugs into nnx.Conv(conv_general_dilated=...) without changing the layer's
parameters (checkpoints are unaffected); convolutions it does not cover
(strides, dilations, groups, other layouts) go to lax.conv_general_dilated.

SmallCNN uses it on CPU (csctr/model/backbones.py); tests/test_models.py
counts its matmuls over U rows like convs, to check that the CNN still runs
once per unique image. Writing the matmul as a 1x1 convolution instead was
3x slower than lax.conv on XLA:CPU (it stays a convolution).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
  if dimension_numbers is None or lhs.ndim != 4 or rhs.ndim != 4:
    return False
  want = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  got = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return tuple(got) == tuple(want)


def im2col_conv(x: jax.Array, kernel: jax.Array,
                padding: Sequence[tuple[int, int]], *, precision: Any = None,
                preferred_element_type: Any = None) -> jax.Array:
  """Stride-1 cross-correlation of NHWC x with HWIO kernel, as one matmul.

  padding: ((top, bottom), (left, right)) zeros, as lax.conv_general_dilated
  takes it. Equal to lax.conv_general_dilated(x, kernel, (1, 1), padding,
  dimension_numbers=('NHWC', 'HWIO', 'NHWC')) up to float rounding.
  """
  kh, kw, c, o = kernel.shape
  (top, bottom), (left, right) = padding
  xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  h = xp.shape[1] - kh + 1
  w = xp.shape[2] - kw + 1
  if kh == kw == 1:
    cols = xp
  else:
    # Taps in (i, j, channel) order: the order of kernel.reshape below.
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w, :]
                            for i in range(kh) for j in range(kw)], axis=-1)
  return jax.lax.dot_general(
      cols, kernel.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())),
      precision=precision, preferred_element_type=preferred_element_type)


def im2col_conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None, feature_group_count: int = 1,
    batch_group_count: int = 1, precision: Any = None,
    preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
  """lax.conv_general_dilated, by im2col_conv where that covers the call.

  Covered: 2-D NHWC/HWIO convolutions with unit strides and dilations, one
  feature group, any padding. Everything else is passed through unchanged.
  """
  ones = (1, 1)
  covered = (
      _is_nhwc(lhs, rhs, dimension_numbers)
      and tuple(window_strides) == ones
      and tuple(lhs_dilation or ones) == ones
      and tuple(rhs_dilation or ones) == ones
      and feature_group_count == 1 and batch_group_count == 1
      and kwargs.get("out_sharding") is None)
  if not covered:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type,
        **kwargs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], ones,
                                      padding)
  return im2col_conv(lhs, rhs, tuple(tuple(p) for p in padding),
                     precision=precision,
                     preferred_element_type=preferred_element_type)
