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
import os
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
  """

  buckets: tuple[int, ...] = (16, 64, 256, 1024)
  fallback: str = "cnn"
  allow_other_checkpoint: bool = False
  warmup_calls: int = 3


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


# One request at a time: Eigen's thread pool only adds handoffs (and, on a
# busy machine, waits for a second core) to kernels this small.
SINGLE_THREAD_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false",)


def configure_cpu_serving(single_thread: bool = True) -> bool:
  """Sets up JAX's CPU client for latency; call before any JAX computation.

  By default JAX hands each CPU computation to a worker thread (async
  dispatch), and Eigen kernels use a thread pool: both serve throughput (a
  training loop runs ahead), but a scorer waits for every result at once,
  so each handoff is latency. Inline dispatch cut p50 by ~45% at N=1 and
  by ~25% at N=200 in benchmarks/serving.py. (XLA's CPU runtime still
  spreads the largest buckets' kernels over its own pool; no flag turns that
  off in jax 0.10.) Scale out with a process per core. Both options are read
  when JAX creates its CPU client: hence "before any JAX computation".

  Returns:
    False when a backend already existed (nothing then changes).
  """
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    logging.warning("configure_cpu_serving(): JAX's backends already exist;"
                    " CPU dispatch and threads stay as they were")
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  if single_thread:
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(
        flags + [f for f in SINGLE_THREAD_XLA_FLAGS if f not in flags])
  return True


def _head_only(model: ctr.CTRModel) -> ctr.CTRModel:
  """The model minus its encoder, sharing the arrays.

  The scoring jit then takes only the head's parameters as arguments, so a
  call passes tens of arrays instead of the whole CNN's.
  """
  graphdef, state = nnx.split(model)
  head = nnx.merge(graphdef, state)  # new Variables, the same jax arrays
  head.encoder = nnx.data(None)
  return head


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
    self._score_jit = jax.jit(self._make_score_fn(graphdef, treedef))
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

  def _make_score_fn(self, graphdef: nnx.GraphDef, treedef: Any):
    num_behaviors = self._num_behaviors

    def score(leaves, sparse, dense, ad_emb, beh_emb, beh_mask):
      model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
      n = sparse.shape[0]
      batch = {"sparse": sparse, "dense": dense,
               "ad_image": jnp.arange(n, dtype=jnp.int32)}
      emb = ad_emb
      if num_behaviors:
        emb = jnp.concatenate([ad_emb, beh_emb])
        rows = n + jnp.arange(num_behaviors, dtype=jnp.int32)
        batch["behavior_images"] = jnp.broadcast_to(rows, (n, num_behaviors))
        batch["behavior_mask"] = jnp.broadcast_to(beh_mask, (n, num_behaviors))
      return model.score(batch, emb if self.use_image else None)

    return score

  def _inputs(self, n: int) -> list[np.ndarray]:
    """Zero inputs of the score function for a bucket of n candidates."""
    d = self._dim if self.use_image else 0
    l = self._num_behaviors
    return [np.zeros((n, len(self._vocab)), np.int32),
            np.zeros((n, self.info.num_dense), np.float32),
            np.zeros((n, d), np.float32), np.zeros((l, d), np.float32),
            np.zeros((l,), np.bool_)]

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
    if not self.info.num_dense:
      return np.zeros((n, 0), np.float32)
    dense = np.asarray(request["candidates"].get("dense"), np.float32)
    if dense.shape != (n, self.info.num_dense):
      raise ValueError(f"candidates['dense'] must be float [{n}, "
                       f"{self.info.num_dense}], got {dense.shape}")
    return dense

  def _behaviors(self, request: Mapping[str, Any],
                 result: ScoreResult) -> tuple[np.ndarray, np.ndarray]:
    l, d = self._num_behaviors, self._dim
    emb, mask = np.zeros((l, d), np.float32), np.zeros((l,), np.bool_)
    ids = np.asarray(request.get("behavior_ids", ()), np.int64)[:l]
    if ids.size:
      rows, found = self.table.lookup(ids)
      valid = ids >= 0  # -1 = no behaviour, as in the data
      result.behavior_misses = int((valid & ~found).sum())
      mask[:len(ids)] = valid & found
      np.take(self._emb, rows, axis=0, out=emb[:len(ids)])
    return emb, mask

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
      use_cnn[:] = True
      out[miss] = self._embed(np.asarray(cands["images"])[miss], category)
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
    cands = request.get("candidates") or {}
    n = len(cands.get("image_id", ())) if self.use_image else (
        len(next(iter(cands.values()))) if cands else 0)
    result = ScoreResult(logits=np.zeros((0,), np.float32))
    if n == 0:
      self.stats["requests"] += 1
      return result
    sparse = self._sparse(request, n)
    dense = self._dense(request, n)
    d = self._dim if self.use_image else 0
    ad = np.zeros((n, d), np.float32)
    l = self._num_behaviors
    beh_emb, beh_mask = np.zeros((l, d), np.float32), np.zeros((l,), np.bool_)
    if self.use_image:
      self._ad_embeddings(cands, sparse, ad, result)
      if l:
        beh_emb, beh_mask = self._behaviors(request, result)
    logits = []
    step = self.config.buckets[-1]
    for lo in range(0, n, step):  # chunks beyond the largest bucket
      m = min(step, n - lo)
      b = result.bucket = self.bucket(m)
      args = self._inputs(b)[:3]
      args[0][:m], args[1][:m], args[2][:m] = (
          sparse[lo:lo + m], dense[lo:lo + m], ad[lo:lo + m])
      logits.append(np.asarray(self._score_jit(
          self._state, *args, beh_emb, beh_mask))[:m])
    result.logits = np.concatenate(logits)
    self.stats["requests"] += 1
    for k in ("misses", "cnn_fallbacks", "mean_fallbacks", "behavior_misses"):
      self.stats[k] += getattr(result, k)
    self.stats["candidates"] += n
    return result

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
    fn = jax.jit(lambda *args: self._score_jit(state, *args))
    paths = []
    for b in buckets or self.config.buckets:
      exported = jax.export.export(fn)(*[
          jax.ShapeDtypeStruct(x.shape, x.dtype) for x in self._inputs(b)])
      base = os.path.join(directory, f"score_n{b}")
      with open(base + ".jax_exported", "wb") as f:
        f.write(exported.serialize())
      with open(base + ".mlirbc", "wb") as f:
        f.write(exported.mlir_module_serialized)
      paths.append(base + ".jax_exported")
    return paths
