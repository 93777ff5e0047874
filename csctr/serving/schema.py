"""The scoring request on the wire: JSON in, checked, raw ids out.

    POST /v1/score
    {
      "user": {"user_id": "u17", ...},          # request-level features
      "behavior_ids": ["i3", "i99"],            # raw item ids (DICM models)
      "candidates": {
        "item_id": ["i5", "i8", ...],           # raw item ids, N of them
        "category_id": ["shoes", ...],          # per-candidate features, N each
        "dense": [[0.1, 2.0], ...],             # N x D, models with dense inputs
        "images": {"i8": "<base64 JPEG/PNG>"}   # items missing from the table
      }
    }

Ids are strings (integers are accepted and read as their decimal string).
Every sparse feature of the model comes once, either in "user" (then
broadcast to all candidates) or per candidate. Anything else is a
BadRequest whose message names the field (`candidates.category_id[3]`),
answered with a 4xx: the server never scores a request it had to guess
about. This module checks the shape and types only; mapping ids to rows
depends on the vocabularies of the version that scores the request and
happens in the batching thread (csctr/serving/server.py).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from typing import Any

import numpy as np
import orjson

from csctr.data import image_io

TOP_FIELDS = ("user", "behavior_ids", "candidates")
CANDIDATE_EXTRA = ("dense", "images")


class BadRequest(Exception):
  """A request the server refuses; `status` is the HTTP code to answer."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class RequestSpec:
  """What a request must look like for one model (fixed across hot swaps)."""

  sparse_features: tuple[str, ...]
  num_dense: int
  num_behaviors: int
  image_size: int
  max_candidates: int = 1024
  max_images: int = 64
  item_feature: str = "item_id"


@dataclasses.dataclass
class ParsedRequest:
  """A checked request: raw ids as strings, features in model order."""

  user: dict[str, str]
  columns: dict[str, list[str]]  # per-candidate features, N each
  items: list[str]  # raw item ids of the candidates
  behaviors: list[str]
  dense: np.ndarray | None  # float32 [N, D]
  images: dict[int, np.ndarray]  # candidate index -> uint8 [S, S, 3]

  @property
  def n(self) -> int:
    return len(self.items)


def _fail(field: str, message: str, status: int = 400) -> BadRequest:
  return BadRequest(status, f"{field}: {message}")


def _id(value: Any, field: str) -> str:
  if type(value) is str:  # pylint: disable=unidiomatic-typecheck
    return value
  if type(value) is int:  # pylint: disable=unidiomatic-typecheck
    return str(value)  # bool is not an id: type(True) is bool
  raise _fail(field, f"expected a string or integer id, got "
              f"{type(value).__name__}")


def _ids(values: Any, field: str, n: int | None = None) -> list[str]:
  if not isinstance(values, list):
    raise _fail(field, f"expected a list of ids, got {type(values).__name__}")
  if n is not None and len(values) != n:
    raise _fail(field, f"has {len(values)} values, expected one per "
                f"candidate ({n})")
  if set(map(type, values)) <= {str}:  # the common case, checked in C
    return values
  return [_id(v, f"{field}[{i}]") for i, v in enumerate(values)]


def _object(value: Any, field: str) -> dict[str, Any]:
  if not isinstance(value, dict):
    raise _fail(field, f"expected an object, got {type(value).__name__}")
  return value


def _dense(value: Any, n: int, d: int) -> np.ndarray:
  field = "candidates.dense"
  if not isinstance(value, list) or len(value) != n:
    raise _fail(field, f"expected {n} rows of {d} numbers")
  for i, row in enumerate(value):
    if not isinstance(row, list) or len(row) != d:
      raise _fail(f"{field}[{i}]", f"expected a list of {d} numbers")
    for j, x in enumerate(row):
      if type(x) not in (int, float) or not math.isfinite(x):  # pylint: disable=unidiomatic-typecheck
        raise _fail(f"{field}[{i}][{j}]", f"expected a finite number, got "
                    f"{x!r}"[:80])
  return np.asarray(value, np.float32).reshape(n, d)


def _images(value: Any, items: list[str], spec: RequestSpec
            ) -> dict[int, np.ndarray]:
  field = "candidates.images"
  value = _object(value, field)
  if len(value) > spec.max_images:
    raise _fail(field, f"{len(value)} images > the limit of "
                f"{spec.max_images} per request", 413)
  index = {item: i for i, item in enumerate(items)}
  out = {}
  for item, data in value.items():
    where = f"{field}[{item!r}]"
    if item not in index:
      raise _fail(where, "not one of candidates.item_id")
    if not isinstance(data, str):
      raise _fail(where, "expected base64 image bytes (a string)")
    try:
      raw = base64.b64decode(data, validate=True)
      pixels = image_io.decode_image_bytes(raw, spec.image_size)
    except (binascii.Error, ValueError) as e:
      raise _fail(where, f"not base64: {e}") from e
    except image_io.BadImageError as e:
      raise _fail(where, f"not a decodable image: {e.reason}") from e
    for i, other in enumerate(items):  # an item may be a candidate twice
      if other == item:
        out[i] = pixels
  return out


def parse(body: bytes, spec: RequestSpec) -> ParsedRequest:
  """Checks a /v1/score body against the model's features."""
  try:
    request = orjson.loads(body)
  except orjson.JSONDecodeError as e:
    raise BadRequest(400, f"body: not valid JSON: {e}") from e
  request = _object(request, "body")
  unknown = sorted(set(request) - set(TOP_FIELDS))
  if unknown:
    raise _fail(unknown[0], f"unknown field (expected some of {TOP_FIELDS})")
  user = _object(request.get("user", {}), "user")
  cands = _object(request.get("candidates", {}), "candidates")
  allowed = set(spec.sparse_features) | set(CANDIDATE_EXTRA)
  for name in sorted(set(user) | set(cands)):
    where = "user" if name in user else "candidates"
    if name not in (spec.sparse_features if where == "user" else allowed):
      raise _fail(f"{where}.{name}", "unknown field (features of this "
                  f"model: {list(spec.sparse_features)})")
  items = _ids(cands.get(spec.item_feature, []),
               f"candidates.{spec.item_feature}")
  n = len(items)
  if n > spec.max_candidates:
    raise _fail(f"candidates.{spec.item_feature}", f"{n} candidates > the "
                f"limit of {spec.max_candidates} per request", 413)
  columns, user_ids = {}, {}
  for name in spec.sparse_features:
    if name in cands:
      columns[name] = (items if name == spec.item_feature
                       else _ids(cands[name], f"candidates.{name}", n))
      if name in user:
        raise _fail(f"user.{name}", "also given per candidate: give it once")
    elif name in user:
      user_ids[name] = _id(user[name], f"user.{name}")
    elif n:
      raise _fail(f"candidates.{name}", "missing: give it per candidate "
                  f"or once in user.{name}")
  behaviors = _ids(request.get("behavior_ids", []), "behavior_ids")
  dense = None
  if spec.num_dense and n:
    if "dense" not in cands:
      raise _fail("candidates.dense", f"missing: this model takes "
                  f"{spec.num_dense} dense features per candidate")
    dense = _dense(cands["dense"], n, spec.num_dense)
  elif "dense" in cands:
    raise _fail("candidates.dense", "this model has no dense features")
  images = _images(cands["images"], items, spec) if "images" in cands else {}
  return ParsedRequest(user_ids, columns, items, behaviors, dense, images)
