r"""Offline visual-embedding table: the CNN runs here, never in the scorer.

  python -m csctr.export --workdir=/tmp/csctr_default
  python -m csctr.export --workdir=DIR --images=/path/to/prepared_dataset
  python -m csctr.export --workdir=DIR --images=catalogue.npz   # images,
      # categories, optional ids (int64) and raw_ids (str) arrays
  python -m csctr.export --workdir=DIR --only_new --base_table=TABLE \
      --images=catalogue.npz      # a new version: TABLE + the new items

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
    raw_ids.npy        optional str [N]: the raw item id of each row (how
                       requests to csctr.serve name items); without it an
                       item's raw id is its image id in decimal
    meta.json          format_version, step, config_hash, encoder_hash, d,
                       dtype, num_rows, new_rows, base_table, source, timing

Incremental export (daily catalogue updates): with a base table of the same
checkpoint, only the images whose ids it lacks are embedded; its rows are
copied, and the result is a new table (default: the base's name + .K, e.g.
6 -> 6.1 -> 6.2) that csctr.serve swaps in.

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
import functools
import hashlib
import json
import logging as py_logging
import os
import shutil
import tempfile
import time
from typing import Any

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from csctr.data import batch as batch_lib
from csctr.model import ctr
from csctr.data import prepared
from csctr import progress as progress_lib
from csctr.data import image_store
from csctr import rundir
from csctr import storage

from csctr.serving.table import CATEGORIES_FILE
from csctr.serving.table import CATEGORY_MEAN_FILE
from csctr.serving.table import EMBEDDINGS_FILE
from csctr.serving.table import EmbeddingTable
from csctr.serving.table import FORMAT_VERSION
from csctr.serving.table import IDS_FILE
from csctr.serving.table import META_FILE
from csctr.serving.table import RAW_IDS_FILE
from csctr.serving.table import TABLES_DIR
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
  raw_ids: np.ndarray | None = None  # str [M]: how requests name the items


def load_images(spec: str) -> ImageSource:
  """A prepared dataset directory, or an .npz with images/categories[/ids].

  A dataset may be a URL: it is read from its local mirror.
  """
  if storage.is_remote(spec) and prepared.is_prepared(spec):
    spec = prepared.local_copy(spec)
  if os.path.isdir(spec):
    images = image_store.open_images(spec, prepared.load_info(spec))
    categories = np.load(os.path.join(spec, prepared.CATEGORY_FILE))
    ids, raw = np.arange(len(images), dtype=np.int64), None
  elif spec.endswith(".npz"):
    with np.load(spec) as z:
      missing = {"images", "categories"} - set(z.files)
      if missing:
        raise ValueError(f"{spec} lacks arrays {sorted(missing)}")
      images, categories = z["images"], z["categories"]
      ids = z["ids"] if "ids" in z.files else np.arange(len(images))
      raw = z["raw_ids"].astype(np.str_) if "raw_ids" in z.files else None
  else:
    raise ValueError(f"--images={spec!r}: a prepared dataset directory or "
                     "an .npz with images, categories and optional ids, "
                     "raw_ids")
  return ImageSource(np.asarray(ids, np.int64), images,
                     np.asarray(categories, np.int32), spec, raw)


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
  if source.raw_ids is not None and source.raw_ids.shape != (m,):
    raise ValueError(f"{source.name}: {m} images but raw_ids "
                     f"{source.raw_ids.shape}")


# ---------------------------------------------------------------- writing


@functools.lru_cache(maxsize=8)
def _encode_jit(graphdef: nnx.GraphDef):
  """One jitted encoder per model structure: a hot-swapped checkpoint of
  the same model (csctr.serve) reuses its compiled code."""

  @jax.jit
  def encode(state, images, categories):
    emb = nnx.merge(graphdef, state).encode_images(images, categories)
    return emb.astype(jnp.float32)

  return encode


def make_encode_fn(model: ctr.CTRModel):
  """Jitted (uint8 images, categories) -> float32 embeddings, params bound."""
  graphdef, state = nnx.split(model)
  encode = _encode_jit(graphdef)
  return lambda images, categories: encode(state, images, categories)


def write_table(out_dir: str, model: ctr.CTRModel, source: ImageSource,
                *, num_categories: int, meta: dict[str, Any],
                batch_size: int = 256, progress: bool = True,
                overwrite: bool = False,
                base: EmbeddingTable | None = None) -> dict[str, Any]:
  """Embeds every unique image of `source` into a table at `out_dir`.

  Duplicate ids keep their first occurrence. Batches are double-buffered:
  the next batch is gathered on the host while the device encodes this one.
  With `base` (an incremental export), the new table holds the base's rows,
  copied, plus the images of `source` whose ids the base lacks, embedded:
  a daily catalogue update costs its new items only.

  Long because one try block must cover every file of the table: on any
  error the temporary directory goes, so no reader ever sees half a table;
  the row copying, encoding and id mapping are helpers already.

  Returns:
    The meta.json dict (`meta` plus what the export measured).
  """
  if model.encoder is None:
    raise ValueError("the model has no image encoder (use_image=False): "
                     "there are no visual embeddings to export")
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists (pass overwrite=True / "
                          "--overwrite to replace it)")
  new_ids, first = np.unique(source.ids, return_index=True)
  if base is not None:  # only the ids the base lacks
    keep = ~np.isin(new_ids, base.ids)
    new_ids, first = new_ids[keep], first[keep]
  base_ids = base.ids if base is not None else np.zeros((0,), np.int64)
  ids = np.union1d(base_ids, new_ids)
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
    categories = np.zeros(n, np.int32)
    new_pos = np.searchsorted(ids, new_ids)
    categories[new_pos] = source.categories[first]
    sums = np.zeros((num_categories, d), np.float64)
    counts = np.zeros(num_categories, np.int64)

    def add(pos: np.ndarray, emb: np.ndarray, table=table) -> None:
      table[pos] = emb
      cats = np.clip(categories[pos], 0, num_categories - 1)
      np.add.at(sums, cats, emb)
      counts[:] += np.bincount(cats, minlength=num_categories)

    if base is not None:
      _copy_base(base, np.searchsorted(ids, base.ids), categories, add)
    timing = _encode_rows(encode, source, first, new_pos, batch_size, add,
                          progress)
    table.flush()
    del add, table  # closes the memory map
    global_mean = sums.sum(0) / max(counts.sum(), 1)
    mean = np.where(counts[:, None] > 0,
                    sums / np.maximum(counts, 1)[:, None], global_mean)
    np.save(os.path.join(tmp, IDS_FILE), ids)
    np.save(os.path.join(tmp, CATEGORIES_FILE), categories)
    np.save(os.path.join(tmp, CATEGORY_MEAN_FILE), mean.astype(np.float32))
    raw = _raw_ids(ids, base, source, first, new_pos)
    if raw is not None:
      np.save(os.path.join(tmp, RAW_IDS_FILE), raw)
    seconds = timing["seconds"]
    meta = {"format_version": FORMAT_VERSION, **meta, "d": d,
            "dtype": "float32", "num_rows": n, "new_rows": len(new_ids),
            "base_table": base.path if base is not None else None,
            "duplicate_ids_dropped": int(len(source.ids)
                                         - len(np.unique(source.ids))),
            "source": source.name, "batch_size": batch_size, **timing,
            "images_per_sec": round(len(new_ids) / max(seconds, 1e-9), 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "created_unix": time.time()}
    with open(os.path.join(tmp, META_FILE), "w") as f:
      json.dump(meta, f, indent=2, default=str)
    _commit(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("wrote %s: %d embeddings (%d new) of d=%d in %.1fs "
               "(%.0f images/s)", out_dir, n, len(new_ids), d, seconds,
               meta["images_per_sec"])
  return meta


def _copy_base(base: EmbeddingTable, pos: np.ndarray, categories: np.ndarray,
               add: Any, chunk: int = 65536) -> None:
  """The base table's rows into their places, a chunk at a time."""
  categories[pos] = base.categories
  for lo in range(0, len(pos), chunk):
    add(pos[lo:lo + chunk], np.asarray(base.embeddings[lo:lo + chunk]))


def _raw_ids(ids: np.ndarray, base: EmbeddingTable | None,
             source: ImageSource, first: np.ndarray,
             new_pos: np.ndarray) -> np.ndarray | None:
  """raw_ids.npy of the new table, if the base or the source has them."""
  base_raw = base.raw_ids if base is not None else None
  if base_raw is None and source.raw_ids is None:
    return None
  raw = ids.astype(np.str_).astype(object)  # default: the key in decimal
  if base_raw is not None:
    raw[np.searchsorted(ids, base.ids)] = base_raw
  if source.raw_ids is not None:
    raw[new_pos] = source.raw_ids[first]
  raw = raw.astype(np.str_)
  if len(np.unique(raw)) != len(raw):
    raise ValueError(f"{source.name}: raw_ids are not unique per id")
  return raw


def _encode_rows(encode: Any, source: ImageSource, first: np.ndarray,
                 pos: np.ndarray, batch_size: int, add: Any,
                 progress: bool) -> dict[str, float]:
  """Embeds source rows `first` into table rows `pos`, double-buffered."""
  n = len(first)
  if not n:
    return {"seconds": 0.0, "compile_seconds": 0.0}
  # Compile first (one fixed batch shape), so images/s is the steady rate.
  start = time.perf_counter()
  jax.block_until_ready(encode(
      np.zeros((batch_size, *source.images.shape[1:]), np.uint8),
      np.zeros(batch_size, np.int32)))
  compile_seconds = time.perf_counter() - start
  bar = progress_lib.ProgressLine("export", "images", n, enabled=progress)
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
      add(pos[plo:plo + m], np.asarray(result)[:m])
      bar.update(plo + m)
    pending = nxt
  return {"seconds": round(time.perf_counter() - start, 3),
          "compile_seconds": round(compile_seconds, 3)}


def _commit(tmp: str, out_dir: str) -> None:
  """Renames the finished tmp directory into place (replacing out_dir)."""
  os.chmod(tmp, 0o755)
  parent = os.path.dirname(tmp)
  old = None
  if os.path.exists(out_dir):  # overwrite: move aside, swap in, delete
    old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(out_dir)}-",
                           dir=parent)
    os.rename(out_dir, os.path.join(old, "table"))
  os.rename(tmp, out_dir)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def export(workdir: str, images: str | None = None, output: str | None = None,
           step: int | None = None, batch_size: int = 256,
           progress: bool = True, overwrite: bool = False,
           base_table: str | None = None) -> str:
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
    base_table: an incremental export (--only_new): embed only the images
      this table lacks, copy its rows; it must be of the same checkpoint.
      `output` then defaults to the next version beside it (6 -> 6.1 -> 6.2).
  """
  if output and storage.exists(output) and not overwrite:  # before restoring
    raise FileExistsError(f"{output} exists (--overwrite to replace it)")
  model, config, info, step = rundir.restore_model(workdir, step)
  output = output or (next_version(base_table) if base_table else
                      storage.join(workdir, TABLES_DIR, str(step)))
  # A URL: written into its local mirror (which EmbeddingTable then reads),
  # then uploaded with meta.json last, the commit marker. Overwriting a URL
  # deletes the old table first: a reader may find none, never a mix.
  local = storage.mirror_path(output)
  if images is None:
    _, _, images = rundir.load_run_files(workdir)
    if not prepared.is_prepared(images):  # moved, or another machine
      # Imported here: preparing needs the data stack, which serving does not.
      from csctr.data import pipeline  # pylint: disable=g-import-not-at-top
      images = pipeline.prepare_dataset(config)  # cached by config
  source = load_images(images)
  _check_source(source, info)
  meta = {"step": step, "config_hash": config_hash(config.model, info),
          "encoder_hash": encoder_hash(model), "workdir": workdir,
          "d": int(config.model.visual_dim), "model": config.model.to_dict()}
  base = None
  if base_table is not None:
    base = EmbeddingTable(base_table)
    # Rows of two encoders must not mix in one table.
    base.check(meta["config_hash"], meta["encoder_hash"], step)
  write_table(local, model, source, num_categories=info.num_categories,
              meta=meta, batch_size=batch_size, progress=progress,
              overwrite=overwrite or local != output, base=base)
  if local != output:
    storage.remove(output)
    storage.upload_dir(local, output, META_FILE)
  return output


def next_version(table_path: str) -> str:
  """The directory beside `table_path` for its next version: STEM.K+1."""
  parent, name = os.path.split(os.path.normpath(table_path))
  stem = name.split(".")[0]
  k = 0
  for other in os.listdir(parent):
    head, _, tail = other.partition(".")
    if head == stem and tail.isdigit():
      k = max(k, int(tail))
  return os.path.join(parent, f"{stem}.{k + 1}")


class _QuietOrbax(py_logging.Filter):
  """Orbax logs a dozen INFO lines per restore; keep its warnings."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return (record.levelno >= py_logging.WARNING
            or "/orbax/" not in record.pathname.replace("\\", "/"))


def quiet_orbax_logging() -> None:
  """For command-line tools that restore: absl's handler drops Orbax INFO."""
  logging.get_absl_handler().addFilter(_QuietOrbax())
