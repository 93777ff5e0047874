r"""Offline visual-embedding table: the CNN runs here, never in the scorer.

  python -m csctr.export --workdir=/tmp/csctr_default
  python -m csctr.export --workdir=DIR --images=/path/to/prepared_dataset
  python -m csctr.export --workdir=DIR --images=catalogue.npz   # images,
      # categories, optional ids (int64) arrays

JD serves CSCNN by looking visual embeddings up in a table computed offline
(90% of next-day traffic hits it); csctr.serving.Scorer runs only the CTR
head. This module computes that table from a run's checkpoint (default: the
latest) with `CTRModel.encode_images`, jitted, in fixed-size batches (the last
one padded, so XLA compiles once), deduplicated by image id.

Table format: a directory (default WORKDIR/embedding_tables/<step>)

    embeddings.npy     float32 [N, d], row i = image ids[i]; np.load(...,
                       mmap_mode='r') so a 20 GB table is paged, not loaded
    ids.npy            int64 [N], image ids, strictly increasing: the id ->
                       row index is np.searchsorted (no hash map to build)
    categories.npy     int32 [N], category each embedding was computed with
    category_mean.npy  float32 [C, d], mean embedding per category (global
                       mean where a category has no image): the serving
                       fallback 'category_mean'
    meta.json          format_version, step, config_hash, encoder_hash, d,
                       dtype, num_rows, source, timing

An image id is the item row of a prepared dataset (the index into its
images.npy, the `item` of its group records), or the `ids` array of an .npz.
config_hash is a sha256 of the model config and the DataInfo fields the
model's shapes depend on: a table from another model is refused by it.
encoder_hash is a sha256 of the encoder parameters: it tells a table of
another checkpoint of the same model (which, unless late_fusion froze the
encoder, holds other embeddings).

The table is written into a tmp sibling directory with the embeddings
memory-mapped (host memory stays one batch, whatever N), then renamed into
place, so a reader never sees a partial table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging as py_logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from csctr.data import batch as batch_lib
from csctr.model import ctr
from csctr.data import prepared
from csctr import rundir
from csctr import storage

FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.npy"
CATEGORIES_FILE = "categories.npy"
CATEGORY_MEAN_FILE = "category_mean.npy"
META_FILE = "meta.json"
TABLES_DIR = "embedding_tables"
# DataInfo fields that shape the model (extras such as timings do not).
_INFO_FIELDS = ("sparse_features", "vocab_sizes", "num_dense",
                "num_categories", "image_size", "num_behaviors")


# ---------------------------------------------------------------- identity


def config_hash(model_config: ml_collections.ConfigDict,
                info: batch_lib.DataInfo) -> str:
  """sha256 of the model config + the model-shaping DataInfo fields."""
  info_json = info.to_json()
  blob = json.dumps({"model": model_config.to_dict(),
                     "info": {k: info_json[k] for k in _INFO_FIELDS}},
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()


def encoder_hash(model: ctr.CTRModel) -> str:
  """sha256 of the encoder parameters (path, dtype, shape and bytes)."""
  digest = hashlib.sha256()
  if model.encoder is not None:
    flat = nnx.to_flat_state(nnx.state(model.encoder, nnx.Param))
    for path, var in sorted(flat, key=lambda kv: tuple(map(str, kv[0]))):
      x = np.asarray(jax.device_get(var[...]))
      digest.update(f"{path}:{x.dtype}:{x.shape}".encode())
      digest.update(np.ascontiguousarray(x).tobytes())
  return digest.hexdigest()


# ---------------------------------------------------------------- sources


@dataclasses.dataclass
class ImageSource:
  """Images to embed: ids int64 [M], images uint8 [M, H, W, 3] (may be a
  memmap), categories int32 [M]; `name` says where they came from."""

  ids: np.ndarray
  images: np.ndarray
  categories: np.ndarray
  name: str


def load_images(spec: str) -> ImageSource:
  """A prepared dataset directory, or an .npz with images/categories[/ids].

  Either may be a URL (a dataset is read from its local mirror).
  """
  if storage.is_remote(spec) and prepared.is_prepared(spec):
    spec = prepared.local_copy(spec)
  if os.path.isdir(spec):
    images = np.load(os.path.join(spec, prepared.IMAGES_FILE),
                     mmap_mode="r")
    categories = np.load(os.path.join(spec, prepared.CATEGORY_FILE))
    ids = np.arange(len(images), dtype=np.int64)
  elif spec.endswith(".npz"):
    with np.load(io.BytesIO(storage.read_bytes(spec))) as z:
      missing = {"images", "categories"} - set(z.files)
      if missing:
        raise ValueError(f"{spec} lacks arrays {sorted(missing)}")
      images, categories = z["images"], z["categories"]
      ids = z["ids"] if "ids" in z.files else np.arange(len(images))
  else:
    raise ValueError(f"--images={spec!r}: a prepared dataset directory or "
                     "an .npz with images, categories and optional ids")
  return ImageSource(np.asarray(ids, np.int64), images,
                     np.asarray(categories, np.int32), spec)


def _check_source(source: ImageSource, info: batch_lib.DataInfo) -> None:
  s = info.image_size
  if source.images.dtype != np.uint8 or source.images.shape[1:] != (s, s, 3):
    raise ValueError(f"{source.name}: images must be uint8 [M, {s}, {s}, 3] "
                     f"for this model, got {source.images.dtype} "
                     f"{source.images.shape}")
  m = len(source.images)
  if source.ids.shape != (m,) or source.categories.shape != (m,):
    raise ValueError(f"{source.name}: {m} images but ids {source.ids.shape} "
                     f"and categories {source.categories.shape}")


# ---------------------------------------------------------------- writing


class _Progress:
  """One self-overwriting stderr line: done/total, images/s, ETA."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.enabled = total, enabled
    self.start = self.last = time.perf_counter()

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if not self.enabled or (now - self.last < 0.5 and done < self.total):
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / max(rate, 1e-9)
    sys.stderr.write(f"\rexport: {done}/{self.total} images "
                     f"({100 * done / max(self.total, 1):.0f}%) "
                     f"{rate:.0f} images/s ETA {eta:.0f}s ")
    if done >= self.total:
      sys.stderr.write("\n")
    sys.stderr.flush()


def make_encode_fn(model: ctr.CTRModel):
  """Jitted (uint8 images, categories) -> float32 embeddings, params bound."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, images, categories):
    emb = nnx.merge(graphdef, state).encode_images(images, categories)
    return emb.astype(jnp.float32)

  return lambda images, categories: encode(state, images, categories)


def write_table(out_dir: str, model: ctr.CTRModel, source: ImageSource,
                *, num_categories: int, meta: dict[str, Any],
                batch_size: int = 256, progress: bool = True,
                overwrite: bool = False) -> dict[str, Any]:
  """Embeds every unique image of `source` into a table at `out_dir`.

  Duplicate ids keep their first occurrence. Batches are double-buffered:
  the next batch is gathered on the host while the device encodes this one.

  Returns:
    The meta.json dict (`meta` plus what the export measured).
  """
  if model.encoder is None:
    raise ValueError("the model has no image encoder (use_image=False): "
                     "there are no visual embeddings to export")
  if storage.is_remote(out_dir):
    return _write_remote(out_dir, model, source, num_categories=num_categories,
                         meta=meta, batch_size=batch_size, progress=progress,
                         overwrite=overwrite)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists (pass overwrite=True / "
                          "--overwrite to replace it)")
  ids, first = np.unique(source.ids, return_index=True)
  n = len(ids)
  if not n:
    raise ValueError(f"{source.name}: no images to export")
  encode = make_encode_fn(model)
  d = jax.eval_shape(encode, jax.ShapeDtypeStruct(
      (1, *source.images.shape[1:]), np.uint8),
                     jax.ShapeDtypeStruct((1,), np.int32)).shape[-1]
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out_dir)}-",
                         dir=parent)
  try:
    table = np.lib.format.open_memmap(os.path.join(tmp, EMBEDDINGS_FILE),
                                      mode="w+", dtype=np.float32,
                                      shape=(n, d))
    categories = source.categories[first]
    sums = np.zeros((num_categories, d), np.float64)
    counts = np.zeros(num_categories, np.int64)
    # Compile first (one fixed batch shape), so images/s is the steady rate.
    start = time.perf_counter()
    jax.block_until_ready(encode(
        np.zeros((batch_size, *source.images.shape[1:]), np.uint8),
        np.zeros(batch_size, np.int32)))
    compile_seconds = time.perf_counter() - start
    bar = _Progress(n, progress)
    start = time.perf_counter()

    def host_batch(lo: int) -> tuple[np.ndarray, np.ndarray]:
      rows = first[lo:lo + batch_size]
      images = np.zeros((batch_size, *source.images.shape[1:]), np.uint8)
      cats = np.zeros(batch_size, np.int32)
      # Sorted reads from a memmap touch each page once.
      order = np.argsort(rows)
      images[order] = source.images[rows[order]]
      cats[:len(rows)] = source.categories[rows]
      return images, cats

    pending = None  # (lo, device result) of the batch in flight
    for lo in [*range(0, n, batch_size), None]:
      nxt = None if lo is None else (lo, encode(*host_batch(lo)))
      if pending is not None:
        plo, result = pending
        m = min(batch_size, n - plo)
        emb = np.asarray(result)[:m]
        table[plo:plo + m] = emb
        cats = np.clip(categories[plo:plo + m], 0, num_categories - 1)
        np.add.at(sums, cats, emb)
        counts += np.bincount(cats, minlength=num_categories)
        bar.update(plo + m)
      pending = nxt
    seconds = time.perf_counter() - start
    table.flush()
    del table
    global_mean = sums.sum(0) / max(counts.sum(), 1)
    mean = np.where(counts[:, None] > 0,
                    sums / np.maximum(counts, 1)[:, None], global_mean)
    np.save(os.path.join(tmp, IDS_FILE), ids)
    np.save(os.path.join(tmp, CATEGORIES_FILE), categories.astype(np.int32))
    np.save(os.path.join(tmp, CATEGORY_MEAN_FILE), mean.astype(np.float32))
    meta = {"format_version": FORMAT_VERSION, **meta, "d": d,
            "dtype": "float32", "num_rows": n,
            "duplicate_ids_dropped": int(len(source.ids) - n),
            "source": source.name, "batch_size": batch_size,
            "seconds": round(seconds, 3),
            "compile_seconds": round(compile_seconds, 3),
            "images_per_sec": round(n / max(seconds, 1e-9), 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=2, default=str)
    os.chmod(tmp, 0o755)
    old = None
    if os.path.exists(out_dir):  # overwrite: move aside, swap in, delete
      old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(out_dir)}-",
                             dir=parent)
      os.rename(out_dir, os.path.join(old, "table"))
    os.rename(tmp, out_dir)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("wrote %s: %d embeddings of d=%d in %.1fs (%.0f images/s)",
               out_dir, n, d, seconds, meta["images_per_sec"])
  return meta


def _write_remote(out_dir: str, model: ctr.CTRModel, source: ImageSource,
                  overwrite: bool, **kwargs) -> dict[str, Any]:
  """write_table to a URL: written locally, then uploaded, meta.json last.

  Readers take a table as complete iff meta.json exists. Overwriting
  deletes the old table first (object stores cannot swap directories), so
  a reader may find none for a moment, never a mix.
  """
  if storage.exists(storage.join(out_dir, META_FILE)) and not overwrite:
    raise FileExistsError(f"{out_dir} exists (pass overwrite=True / "
                          "--overwrite to replace it)")
  local = storage.mirror_path(out_dir)  # EmbeddingTable reads it from there
  meta = write_table(local, model, source, overwrite=True, **kwargs)
  storage.remove(out_dir)
  storage.upload_dir(local, out_dir, META_FILE)
  return meta


def export(workdir: str, images: str | None = None, output: str | None = None,
           step: int | None = None, batch_size: int = 256,
           progress: bool = True, overwrite: bool = False) -> str:
  """Writes the embedding table of `workdir`'s checkpoint; returns its path.

  Args:
    workdir: a training run's directory (checkpoints/, config.json).
    images: a prepared dataset directory or an .npz (see load_images);
      default: the run's own prepared dataset (every item).
    output: table directory; default WORKDIR/embedding_tables/<step>.
    step: checkpoint step; default the latest.
    batch_size: images per encoder call.
    progress: print a progress line to stderr.
    overwrite: replace an existing table at `output`.
  """
  if output and storage.exists(output) and not overwrite:  # before restoring
    raise FileExistsError(f"{output} exists (--overwrite to replace it)")
  model, config, info, step = rundir.restore_model(workdir, step)
  if images is None:
    _, _, images = rundir.load_run_files(workdir)
    if not prepared.is_prepared(images):  # moved, or another machine
      # Imported here: preparing needs the data stack, which serving does not.
      from csctr.data import pipeline  # pylint: disable=g-import-not-at-top
      images = pipeline.prepare_dataset(config)  # cached by config
  source = load_images(images)
  _check_source(source, info)
  output = output or storage.join(workdir, TABLES_DIR, str(step))
  meta = {"step": step, "config_hash": config_hash(config.model, info),
          "encoder_hash": encoder_hash(model), "workdir": workdir,
          "d": int(config.model.visual_dim), "model": config.model.to_dict()}
  write_table(output, model, source, num_categories=info.num_categories,
              meta=meta, batch_size=batch_size, progress=progress,
              overwrite=overwrite)
  return output


# ---------------------------------------------------------------- reading


class EmbeddingTable:
  """A table written by write_table, embeddings memory-mapped (read-only)."""

  def __init__(self, path: str):
    if storage.is_remote(path):  # memmapped: read from a local mirror
      path = storage.local_mirror(path, META_FILE)
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f"{meta_path} not found: not an embedding table "
                              "(write one with python -m csctr.export)")
    with open(meta_path) as f:
      self.meta: dict[str, Any] = json.load(f)
    if self.meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{path}: table format "
                       f"{self.meta.get('format_version')}, this code reads "
                       f"{FORMAT_VERSION}")
    self.path = path
    self.embeddings = np.load(os.path.join(path, EMBEDDINGS_FILE),
                              mmap_mode="r")
    self.ids = np.load(os.path.join(path, IDS_FILE))
    self.categories = np.load(os.path.join(path, CATEGORIES_FILE))
    self.category_mean = np.load(os.path.join(path, CATEGORY_MEAN_FILE))
    # Ids 0..N-1 (a prepared dataset's items): the row is the id itself.
    n = len(self.ids)
    self._dense = bool(n == 0 or (self.ids[0] == 0 and self.ids[-1] == n - 1))

  @property
  def dim(self) -> int:
    return int(self.meta["d"])

  def __len__(self) -> int:
    return len(self.ids)

  def lookup(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row int64 [n], found bool [n]); rows of missing ids are 0."""
    image_ids = np.asarray(image_ids, np.int64)
    if self._dense:
      found = (image_ids >= 0) & (image_ids < len(self.ids))
      return np.where(found, image_ids, 0), found
    pos = np.searchsorted(self.ids, image_ids)
    pos = np.minimum(pos, max(len(self.ids) - 1, 0))
    found = self.ids[pos] == image_ids if len(self.ids) else pos < 0
    return np.where(found, pos, 0), found

  def check(self, expected_config_hash: str, expected_encoder_hash: str,
            step: int | None = None, allow_other_checkpoint: bool = False
            ) -> None:
    """Refuses a table of another model (or, by default, checkpoint)."""
    if self.meta["config_hash"] != expected_config_hash:
      raise ValueError(
          f"embedding table {self.path} was built from another model: its "
          f"config hash {self.meta['config_hash'][:12]} != this model's "
          f"{expected_config_hash[:12]} (model config or dataset vocabulary "
          "differ); rebuild it with python -m csctr.export --workdir=...")
    if (self.meta["encoder_hash"] != expected_encoder_hash
        and not allow_other_checkpoint):
      raise ValueError(
          f"embedding table {self.path} holds the embeddings of another "
          f"checkpoint (table step {self.meta['step']}, model step {step}; "
          "encoder parameters differ): re-export it for this step, or pass "
          "allow_other_checkpoint=True to accept stale embeddings")


# ---------------------------------------------------------------- CLI


def _cli() -> None:
  """Flags are defined here, not at import: csctr.main owns --workdir too."""
  workdir = flags.DEFINE_string("workdir", None, "Training run directory.")
  images = flags.DEFINE_string(
      "images", None, "Prepared dataset dir or .npz (images, categories"
      "[, ids]); default: the run's dataset.")
  output = flags.DEFINE_string(
      "output", None, "Table directory (default WORKDIR/embedding_tables/"
      "STEP).")
  step = flags.DEFINE_integer("step", None, "Checkpoint step (default latest).")
  batch = flags.DEFINE_integer("batch_size", 256, "Images per encoder call.")
  overwrite = flags.DEFINE_bool("overwrite", False, "Replace an existing "
                                "table.")
  flags.mark_flags_as_required(["workdir"])

  class QuietOrbax(py_logging.Filter):
    """Orbax logs a dozen INFO lines per restore; keep its warnings."""

    def filter(self, record: py_logging.LogRecord) -> bool:
      return (record.levelno >= py_logging.WARNING
              or "/orbax/" not in record.pathname.replace("\\", "/"))

  def main(argv):
    logging.get_absl_handler().addFilter(QuietOrbax())
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    path = export(workdir.value, images.value, output.value, step.value,
                  batch.value, overwrite=overwrite.value)
    meta = EmbeddingTable(path).meta
    print(json.dumps({"path": path, **{k: meta[k] for k in (
        "step", "num_rows", "d", "images_per_sec", "seconds",
        "config_hash")}}))

  app.run(main)


if __name__ == "__main__":
  _cli()
