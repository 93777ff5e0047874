"""Decoding user-supplied product images into fixed-size RGB uint8 arrays.

User images come in every size, mode and state of repair, so decoding is one
place with one policy: a full decode (so a truncated file fails here, not as
grey pixels in training), EXIF orientation applied (phone photos), alpha
composited onto white (product shots on transparent backgrounds would
otherwise turn black), then a resize to the square the models expect.

Errors are classified rather than swallowed: `decode_image` raises
`MissingImageError` or `CorruptImageError`, and the caller decides between
skipping (counted) and failing (see `csctr.data.byod`).
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from PIL import ImageOps

# pad: keep the aspect ratio, letterbox onto white (product photos are on
#   white backgrounds, so the border is nearly invisible to the CNN).
# stretch: resize to the square, distorting the aspect ratio (DVBPR).
# crop: keep the aspect ratio, centre-crop the long side.
RESIZE_MODES = ("pad", "stretch", "crop")
_WHITE = (255, 255, 255)
_BLOCK = 256  # images decoded per thread-pool round (bounds memory)


class BadImageError(Exception):
  """An image that cannot be used; `reason` is a short human-readable cause."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = path
    self.reason = reason


class MissingImageError(BadImageError):
  """The file does not exist (or is not a regular file)."""


class CorruptImageError(BadImageError):
  """The file exists but does not decode: corrupt, truncated, unsupported."""


def _to_rgb(im: Image.Image) -> Image.Image:
  if im.mode in ("RGBA", "LA", "PA") or (
      im.mode == "P" and "transparency" in im.info):
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    background.alpha_composite(rgba)
    return background.convert("RGB")
  return im.convert("RGB")


def _resize(im: Image.Image, size: int, mode: str) -> Image.Image:
  if mode == "stretch":
    return im.resize((size, size), Image.Resampling.BICUBIC)
  if mode == "crop":
    return ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)
  if mode == "pad":
    return ImageOps.pad(im, (size, size), Image.Resampling.BICUBIC,
                        color=_WHITE)
  raise ValueError(f"resize mode {mode!r} not in {RESIZE_MODES}")


def decode_image(path: str, size: int, resize: str = "pad") -> np.ndarray:
  """Decodes one image file into uint8 [size, size, 3].

  Args:
    path: image file (any format Pillow reads: JPEG, PNG, WebP, GIF...).
    size: output height = width.
    resize: one of RESIZE_MODES.

  Returns:
    The RGB image, uint8 [size, size, 3].

  Raises:
    MissingImageError: no regular file at `path`.
    CorruptImageError: anything else that stops a full decode.
  """
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize mode {resize!r} not in {RESIZE_MODES}")
  if not os.path.isfile(path):
    raise MissingImageError(path, "file not found")
  return _decode(path, path, size, resize)


def decode_image_bytes(data: bytes, size: int, resize: str = "pad",
                       name: str = "<bytes>") -> np.ndarray:
  """decode_image for encoded bytes in memory (e.g. from a request).

  Raises:
    CorruptImageError: the bytes are not a decodable image.
  """
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize mode {resize!r} not in {RESIZE_MODES}")
  return _decode(io.BytesIO(data), name, size, resize)


def _decode(source: str | io.BytesIO, path: str, size: int,
            resize: str) -> np.ndarray:
  try:
    with Image.open(source) as im:
      # JPEG only: DCT-domain downscaling while decoding, >= size on both
      # sides; several times faster for large photos, same result quality.
      im.draft("RGB", (size, size))
      im.load()  # Full decode: a truncated file raises here.
      im = ImageOps.exif_transpose(im)
      im = _resize(_to_rgb(im), size, resize)
      return np.array(im, dtype=np.uint8).reshape(size, size, 3)
  except FileNotFoundError as e:  # Removed between the check and the open.
    raise MissingImageError(path, "file not found") from e
  except Exception as e:  # pylint: disable=broad-except
    # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError,
    # struct.error, DecompressionBombError...: all mean "unusable file".
    raise CorruptImageError(path, f"{type(e).__name__}: {e}") from e


def decode_images(
    paths: Sequence[str], size: int, resize: str = "pad",
    num_threads: int = 0) -> Iterator[np.ndarray | BadImageError]:
  """Decodes many images in order, in threads (Pillow releases the GIL).

  Yields, for each path in order, the image or the `BadImageError` that
  decoding raised, so that the caller can count, log or re-raise.
  """
  threads = num_threads or min(8, os.cpu_count() or 1)

  def one(path: str) -> np.ndarray | BadImageError:
    try:
      return decode_image(path, size, resize)
    except BadImageError as e:
      return e

  if threads <= 1:
    for path in paths:
      yield one(path)
    return
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for start in range(0, len(paths), _BLOCK):
      yield from pool.map(one, paths[start:start + _BLOCK])
