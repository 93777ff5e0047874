"""The prepare step on Apache Beam: BYOD logs -> a prepared dataset.

`python -m csctr.prepare --config=... --runner=DirectRunner` (or Dataflow,
Flink, Spark: docs/data.md) writes the same prepared dataset as the
in-process path (csctr.data.prepare), at the same cache path, so training
finds it and needs no change. It is the same computation, distributed:

  items.csv (read by the launcher: one row per item)
  images    Create(image shards) -> decode, check, encode, write a store
            shard per worker (csctr.data.image_store) -> usable-image mask
  blocks    Parquet row groups / CSV files (csctr.data.tables), row counts
            -> the first row id of every block
    pass 0  (timestamp splits) split_boundary's three passes (key
            range, coarse histogram, the boundary bin's exact keys), each
            merged by an order-free CombineFn -> the boundary
    pass 1  parse + validate + summarize each block (byod_log.summarize),
            merged by a CombineFn -> byod_log.plan: vocabularies (train
            counts), user index (a side input)
    pass 2  csctr.data.beam_shuffle: byod_log.emit per block -> spill files
            per (split, shard), shard = hash of the ad item, so each image's
            impressions meet in one shard -> GroupByKey of the file names
            -> sort by (item, impression id) -> packing.cut_groups (the
            in-process Packer's cutting function) -> one ArrayRecord part
            per (split, shard)
  launcher  info.json, TFDS metadata, vocab/ files; commits the directory.

Scale. Workers hold one block (a Parquet row group) or one shard's
impressions at a time; shards per split = max(config.beam.num_shards,
rows / beam_shuffle.SHARD_ROWS), so a shard stays near 2^21 rows however
big the log. The Plan (vocabularies, user index) is a side input every
worker holds: about 150 bytes per distinct user or feature value. A CSV
file is read by one worker (rows cannot be located in it without reading
it); many files or Parquet row groups read in parallel. Peak memory thus
depends on the distinct ids, the items and the block size, not on the
number of impressions (docs/data.md has the measurements).

Output in an object store (config.data_dir = gs://...). Workers write their
shards to a staging URL beside the dataset (<path>.staging-<id>: each file
is written locally, then uploaded whole); the launcher copies them to their
TFDS names under <path> (server-side copies), uploads info.json, metadata
and vocab/, and the COMMITTED marker last, then deletes the staging URL.
Readers see nothing at <path> until COMMITTED exists (prepared.is_prepared),
so a run that dies half-way leaves only the staging prefix behind.
"""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import time
from typing import Any, Iterator
import uuid

from absl import logging
import apache_beam as beam
import numpy as np

from csctr import storage
from csctr.data import batch as batch_lib
from csctr.data import beam_shuffle
from csctr.data import byod
from csctr.data import byod_items
from csctr.data import byod_log
from csctr.data import image_io
from csctr.data import image_store
from csctr.data import prepare as prepare_lib
from csctr.data import prepared
from csctr.data import registry
from csctr.data import split_boundary

SUMMARY_FILE = "beam_summary.pkl"


class Job:
  """What every worker needs, built once by the launcher and pickled."""

  def __init__(self, config: Any, tmp: str, out: str | None = None):
    self.root, self.items, self.reader = byod.open_dataset(config)
    self.tmp = tmp  # the launcher's local directory
    self.out = out or tmp  # where workers write shards: tmp or a URL
    self.name = config.dataset
    self.size = int(config.data.image_size)
    self.num_behaviors = int(config.data.num_behaviors)
    if config.data.batching != "fixed" or config.data.validation_fraction:
      raise ValueError(
          "the Beam prepare supports data.batching='fixed' and "
          "data.validation_fraction=0 only (got "
          f"{config.data.batching!r}, {config.data.validation_fraction}); "
          "use --runner=inprocess for auto batching or a validation split")
    self.group_size = int(config.data.group_size)
    self.storage = config.data.image_storage
    self.resize = config.byod.resize
    self.skip_bad = bool(config.byod.skip_bad_images)
    self.min_count = int(config.data.min_count)
    self.hash_buckets = int(config.data.hash_buckets)
    if self.storage not in image_store.STORAGES:
      raise ValueError(f"data.image_storage {self.storage!r} not in "
                       f"{image_store.STORAGES}")
    self.num_shards = int(config.beam.num_shards)
    self.image_shards = int(config.beam.image_shards)
    self.blocks = self.reader.table.blocks()
    self.features = None

  def group_features(self):
    if self.features is None:  # built on the worker (TFDS objects)
      self.features = prepare_lib.group_features(
          3 + len(self.reader.extras), 0, self.num_behaviors)
    return self.features


def _images(shard: int, job: Job) -> Iterator[dict[str, Any]]:
  """Decodes and stores one image shard; yields its usable rows, counts."""
  rows = image_store.shard_rows(len(job.items.ids), job.image_shards, shard)
  payloads, good, missing, corrupt = {}, [], 0, 0
  for r, out in zip(rows, byod_items.decode_items(job.items, rows, job.size,
                                                  job.resize, 1)):
    if isinstance(out, image_io.BadImageError):
      if not job.skip_bad:
        raise job.items.error(f"bad image {out.path}: {out.reason}", r,
                              "image")
      missing += isinstance(out, image_io.MissingImageError)
      corrupt += not isinstance(out, image_io.MissingImageError)
      continue
    good.append(r)
    payloads[r] = (job.items.image_bytes(r) if job.storage == "original"
                   else image_store.encode(out, job.storage))
  with beam_shuffle.output(job.out, _store_rel(job, shard)) as path:
    nbytes = image_store.write_shard(path, rows, payloads)
  yield {"good": np.asarray(good, np.int64), "skipped_images_missing": missing,
         "skipped_images_corrupt": corrupt, "image_bytes": nbytes}


def _merge_images(parts: list[dict[str, Any]], num_items: int) -> dict:
  good = np.zeros(num_items, bool)
  counts = {"skipped_images_missing": 0, "skipped_images_corrupt": 0,
            "image_bytes": 0}
  for part in parts:
    good[part["good"]] = True
    for k in counts:
      counts[k] += part[k]
  return {"good": good, **counts}


def _offsets(counts: dict[int, int]) -> dict[int, int]:
  """Block index -> id of its first row (rows are numbered over blocks)."""
  starts, total = {}, 0
  for i in sorted(counts):
    starts[i], total = total, total + counts[i]
  return starts


def _fold_keys(block, job: Job, starts, images, fn, merge, zero, *args
               ) -> Iterator[Any]:
  """One boundary pass (split_boundary's 0a/b/c) over one block: fn of each
  key chunk, folded with merge."""
  acc = zero()
  for keys in job.reader.block_keys(block, starts[block.index]):
    acc = merge(acc, fn(keys, images["good"], *args))
  yield acc


class _Merge(beam.CombineFn):
  """An order-free merge(a, b) with its identity zero() as a CombineFn."""

  def __init__(self, merge, zero):
    self.merge, self.zero = merge, zero

  def create_accumulator(self):
    return self.zero()

  def add_input(self, acc, x):
    return self.merge(acc, x)

  def merge_accumulators(self, accs):
    return functools.reduce(self.merge, accs, self.zero())

  def extract_output(self, acc):
    return acc


def _no_range():
  return np.array([np.inf, -np.inf])


def _no_bins():
  return np.zeros(split_boundary.BINS, np.int64)


def _no_hist():
  return np.zeros(0), np.zeros(0, np.int64)


def _fine(keys, good, key_range, goal):
  return split_boundary.fine_histogram(keys, good, key_range, goal[0])


def _time_boundary(blocks, job: Job, starts_si, images_si):
  """split_boundary's three passes as Beam stages."""
  def fold(name, fn, merge, zero, *args):
    return (blocks | name >> beam.FlatMap(_fold_keys, job, starts_si,
                                          images_si, fn, merge, zero, *args)
            | "Merge" + name >> beam.CombineGlobally(_Merge(merge, zero)))
  sb = split_boundary
  rng = beam.pvalue.AsSingleton(fold("Range", sb.key_range, sb.merge_ranges,
                                     _no_range))
  goal = (fold("Coarse", sb.coarse_histogram, np.add, _no_bins, rng)
          | "Target" >> beam.Map(lambda c: sb.target(job.reader, c)))
  goal_si = beam.pvalue.AsSingleton(goal)
  return (fold("Fine", _fine, sb.merge_histograms, _no_hist, rng, goal_si)
          | "Boundary" >> beam.Map(
              lambda f, g: sb.boundary(job.reader, g, f), goal_si))


def _summarize(block, job: Job, starts, images, split_at) -> Iterator[
    byod_log.Summary]:
  """Pass 1 of one block: its Summary."""
  out = byod_log.Summary.empty(len(job.reader.extras), len(job.items.ids))
  for chunk in job.reader.block_chunks(block, starts[block.index]):
    out.merge(byod_log.summarize(job.reader, chunk, images["good"],
                                 job.num_behaviors, split_at))
  yield out


def _merge_summaries(a: byod_log.Summary, b: byod_log.Summary
                     ) -> byod_log.Summary:
  return a.merge(b)


def _plan(summary, job: Job, images, split_at) -> byod_log.Plan:
  return byod_log.plan(job.reader, summary, images["good"], split_at,
                       job.min_count, job.hash_buckets)


def build(p: beam.Pipeline, job: Job) -> None:
  """Adds the prepare pipeline to `p`; outputs land in job.out."""
  num_items = len(job.items.ids)
  images = (p | "ImageShards" >> beam.Create(range(job.image_shards))
            | "Images" >> beam.FlatMap(_images, job)
            | "AllImages" >> beam.combiners.ToList()
            | "MergeImages" >> beam.Map(_merge_images, num_items))
  blocks = p | "Blocks" >> beam.Create(job.blocks)
  counts = (blocks
            | "Count" >> beam.Map(lambda b: (b.index, job.reader.table.count(b)))
            | "Counts" >> beam.combiners.ToDict())
  starts = counts | "Offsets" >> beam.Map(_offsets)
  shards = counts | "NumShards" >> beam.Map(
      lambda c: beam_shuffle.num_shards(sum(c.values()), job.num_shards))
  starts_si = beam.pvalue.AsSingleton(starts)
  images_si = beam.pvalue.AsSingleton(images)
  if job.reader.mode == "time":
    split_at = _time_boundary(blocks, job, starts_si, images_si)
  else:
    split_at = p | "Boundary" >> beam.Create(
        [split_boundary.boundary(job.reader)])
  split_si = beam.pvalue.AsSingleton(split_at)
  plan = (blocks
          | "Summarize" >> beam.FlatMap(_summarize, job, starts_si, images_si,
                                        split_si)
          | "Merge" >> beam.CombineGlobally(_Merge(
              _merge_summaries, functools.partial(
                  byod_log.Summary.empty, len(job.reader.extras), num_items)))
          | "Plan" >> beam.Map(_plan, job, images_si, split_si))
  written = (blocks
             | "Emit" >> beam.FlatMap(beam_shuffle.emit, job, starts_si,
                                      beam.pvalue.AsSingleton(plan),
                                      beam.pvalue.AsSingleton(shards))
             | "ByShard" >> beam.GroupByKey()
             | "Write" >> beam.FlatMap(beam_shuffle.write_groups, job)
             | "Written" >> beam.combiners.ToList())
  (plan | "Finish" >> beam.Map(
      _write_summary, job, beam.pvalue.AsSingleton(written), images_si))


def _write_summary(plan, job: Job, written, images) -> None:
  """What the launcher needs to finish the directory, as one small file."""
  storage.write_bytes(storage.join(job.out, SUMMARY_FILE), pickle.dumps(
      {"plan": plan, "written": written, "images": images}))


def prepare(config: Any, beam_args: list[str]) -> str:
  """Runs the pipeline on config's BYOD data; returns the dataset path.

  Args:
    config: the experiment config (dataset byod or amazon); optional
      config.beam.num_shards (group shards per split) and image_shards.
      config.data_dir may be a URL (gs://...): see the module docstring.
    beam_args: Beam pipeline options, e.g. ['--runner=DirectRunner'].

  Returns:
    The prepared dataset's directory or URL: the cache path training reads.
  """
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  from csctr.data import pipeline  # pylint: disable=g-import-not-at-top
  if config.dataset not in ("byod", "amazon"):
    raise ValueError(f"the Beam path prepares BYOD logs (dataset byod or "
                     f"amazon), not {config.dataset!r}: use --runner=inprocess")
  key = registry.dataset_key(config)
  path = prepared.cache_path(pipeline.data_root(config), key)
  if prepared.is_prepared(path):
    return path
  start = time.time()
  # The launcher's small files; the workers' shards go to `out`.
  tmp = prepared.make_tmp(prepared.mirror_path(path))
  out = (f"{path}.staging-{uuid.uuid4().hex[:12]}"
         if storage.is_remote(path) else tmp)
  try:
    job = Job(config, tmp, out)
    os.makedirs(os.path.join(tmp, prepared.GROUPS_DIR))
    options = pipeline_options.PipelineOptions(beam_args)
    with beam.Pipeline(options=options) as p:
      build(p, job)
    summary = pickle.loads(storage.read_bytes(storage.join(out,
                                                           SUMMARY_FILE)))
    storage.remove(storage.join(out, SUMMARY_FILE))
    _finish(job, summary, path, key, start)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    if out != tmp:
      storage.remove(out)
  return path


def _move(job: Job, path: str, rel: str, new_rel: str) -> None:
  """Moves a worker's file to its final name: a rename in job.tmp, or a
  server-side copy from the staging URL to the dataset's (then committed
  by prepare.finish; the staging URL is deleted as a whole)."""
  if storage.is_remote(job.out):
    storage.as_path(storage.join(job.out, rel)).copy(
        storage.as_path(storage.join(path, new_rel)))
  else:
    os.rename(os.path.join(job.tmp, rel), os.path.join(job.tmp, new_rel))


def _finish(job: Job, summary: dict[str, Any], path: str,
            key: dict[str, Any], start: float) -> None:
  """Names the shards as TFDS does; writes info.json and vocab/; commits."""
  plan, images = summary["plan"], summary["images"]
  splits = {}
  for split in prepared.SPLITS:
    parts = sorted((w for w in summary["written"] if w["split"] == split),
                   key=lambda w: w["shard"])
    for i, w in enumerate(parts):
      _move(job, path, beam_shuffle.part_rel(split, w["shard"]),
            prepared.shard_name("", split, i, len(parts)))
    splits[split] = prepare_lib.split_counts(parts, job.group_size)
  for shard in range(job.image_shards if storage.is_remote(job.out) else 0):
    _move(job, path, _store_rel(job, shard), _store_rel(job, shard))
  shutil.rmtree(os.path.join(job.tmp, beam_shuffle.SPILL_DIR),
                ignore_errors=True)  # emptied by the writers
  fields = byod.source_fields(job.reader, plan, job.num_behaviors)
  np.save(os.path.join(job.tmp, prepared.CATEGORY_FILE),
          fields.pop("item_category"))
  missing = images["skipped_images_missing"]
  corrupt = images["skipped_images_corrupt"]
  n = len(job.items.ids)
  stats = {"items": n, "skipped_images": missing + corrupt,
           "skipped_images_missing": missing,
           "skipped_images_corrupt": corrupt, **plan.stats}
  info = batch_lib.DataInfo(
      image_size=job.size, bayes_auc=None, **fields, extras={
          "dataset": job.name, "group_size": job.group_size,
          # As the in-process prepare without auto batching or validation.
          "train_items_impressions": None, "bayes_auc_cold": None,
          "source_stats": stats, "config": key,
          "prepared_by": "beam", "num_items": n,
          "items_without_image": int(n - images["good"].sum()),
          "image_storage": job.storage, "image_shards": job.image_shards,
          "image_resize": job.resize, "image_bytes": images["image_bytes"]})
  prepare_lib.finish(job.tmp, path, info, job.group_features(), splits,
                     plan.vocabs, start)
  logging.info("prepared %s on Beam in %.1fs: %s", path, time.time() - start,
               splits)


def _store_rel(job: Job, shard: int) -> str:
  return image_store.store_paths("", job.image_shards)[shard]
