"""Online scoring from an offline embedding table: the CTR head only.

    scorer = serving.Scorer.from_workdir(WORKDIR)    # + its exported table
    result = scorer.score({
        "user": {"user_id": 17},                      # request-level features
        "behavior_ids": [3, 99],                      # image ids (DICM, L > 0)
        "candidates": {"image_id": [...], "item_id": [...],
                       "category_id": [...], "position": [...]},
    })
    result.logits, result.ctr, result.misses

A request is one user and N candidate ads. Every sparse feature the model
was trained on (DataInfo.sparse_features) comes either per candidate
(request['candidates'][name], length N) or once per request
(request['user'][name], broadcast to all N); features are vocabulary rows as
in the prepared dataset, and a row outside [0, vocab) is the OOV row 0.
`image_id` keys the embedding table (csctr.export); `dense` [N, D] is
required when the model has dense features.

The batch handed to the model follows the batch contract with the unique-
image table replaced by embeddings gathered from the offline table: rows
0..N'-1 are the candidates (ad_image = arange), rows N'..N'+L-1 the user's
behaviour images (the same L rows for every candidate). It is scored by
CTRModel.score, the very code the trainer's forward pass runs after the CNN,
so the scorer's logits equal the training model's (tests/test_serving.py).

Fixed shapes: N is padded to the smallest bucket >= N (default 16, 64, 256,
1024; larger requests are scored in chunks of the largest), each bucket is
compiled and warmed up when the Scorer is built, and the table gather runs
on the host (numpy, from the memory-mapped table) into the padded buffer.

Misses (an image id not in the table) use ServingConfig.fallback:
  'cnn'            the CNN embeds the candidate's image on the fly; the
                   request must carry candidates['images'] uint8 [N, H, W, 3]
                   (rows of hits are ignored) and, optionally,
                   candidates['image_category'] (default: the category_id
                   feature, else the OOV category). A miss without pixels
                   falls through to 'category_mean'.
  'category_mean'  the table's mean embedding of the candidate's category
                   (a default estimated at export, not a trained parameter).
Behaviour ids missing from the table are masked out (as the data pipeline
masks behaviour images it cannot fit). Every result reports its counts, and
Scorer.stats accumulates them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Any, Mapping

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from csctr.data import batch as batch_lib
from csctr.serving import export as export_lib
from csctr.model import ctr
from csctr import rundir
from csctr import storage

FALLBACKS = ("cnn", "category_mean")


@dataclasses.dataclass(frozen=True)
class ServingConfig:
  """How a Scorer pads, falls back and checks its table.

  Attributes:
    buckets: candidate counts compiled for; N is padded up to one of them.
    fallback: 'cnn' | 'category_mean', for candidates whose image id is not
      in the table (see the module docstring).
    allow_other_checkpoint: accept a table exported from another checkpoint
      of the same model (stale embeddings unless the encoder was frozen).
    warmup_calls: calls per bucket at construction, after compiling.
    max_requests: requests one score_many call may merge (behaviour
      embeddings are passed per request, padded to this many).
  """

  buckets: tuple[int, ...] = (16, 64, 256, 1024)
  fallback: str = "cnn"
  allow_other_checkpoint: bool = False
  warmup_calls: int = 3
  max_requests: int = 64


@dataclasses.dataclass
class ScoreResult:
  """Scores of one request; `logits` float32 [N] in candidate order."""

  logits: np.ndarray
  misses: int = 0  # candidates whose image id is not in the table
  cnn_fallbacks: int = 0  # misses embedded by the CNN on the fly
  mean_fallbacks: int = 0  # misses given their category's mean embedding
  behavior_misses: int = 0  # behaviour ids not in the table (masked)
  bucket: int = 0  # padded size of the (last) compiled call

  @property
  def ctr(self) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-self.logits))


def _head_only(model: ctr.CTRModel) -> ctr.CTRModel:
  """The model minus its encoder, sharing the arrays.

  The scoring jit then takes only the head's parameters as arguments, so a
  call passes tens of arrays instead of the whole CNN's.
  """
  graphdef, state = nnx.split(model)
  head = nnx.merge(graphdef, state)  # new Variables, the same jax arrays
  head.encoder = nnx.data(None)
  return head


@functools.lru_cache(maxsize=16)
def _score_jit(graphdef: nnx.GraphDef, treedef: Any, num_behaviors: int,
               use_image: bool):
  """The jitted head for one model structure (cached: compiled once).

  score(leaves, sparse [B, F], dense [B, D], ad_emb [B, d],
        beh_emb [R, L, d], beh_mask [R, L], owner int32 [B]) -> logits [B]
  Rows of several requests share one call: `owner` names each row's request,
  whose L behaviour embeddings sit in beh_emb[owner].
  """

  def score(leaves, sparse, dense, ad_emb, beh_emb, beh_mask, owner):
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    n = sparse.shape[0]
    batch = {"sparse": sparse, "dense": dense,
             "ad_image": jnp.arange(n, dtype=jnp.int32)}
    emb = ad_emb
    if num_behaviors:
      r = beh_emb.shape[0]
      emb = jnp.concatenate([ad_emb, beh_emb.reshape(r * num_behaviors, -1)])
      batch["behavior_images"] = (n + owner[:, None] * num_behaviors
                                  + jnp.arange(num_behaviors, dtype=jnp.int32))
      batch["behavior_mask"] = beh_mask[owner]
    return model.score(batch, emb if use_image else None)

  return jax.jit(score)


class Scorer:
  """Scores requests with a trained model's head and an embedding table."""

  def __init__(self, model: ctr.CTRModel,
               model_config: ml_collections.ConfigDict,
               info: batch_lib.DataInfo,
               table: export_lib.EmbeddingTable | None,
               config: ServingConfig = ServingConfig(), step: int | None = None):
    if config.fallback not in FALLBACKS:
      raise ValueError(f"fallback={config.fallback!r} not in {FALLBACKS}")
    if not config.buckets or sorted(set(config.buckets)) != list(
        config.buckets) or config.buckets[0] < 1:
      raise ValueError(f"buckets={config.buckets} must be increasing, >= 1")
    self.config, self.info, self.step = config, info, step
    self.use_image = model.use_image
    if self.use_image:
      if table is None:
        raise ValueError("the model uses images: a Scorer needs its "
                         "embedding table (python -m csctr.export)")
      table.check(export_lib.config_hash(model_config, info),
                  export_lib.encoder_hash(model), step,
                  config.allow_other_checkpoint)
      self._emb = table.embeddings
      self._dim = table.embeddings.shape[1]
      self._encode = export_lib.make_encode_fn(model)
    self.table = table
    self._vocab = np.asarray(info.vocab_sizes, np.int64)
    self._num_behaviors = info.num_behaviors if model.pooling is not None else 0
    self._category_col = (info.sparse_features.index("category_id")
                          if "category_id" in info.sparse_features else None)
    graphdef, state = nnx.split(_head_only(model))
    # A flat list of arrays: flattening nnx Variables on every call costs
    # ~10 us, a fifth of a small request.
    self._state, treedef = jax.tree.flatten(state)
    # Shared by Scorers of the same model structure: a hot-swapped
    # checkpoint (csctr/serving/server.py) compiles nothing.
    self._score_jit = _score_jit(graphdef, treedef, self._num_behaviors,
                                 self.use_image)
    self._stats_lock = threading.Lock()
    self.stats = {"requests": 0, "candidates": 0, "misses": 0,
                  "cnn_fallbacks": 0, "mean_fallbacks": 0,
                  "behavior_misses": 0}
    self._warmup()
    if (jax.default_backend() == "cpu"
        and jax.config.read("jax_cpu_enable_async_dispatch")):
      logging.info("Scorer on CPU with async dispatch: call "
                   "serving.configure_cpu_serving() before JAX starts for "
                   "lower latency (docs/serving.md)")

  @classmethod
  def from_workdir(cls, workdir: str, table_path: str | None = None,
                   step: int | None = None,
                   config: ServingConfig = ServingConfig()) -> "Scorer":
    """The run's checkpoint (default latest) + its table (default the one
    exported for that step, WORKDIR/embedding_tables/<step>)."""
    model, run_config, info, step = rundir.restore_model(workdir, step)
    table = None
    if model.use_image:
      table_path = table_path or storage.join(
          workdir, export_lib.TABLES_DIR, str(step))
      table = export_lib.EmbeddingTable(table_path)
    return cls(model, run_config.model, info, table, config, step)

  # ---------------------------------------------------------------- jit

  def _inputs(self, n: int) -> list[np.ndarray]:
    """Zero inputs of the score function for a bucket of n candidates."""
    d = self._dim if self.use_image else 0
    l, r = self._num_behaviors, self.config.max_requests
    return [np.zeros((n, len(self._vocab)), np.int32),
            np.zeros((n, self.info.num_dense), np.float32),
            np.zeros((n, d), np.float32), np.zeros((r, l, d), np.float32),
            np.zeros((r, l), np.bool_), np.zeros((n,), np.int32)]

  def _warmup(self) -> None:
    for b in self.config.buckets:
      for _ in range(1 + self.config.warmup_calls):
        jax.block_until_ready(self._score_jit(self._state, *self._inputs(b)))
    if self.use_image and self.config.fallback == "cnn":
      s = self.info.image_size
      b = self.config.buckets[0]
      jax.block_until_ready(self._encode(np.zeros((b, s, s, 3), np.uint8),
                                         np.zeros(b, np.int32)))

  def bucket(self, n: int) -> int:
    """The compiled size a request of n (<= the largest bucket) pads to."""
    for b in self.config.buckets:
      if n <= b:
        return b
    raise ValueError(f"{n} candidates > the largest bucket "
                     f"{self.config.buckets[-1]}")

  # ---------------------------------------------------------------- request

  def _sparse(self, request: Mapping[str, Any], n: int) -> np.ndarray:
    user = request.get("user", {})
    cands = request["candidates"]
    cols = []
    for name in self.info.sparse_features:
      if name in cands:
        col = np.asarray(cands[name], np.int64)
        if col.shape != (n,):
          raise ValueError(f"candidates[{name!r}] has shape {col.shape}, "
                           f"expected ({n},)")
      elif name in user:
        col = np.full(n, int(user[name]), np.int64)
      else:
        raise KeyError(f"request lacks feature {name!r}: give it in "
                       "request['user'] (one value) or request['candidates']"
                       f" (one per candidate); features: "
                       f"{self.info.sparse_features}")
      cols.append(col)
    sparse = np.stack(cols, axis=1)
    # Unknown ids (outside the vocabulary) go to the OOV row 0.
    return np.where((sparse >= 0) & (sparse < self._vocab), sparse,
                    0).astype(np.int32)

  def _dense(self, request: Mapping[str, Any], n: int) -> np.ndarray:
    if not self.info.num_dense or not n:
      return np.zeros((n, self.info.num_dense), np.float32)
    dense = np.asarray(request["candidates"].get("dense"), np.float32)
    if dense.shape != (n, self.info.num_dense):
      raise ValueError(f"candidates['dense'] must be float [{n}, "
                       f"{self.info.num_dense}], got {dense.shape}")
    return dense

  def _behaviors(self, request: Mapping[str, Any], emb: np.ndarray,
                 mask: np.ndarray, result: ScoreResult) -> None:
    """Gathers the last L usable behaviour embeddings into emb [L], mask [L].

    The data's truncation policy (batch.last_valid): ids missing from the
    table or -1 are skipped, then the most recent L kept, oldest first.
    """
    ids = np.asarray(request.get("behavior_ids", ()), np.int64).reshape(-1)
    if ids.size:
      rows, found = self.table.lookup(ids)
      valid = ids >= 0  # -1 = no behaviour, as in the data
      result.behavior_misses = int((valid & ~found).sum())
      rows = batch_lib.last_valid(rows, valid & found, self._num_behaviors)
      mask[:len(rows)] = True
      np.take(self._emb, rows, axis=0, out=emb[:len(rows)])

  def _ad_embeddings(self, cands: Mapping[str, Any], sparse: np.ndarray,
                     out: np.ndarray, result: ScoreResult) -> None:
    """Gathers the candidates' embeddings into out[:n]; fills misses."""
    n = len(sparse)
    image_ids = np.asarray(cands["image_id"], np.int64)
    if image_ids.shape != (n,):
      raise ValueError(f"candidates['image_id'] has shape {image_ids.shape},"
                       f" expected ({n},)")
    rows, found = self.table.lookup(image_ids)
    np.take(self._emb, rows, axis=0, out=out[:n])
    if found.all():
      return
    miss = np.flatnonzero(~found)
    result.misses += len(miss)
    if "image_category" in cands:
      category = np.asarray(cands["image_category"], np.int64)[miss]
    elif self._category_col is not None:
      category = sparse[miss, self._category_col].astype(np.int64)
    else:
      category = np.zeros(len(miss), np.int64)
    category = np.where((category >= 0)
                        & (category < self.info.num_categories), category, 0)
    use_cnn = np.zeros(len(miss), bool)
    if self.config.fallback == "cnn" and cands.get("images") is not None:
      # image_mask: which rows carry pixels (default: all of them)
      use_cnn[:] = np.asarray(cands.get("image_mask", np.ones(n, bool)),
                              bool)[miss]
      if use_cnn.any():
        out[miss[use_cnn]] = self._embed(
            np.asarray(cands["images"])[miss[use_cnn]], category[use_cnn])
    mean = miss[~use_cnn]
    out[mean] = self.table.category_mean[category[~use_cnn]]
    result.cnn_fallbacks += int(use_cnn.sum())
    result.mean_fallbacks += len(mean)

  def _embed(self, images: np.ndarray, category: np.ndarray) -> np.ndarray:
    """The CNN on the fly, padded to a bucket (compiles once per size)."""
    s = self.info.image_size
    if images.dtype != np.uint8 or images.shape[1:] != (s, s, 3):
      raise ValueError(f"candidates['images'] must be uint8 [N, {s}, {s}, 3],"
                       f" got {images.dtype} {images.shape}")
    out = []
    step = self.config.buckets[-1]
    for lo in range(0, len(images), step):
      m = min(step, len(images) - lo)
      b = self.bucket(m)
      x = np.zeros((b, s, s, 3), np.uint8)
      c = np.zeros(b, np.int32)
      x[:m], c[:m] = images[lo:lo + m], category[lo:lo + m]
      out.append(np.asarray(self._encode(x, c))[:m])
    return np.concatenate(out)

  def score(self, request: Mapping[str, Any]) -> ScoreResult:
    """Logits of the request's candidates (empty in, empty out)."""
    return self.score_many([request])[0]

  def _prepare(self, request: Mapping[str, Any], beh_emb: np.ndarray,
               beh_mask: np.ndarray) -> tuple[ScoreResult, list[np.ndarray]]:
    """One request's rows: (result, [sparse, dense, ad embeddings])."""
    cands = request.get("candidates") or {}
    n = len(cands.get("image_id", ())) if self.use_image else (
        len(next(iter(cands.values()))) if cands else 0)
    result = ScoreResult(logits=np.zeros((0,), np.float32))
    sparse = self._sparse(request, n) if n else np.zeros(
        (0, len(self._vocab)), np.int32)
    dense = self._dense(request, n)
    ad = np.zeros((n, self._dim if self.use_image else 0), np.float32)
    if self.use_image and n:
      self._ad_embeddings(cands, sparse, ad, result)
      if self._num_behaviors:
        self._behaviors(request, beh_emb, beh_mask, result)
    return result, [sparse, dense, ad]

  def score_many(self, requests: list[Mapping[str, Any]]
                 ) -> list[ScoreResult]:
    """Scores several requests in one jitted call per largest bucket.

    The micro-batching server merges concurrent requests through this; the
    rows of all requests are concatenated, each with its request's index, so
    a request's logits do not depend on its batch-mates.
    """
    if len(requests) > self.config.max_requests:
      raise ValueError(f"{len(requests)} requests > ServingConfig."
                       f"max_requests={self.config.max_requests}")
    inputs = self._inputs(0)
    beh_emb, beh_mask = inputs[3], inputs[4]
    results, rows = [], []
    for i, request in enumerate(requests):
      result, arrays = self._prepare(request, beh_emb[i], beh_mask[i])
      results.append(result)
      rows.append(arrays)
    counts = [len(r[0]) for r in rows]
    n = sum(counts)
    if n:
      sparse, dense, ad = (np.concatenate(x) for x in zip(*rows))
      owner = np.repeat(np.arange(len(requests), dtype=np.int32), counts)
      logits, bucket = self._run([sparse, dense, ad], beh_emb, beh_mask,
                                 owner)
      for result, part in zip(results, np.split(logits, np.cumsum(counts))):
        result.logits, result.bucket = part, bucket
    with self._stats_lock:
      self.stats["requests"] += len(requests)
      self.stats["candidates"] += n
      for k in ("misses", "cnn_fallbacks", "mean_fallbacks",
                "behavior_misses"):
        self.stats[k] += sum(getattr(r, k) for r in results)
    return results

  def _run(self, rows: list[np.ndarray], beh_emb: np.ndarray,
           beh_mask: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, int]:
    """The jitted head over rows [n, ...], padded, in chunks of the largest
    bucket; returns (logits [n], the bucket of the last chunk)."""
    n, step, out = len(owner), self.config.buckets[-1], []
    for lo in range(0, n, step):
      m = min(step, n - lo)
      b = self.bucket(m)
      args = self._inputs(b)
      for arg, x in zip(args[:3], rows):
        arg[:m] = x[lo:lo + m]
      args[5][:m] = owner[lo:lo + m]
      out.append(np.asarray(self._score_jit(
          self._state, *args[:3], beh_emb, beh_mask, args[5]))[:m])
    return np.concatenate(out), b

  # ---------------------------------------------------------------- StableHLO

  def export_stablehlo(self, directory: str,
                       buckets: tuple[int, ...] | None = None) -> list[str]:
    """Writes the scoring function, parameters baked in, per bucket.

    For serving stacks outside Python: score_n<B>.mlirbc is the StableHLO
    module (portable bytecode), score_n<B>.jax_exported the jax.export
    serialization (jax.export.deserialize(...).call(...)). Inputs, in order:
    sparse int32 [B, F], dense float32 [B, D], ad embeddings float32 [B, d],
    behaviour embeddings float32 [L, d], behaviour mask bool [L]; output:
    logits float32 [B]. The table lookup stays the caller's.
    """
    os.makedirs(directory, exist_ok=True)
    state = self._state

    @jax.jit
    def fn(sparse, dense, ad, beh_emb, beh_mask):  # one request: R = 1
      owner = jnp.zeros(sparse.shape[:1], jnp.int32)
      return self._score_jit(state, sparse, dense, ad, beh_emb[None],
                             beh_mask[None], owner)

    paths = []
    for b in buckets or self.config.buckets:
      sparse, dense, ad, beh_emb, beh_mask, _ = self._inputs(b)
      exported = jax.export.export(fn)(*[
          jax.ShapeDtypeStruct(x.shape, x.dtype)
          for x in (sparse, dense, ad, beh_emb[0], beh_mask[0])])
      base = os.path.join(directory, f"score_n{b}")
      with open(base + ".jax_exported", "wb") as f:
        f.write(exported.serialize())
      with open(base + ".mlirbc", "wb") as f:
        f.write(exported.mlir_module_serialized)
      paths.append(base + ".jax_exported")
    return paths
