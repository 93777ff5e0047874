"""A servable version: one model's head, its table and its vocabularies.

The server (csctr/serving/server.py) swaps whole Versions; a merged batch is
scored by one. This is where a request's raw ids become table rows: every
feature's ids of a batch go through one vocabulary lookup (csctr/data/vocab.py
rules, the same as training), item ids through the table's raw-id map.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np

from csctr.data import vocab as vocab_lib
from csctr.serving import schema
from csctr.serving import scorer as scorer_lib
from csctr.serving import table as table_lib


def version_key(step: int, table: Any) -> tuple[Any, ...]:
  """What identifies a version: checkpoint step, table path and its time.

  The server compares it before building a new Version, so a reload that
  finds nothing new builds nothing.
  """
  return (step, table.path if table else None,
          table_lib.created_time(table.path) if table else None)


class Version:
  """One servable model: head + table + vocabularies, immutable."""

  def __init__(self, scorer: scorer_lib.Scorer,
               vocabs: dict[str, vocab_lib.Vocabulary], item_feature: str,
               key: tuple[Any, ...]):
    self.scorer, self.vocabs, self.item_feature = scorer, vocabs, item_feature
    self.model_version = str(scorer.step)
    self.table_version = (os.path.basename(os.path.normpath(scorer.table.path))
                          if scorer.table is not None else "none")
    self.key = key  # version_key(), which the server computed to compare

  def _rows(self, name: str, values: list[str], field: str) -> np.ndarray:
    vocab = self.vocabs.get(name)
    if vocab is not None:
      return np.asarray(vocab.lookup(values), np.int64)
    rows = vocab_lib.decimal_ids(values)  # no vocabulary: ids are rows
    if rows is not None:
      return rows
    try:  # not canonical ("007", "+7"): int() decides, as before
      return np.fromiter(map(int, values), np.int64, len(values))
    except ValueError as e:
      raise schema.BadRequest(400, f"{field}: this model has no vocabulary "
                              f"for {name!r}, so its ids must be integer "
                              "rows") from e

  def _map_ids(self, requests: list[schema.ParsedRequest]
               ) -> list[dict[str, Any]]:
    """Every request's ids as rows: one lookup per feature for the batch.

    The ids of all requests are concatenated per feature and mapped in one
    call, then split back: per-call overhead, paid once per request and
    feature before, was a large part of a request's CPU. Raises the first
    BadRequest (score_batch then redoes the batch request by request).
    """
    out = [{"candidates": {}, "user": {}} for _ in requests]
    fields = {(where, name) for r in requests
              for where, group in (("candidates", r.columns),
                                   ("user", r.user)) for name in group}
    for where, name in sorted(fields):
      owners, parts = [], []
      for i, r in enumerate(requests):
        group = r.columns if where == "candidates" else r.user
        if name in group:
          owners.append(i)
          parts.append(group[name] if where == "candidates"
                       else [group[name]])
      rows = self._rows(name, list(itertools.chain.from_iterable(parts)),
                        f"{where}.{name}")
      for i, part in zip(owners, _split(rows, parts)):
        out[i][where][name] = part if where == "candidates" else int(part[0])
    if self.scorer.table is not None:
      for key, attr in (("image_id", "items"), ("behavior_ids", "behaviors")):
        parts = [getattr(r, attr) for r in requests]
        keys = self.scorer.table.raw_keys(
            list(itertools.chain.from_iterable(parts)))
        for mapped, part in zip(out, _split(keys, parts)):
          mapped[key] = part
    return out

  def _scorer_request(self, r: schema.ParsedRequest,
                      mapped: dict[str, Any]) -> dict[str, Any]:
    cands = mapped["candidates"]
    request = {"user": mapped["user"], "candidates": cands}
    if self.scorer.table is not None:
      cands["image_id"] = mapped["image_id"]
      request["behavior_ids"] = mapped["behavior_ids"]
    if r.dense is not None:
      cands["dense"] = r.dense
    if r.images:
      size = self.scorer.info.image_size
      images = np.zeros((r.n, size, size, 3), np.uint8)
      mask = np.zeros(r.n, bool)
      for i, pixels in r.images.items():
        images[i], mask[i] = pixels, True
      cands["images"], cands["image_mask"] = images, mask
    return request

  def score_batch(self, requests: list[schema.ParsedRequest]) -> list[Any]:
    """Per request a response dict or the BadRequest it raised."""
    try:
      mapped = self._map_ids(requests)
    except schema.BadRequest:  # find whose ids: that request alone gets 400
      mapped = []
      for r in requests:
        try:
          mapped.append(self._map_ids([r])[0])
        except schema.BadRequest as e:
          mapped.append(e)
    out: list[Any] = [None] * len(requests)
    valid, prepared = [], []
    for i, (r, m) in enumerate(zip(requests, mapped)):
      if isinstance(m, schema.BadRequest):
        out[i] = m
      else:
        prepared.append(self._scorer_request(r, m))
        valid.append(i)
    for i, result in zip(valid, self.scorer.score_many(prepared)):
      out[i] = (result, self)
    return out


def _split(values: np.ndarray, parts: list[list[Any]]) -> list[np.ndarray]:
  """values cut into pieces as long as the lists of `parts` (views)."""
  ends = list(itertools.accumulate(map(len, parts)))
  return [values[a:b] for a, b in zip([0, *ends[:-1]], ends)]
