"""Input pipeline: prepared image groups -> fixed-shape batches, with Grain.

Everything expensive happened at prepare time (csctr.data.prepare): images are
stored decoded and resized in one uint8 table, impressions are packed into
image groups of <= K. A batch here is G group records plus a gather of image
rows, so producing one costs a few hundred microseconds (see
benchmarks/pipeline.py); uint8 -> float happens on device in the model.

Train: MapDataset(group records)
         .shuffle(shuffle_seed).repeat().batch(G, batch_fn=Collator(shards))
         .to_iter_dataset(prefetch threads)[.mp_prefetch(worker_count)]
is infinite, reshuffled every epoch (Grain folds the epoch into the seed),
deterministic for the seed, and its iterator is a grain DatasetIterator whose
get_state()/set_state() is a small JSON dict: checkpoint it with
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`
in an Orbax CheckpointManager (csctr.training.checkpointing wraps exactly that), and
the restored iterator yields the batch that would have come next. Batches
cross epoch boundaries (an epoch is a contiguous run of G-group slots).

One global data order. Global batch i is groups [i*G, (i+1)*G) of that
shuffled stream, collated as one batch: a function of the config and the
seed only, never of the number of processes or devices. Its rows are split
into `Shards`: the D blocks of mesh axis 'data' (impression rows and image
rows alike, B/D and U/D each); a process builds only the blocks its devices
hold (csctr.training.mesh.data_shards reads them off the data sharding, so
replica hosts on a 'model' axis get identical blocks, whatever the device
order). Every process reads the G group records of the batch (the image
table's layout depends on all of them; a record is a few hundred bytes) but
gathers the pixels of its own image rows only. The iterator's state is then
the same on every process, so a checkpoint resumes on any process count.
`ad_image` and `behavior_images` index the global image table.

Unique-image budget. The G ad images of a batch always fit (U >= G; repeated
ad items share a row). Behaviour images fill the remaining U - #ads rows,
most-referenced items first (ties: lower item row), which keeps as many
behaviour slots as the budget allows; references to images that did not fit
get behavior_mask False and are counted (Collator.stats, and
`behavior_overflow` estimates the dropped fraction for a config, which the
benchmark prints). Size unique_images so that fraction stays small.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator, Sequence

from absl import flags
from absl import logging
from array_record.python import array_record_data_source
import grain
import ml_collections
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

from csctr import storage
from csctr.data import autobatch
from csctr.data import batch as batch_lib
from csctr.data import image_store
from csctr.data import prepare as prepare_lib
from csctr.data import prepared
from csctr.data import registry

load_info = prepared.load_info


# ---------------------------------------------------------------- prepare


def data_root(config: ml_collections.ConfigDict) -> str:
  """config.data_dir, else $CSCTR_DATA_DIR, else ~/.cache/csctr (or a URL)."""
  return (config.data_dir or os.environ.get("CSCTR_DATA_DIR")
          or os.path.join(os.path.expanduser("~"), ".cache", "csctr"))


def prepare_dataset(config: ml_collections.ConfigDict,
                    wait: bool = False) -> str:
  """Prepares config's dataset once (cached by config hash); returns path.

  The path is a local directory or, when the data root is a URL, the URL of
  the committed dataset: it is prepared into its local mirror
  (prepared.local_copy) and uploaded with info.json last. With wait=True
  nothing is prepared: this waits for another process (or a Beam job) to
  commit it.
  """
  key = registry.dataset_key(config)
  path = prepared.cache_path(data_root(config), key)
  if prepared.is_prepared(path):
    return path
  if wait:
    logging.info("waiting for %s to be prepared", path)
    storage.wait_for(path, prepared.COMMIT_FILE, config.data.prepare_timeout_s)
    return path
  logging.info("preparing %s dataset into %s", config.dataset, path)
  local = prepared.mirror_path(path)
  if not prepared.is_prepared(local):
    prepare_lib.prepare(
        registry.make_source(config), local, group_size=key["group_size"],
        key=key, image_storage=key["image_storage"],
        validation_fraction=config.data.validation_fraction,
        target_packing=key.get("target_packing", autobatch.TARGET_PACKING),
        max_group_size=key.get("max_group_size", autobatch.MAX_GROUP_SIZE))
  if local != path:
    storage.upload_dir(local, path, prepared.COMMIT_FILE)
  return path


# ---------------------------------------------------------------- reading


def groups_source(path: str, split: str) -> "GroupSource":
  """Random-access source of the split's group records (see GroupSource)."""
  return GroupSource(path, split)


class GroupSource:
  """The split's group records, decoded straight from their Example protos.

  The records are TFDS examples, and `tfds.builder_from_directory(
  path/groups).as_data_source(split)` reads them too (a test checks they
  agree), but TFDS's generic decoder costs ~80 us per record in Python; this
  one reads the few known fields with one proto parse and np.array each
  (~15 us), which is most of the pipeline's per-batch time.
  """

  def __init__(self, path: str, split: str):
    # ArrayRecord opens local files only (given a gs:// path it tries real
    # GCS): a dataset in an object store is read from this machine's mirror.
    path = prepared.local_copy(path)
    info = prepared.load_info(path)
    self._spec = prepared.group_spec(
        len(info.sparse_features), info.num_dense, info.num_behaviors)
    self._path, self._split = path, split
    self._length = info.splits[split].groups
    self._reader = None

  def __len__(self) -> int:
    return self._length

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_reader"] = None  # reopened in worker processes
    return state

  def __repr__(self) -> str:
    return f"GroupSource({self._path!r}, {self._split!r}, len={self._length})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    reader = self._reader
    if reader is None:  # a race here only opens a second reader
      reader = self._reader = array_record_data_source.ArrayRecordDataSource(
          prepared.shard_paths(self._path, self._split))
    example = tf_example_pb2.Example()
    example.ParseFromString(reader[index])
    feature = example.features.feature
    out = {}
    for key, (dtype, shape) in self._spec.items():
      f = feature[key]
      values = f.float_list.value if dtype == np.float32 else f.int64_list.value
      if key == "item":
        out[key] = np.int32(values[0])
      else:
        out[key] = np.array(values, dtype).reshape(-1, *shape)
    return out


# ---------------------------------------------------------------- batching


Shards = batch_lib.Shards
IMAGE_ROW_FIELDS = batch_lib.IMAGE_ROW_FIELDS


class Collator:
  """Turns <= G group records into one batch of the contract's fixed shapes.

  Group g fills impression slots [g*K, g*K + n_g); the rest are padding
  (weight 0, impression_id -1). Missing groups (the end of an eval split)
  are padding too. See the module docstring for the image-row policy. With
  `shards`, only the process's blocks of the global batch are returned
  (image pixels are gathered for those rows only).
  """

  def __init__(self, path: str, info: batch_lib.DataInfo,
               groups_per_batch: int, group_size: int, unique_images: int,
               shards: Shards = Shards()):
    self.path, self.info = path, info
    self.g, self.k, self.u = groups_per_batch, group_size, unique_images
    self.shards = shards
    self._b_rows = shards.rows(groups_per_batch * group_size,
                               "groups_per_batch * group_size")
    self._u_rows = shards.rows(unique_images, "unique_images")
    self.shapes = {
        k: ((len(self._u_rows if k in IMAGE_ROW_FIELDS else self._b_rows),
             *shape[1:]), dtype)
        for k, (shape, dtype) in batch_lib.batch_shapes(
            info, groups_per_batch, group_size, unique_images).items()}
    self.stats = {"behavior_refs": 0, "dropped_behavior_refs": 0}
    self._tables_ = None
    self._warned = False

  def __getstate__(self):
    # Worker processes reopen the memmap rather than pickling the table.
    return {**self.__dict__, "_tables_": None}

  def _tables(self) -> tuple[np.ndarray, np.ndarray]:
    # One assignment, so a concurrent prefetch thread sees both or neither.
    if self._tables_ is None:
      self._tables_ = (
          image_store.open_images(self.path, self.info),
          np.load(os.path.join(self.path, prepared.CATEGORY_FILE)))
    return self._tables_

  def __call__(self, groups: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    if len(groups) > self.g:
      raise ValueError(f"{len(groups)} groups > groups_per_batch={self.g}")
    out = {k: np.zeros((self.g * self.k, *shape[1:]), dtype)
           for k, (shape, dtype) in self.shapes.items()
           if k not in IMAGE_ROW_FIELDS}
    out["impression_id"].fill(-1)
    rows = self._impressions(groups, out) if groups else np.zeros(0, np.int64)
    if not self.shards.is_all:
      out = {k: v[self._b_rows] for k, v in out.items()}
    images, category = self._tables()
    mine = self._u_rows < len(rows)  # this process's filled image rows
    items = rows[self._u_rows[mine]]
    for key, table in (("images", images), ("image_category", category)):
      shape, dtype = self.shapes[key]
      out[key] = np.zeros(shape, dtype)
      out[key][mine] = table[items]
    out["image_mask"] = mine
    return out

  def _impressions(self, groups, out) -> np.ndarray:
    """Fills the impression fields of the whole batch; returns its image rows.

    The image table's row r shows item rows[r]; ad_image and
    behavior_images hold those (global) rows.
    """
    sizes = np.array([len(x["label"]) for x in groups])
    total = int(sizes.sum())
    first = np.cumsum(sizes) - sizes
    slot = (np.repeat(np.arange(len(groups)) * self.k, sizes)
            + np.arange(total) - np.repeat(first, sizes))
    for key in ("label", "user_id", "impression_id", "is_cold", "sparse"):
      out[key][slot] = np.concatenate([x[key] for x in groups])
    if self.info.num_dense:
      out["dense"][slot] = np.concatenate([x["dense"] for x in groups])
    out["weight"][slot] = 1.0
    ad_items = np.array([int(x["item"]) for x in groups])
    rows, ad_row = np.unique(ad_items, return_inverse=True)
    out["ad_image"][slot] = np.repeat(ad_row.reshape(-1), sizes)
    if self.info.num_behaviors:
      rows = self._behaviors(groups, slot, rows, out)
    return rows

  def _behaviors(self, groups, slot, rows, out) -> np.ndarray:
    """Fills behavior_images/mask; returns the image table's item rows."""
    beh = np.concatenate([x["behavior"] for x in groups])
    valid = beh >= 0
    refs = beh[valid]
    if not refs.size:
      return rows
    items, inverse, counts = np.unique(refs, return_inverse=True,
                                       return_counts=True)
    row_of = np.full(len(items), -1, np.int64)
    pos = np.searchsorted(rows, items)
    is_ad = (pos < len(rows)) & (rows[np.minimum(pos, len(rows) - 1)] == items)
    row_of[is_ad] = pos[is_ad]
    extra = np.flatnonzero(~is_ad)
    extra = extra[np.lexsort((items[extra], -counts[extra]))]  # most used first
    keep = extra[:self.u - len(rows)]
    row_of[keep] = len(rows) + np.arange(len(keep))
    ref_rows = row_of[inverse.reshape(-1)]
    local = np.zeros(beh.shape, np.int64)
    local[valid] = np.maximum(ref_rows, 0)
    mask = np.zeros(beh.shape, bool)
    mask[valid] = ref_rows >= 0
    out["behavior_images"][slot] = local
    out["behavior_mask"][slot] = mask
    lost = np.zeros(beh.shape, np.int32)
    lost[valid] = ref_rows < 0
    out["behavior_dropped"][slot] = lost.sum(axis=1)  # counted by the step
    self.stats["behavior_refs"] += int(refs.size)
    dropped = int((ref_rows < 0).sum())
    self.stats["dropped_behavior_refs"] += dropped
    if dropped and not self._warned:
      self._warned = True
      logging.warning(
          "unique_images=%d cannot hold a batch's behaviour images: %d of %d "
          "references masked (counted in Collator.stats; estimate the rate "
          "with pipeline.behavior_overflow)", self.u, dropped, refs.size)
    return np.concatenate([rows, items[keep]])


# ---------------------------------------------------------------- iterators


def _read_options(config: ml_collections.ConfigDict) -> grain.ReadOptions:
  # Whole batches are built in the prefetch threads, overlapping the train
  # step; two threads keep up easily and leave the cores to XLA.
  return grain.ReadOptions(
      num_threads=config.data.read_threads,
      prefetch_buffer_size=config.data.prefetch_batches)


def train_iterator(config: ml_collections.ConfigDict, path: str,
                   shards: Shards = Shards()) -> grain.DatasetIterator:
  """Infinite, per-epoch reshuffled, checkpointable iterator of train batches.

  Yields this process's `shards` of each global batch (see the module
  docstring); its state is the global batch index, the same everywhere.
  """
  d = config.data
  g = d.groups_per_batch
  path = prepared.local_copy(path)
  collate = Collator(path, load_info(path), g, d.group_size, d.unique_images,
                     shards)
  ds = grain.MapDataset.source(groups_source(path, "train"))
  if len(ds) < g:
    raise ValueError(f"{len(ds)} training groups, fewer than one batch ({g})")
  ds = ds.shuffle(seed=d.shuffle_seed).repeat().batch(
      g, drop_remainder=True, batch_fn=collate)
  it = ds.to_iter_dataset(_read_options(config))
  if d.worker_count:
    # Grain's workers read absl flags; parsing them is the program's job
    # (absl.app.run does it), not a library's.
    if not flags.FLAGS.is_parsed():
      raise ValueError(
          f"data.worker_count={d.worker_count} needs parsed absl flags "
          "(Grain's worker processes read them): run under absl.app.run, or "
          "call absl.flags.FLAGS.mark_as_parsed() first (notebooks), or set "
          "data.worker_count=0")
    it = it.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=d.worker_count))
  return iter(it)


def eval_batches(config: ml_collections.ConfigDict, path: str,
                 split: str = "test", shards: Shards = Shards()
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every impression of `split` exactly once, in fixed-shape batches.

  Global batch i is the split's groups [i*G, (i+1)*G) in stored order; the
  last one is padded (weight 0). Yields this process's `shards` of each, so
  every process yields the same number of batches.
  """
  d = config.data
  path = prepared.local_copy(path)
  g, u = d.eval_groups_per_batch, d.eval_unique_images
  info = load_info(path)
  collate = Collator(path, info, g, d.group_size, u, shards)
  if info.num_behaviors:
    # Batches cut so every behaviour image fits: nothing is dropped, and
    # the metrics do not depend on which groups share a batch. One global
    # plan: every process builds its blocks of the same batches.
    (plan,) = _eval_plans(path, split, g, u, 1)
    source = groups_source(path, split)
    ds = grain.MapDataset.source(plan).map(
        lambda idx: collate([source[i] for i in idx]))
  else:
    ds = grain.MapDataset.source(groups_source(path, split))
    ds = ds.batch(g, drop_remainder=False, batch_fn=collate)
  if len(ds):
    yield from ds.to_iter_dataset(_read_options(config))


@functools.lru_cache(maxsize=16)
def _eval_plans(path: str, split: str, groups_per_batch: int,
                unique_images: int, process_count: int
                ) -> tuple[tuple[tuple[int, ...], ...], ...]:
  """eval_plan of every process's shard (each needs all counts), cached:
  a prepared split never changes, and the plan costs a read of the split."""
  source = groups_source(path, split)
  return tuple(
      tuple(tuple(b) for b in eval_plan(
          source, range(p, len(source), process_count), groups_per_batch,
          unique_images))
      for p in range(process_count))


def eval_plan(source: Sequence[dict[str, Any]], indices: Sequence[int],
              groups_per_batch: int, unique_images: int) -> list[list[int]]:
  """Consecutive groups per eval batch such that no behaviour is dropped.

  A batch closes when it holds groups_per_batch groups or when the next
  group's images (its ad image and its behaviour images) would not fit in
  unique_images distinct rows. So every reference of the split finds its
  image and eval metrics do not depend on how groups fall into batches.
  """
  batches, current, images = [], [], set()
  for i in indices:
    group = source[i]
    beh = np.asarray(group["behavior"]).reshape(-1)
    need = {int(group["item"])} | set(beh[beh >= 0].tolist())
    if len(need) > unique_images:
      raise ValueError(
          f"eval group {i} references {len(need)} distinct images (its ad "
          f"and behaviour images) > eval_unique_images={unique_images}: "
          "raise config.data.eval_unique_images")
    if current and (len(current) == groups_per_batch
                    or len(images | need) > unique_images):
      batches.append(current)
      current, images = [], set()
    current.append(i)
    images |= need
  if current:
    batches.append(current)
  return batches


def behavior_overflow(config: ml_collections.ConfigDict, path: str,
                      num_batches: int = 50) -> dict[str, float]:
  """Fraction of behaviour references the U budget drops, on train batches."""
  d = config.data
  info = load_info(path)
  if not info.num_behaviors:
    return {"behavior_refs": 0, "dropped_behavior_refs": 0,
            "dropped_fraction": 0.0}
  collate = Collator(path, info, d.groups_per_batch, d.group_size,
                     d.unique_images)
  collate._warned = True  # pylint: disable=protected-access  # we report it
  ds = grain.MapDataset.source(groups_source(path, "train"))
  ds = ds.shuffle(seed=d.shuffle_seed).repeat()
  for b in range(num_batches):
    collate([ds[b * d.groups_per_batch + i] for i in range(d.groups_per_batch)])
  s = collate.stats
  return {**s, "dropped_fraction": s["dropped_behavior_refs"] /
          max(s["behavior_refs"], 1)}
