"""The dataset registry: config.dataset -> how to build it and what keys it.

The one place that knows dataset names. Each entry says how to turn the
experiment config into a `Source` (csctr/data/source.py) and which config
inputs decide the prepared dataset, i.e. its cache key: prepare writes one
directory per key (csctr/data/prepared.py), so a changed input gets a new
directory instead of a stale cache hit. Batching fields (groups_per_batch,
unique_images, ...) are in no key: one prepared dataset serves every batch
shape.

A new dataset is one `register(Dataset(...))` here plus its config section;
the pipeline, prepare, training and the benchmarks find it by name.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable

import ml_collections

from csctr import storage
from csctr.data import source as source_lib

Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One registered dataset.

  Attributes:
    name: the value of config.dataset.
    module: the module (under csctr.data) whose make_source(config) builds
      the Source; imported only when used, so a registry lookup costs nothing.
    key_inputs: config -> the dataset's own cache-key inputs (a JSON-able
      dict), beside the ones every dataset shares (see `dataset_key`).
    cheap_source: make_source reads no data (a generator that knows its
      vocabularies up front), so a DataInfo is available without preparing.
  """

  name: str
  module: str
  key_inputs: Callable[[Config], dict[str, Any]]
  cheap_source: bool = False

  def make_source(self, config: Config) -> source_lib.Source:
    module = importlib.import_module(f"csctr.data.{self.module}")
    return module.make_source(config)


_REGISTRY: dict[str, Dataset] = {}


def register(dataset: Dataset) -> Dataset:
  if dataset.name in _REGISTRY:
    raise ValueError(f"dataset {dataset.name!r} registered twice")
  _REGISTRY[dataset.name] = dataset
  return dataset


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Dataset:
  """The registered dataset `name`; ValueError listing the known ones."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown dataset {name!r}: "
                     f"{' | '.join(_REGISTRY)}") from None


def dataset_key(config: Config) -> dict[str, Any]:
  """The config that determines config.dataset's prepared dataset."""
  dataset = get(config.dataset)
  d = config.data
  auto = d.batching == "auto"
  key = {"dataset": dataset.name, "image_size": d.image_size,
         "group_size": "auto" if auto else d.group_size,
         "num_behaviors": d.num_behaviors,
         "image_storage": d.image_storage,
         "vocab": {"min_count": d.min_count, "hash_buckets": d.hash_buckets},
         **dataset.key_inputs(config)}
  # Only when set, so the keys (and caches) of older configs do not change.
  if auto:
    key["target_packing"] = d.target_packing
    key["max_group_size"] = d.max_group_size
  if d.validation_fraction:
    key["validation_fraction"] = d.validation_fraction
  return key


def make_source(config: Config) -> source_lib.Source:
  """The Source of config.dataset (a BYOD directory may be a URL)."""
  dataset = get(config.dataset)
  if dataset.module == "byod" and storage.is_remote(config.byod_path):
    config = _with_local_byod(config)
  return dataset.make_source(config)


def _with_local_byod(config: Config) -> Config:
  """config with byod_path a local copy of the URL it names.

  The reader opens CSVs and image files by path. The copy is keyed by the
  dataset key (which holds the CSVs' sizes and times), so an edited bucket
  gets a fresh copy, not a stale one.
  """
  from csctr.data import byod  # pylint: disable=g-import-not-at-top
  from csctr.data import prepared  # pylint: disable=g-import-not-at-top
  digest = prepared.cache_path("", dataset_key(config)).rsplit("-", 1)[-1]
  # The items file (items.csv, else items.parquet) is the commit file: a
  # directory is whole once the uploader wrote it.
  items = next((f for f in byod.ITEMS_FILES
                if storage.exists(storage.join(config.byod_path, f))),
               byod.ITEMS_FILE)
  local = storage.local_mirror(
      config.byod_path, items,
      root=os.path.join(storage.cache_root(), f"byod-{digest}"))
  config = config.copy_and_resolve_references()
  config.byod_path = local
  return config


def _section(name: str) -> Callable[[Config], dict[str, Any]]:
  """Key inputs = the dataset's whole config section."""
  return lambda config: {name: config[name].to_dict()}


def _byod_key(config: Config) -> dict[str, Any]:
  """The directory, its config section, and the size and mtime of
  items.csv, the impression files and every image (byod.file_stamps)."""
  from csctr.data import byod  # pylint: disable=g-import-not-at-top
  if not config.byod_path:
    raise ValueError(f"dataset={config.dataset!r} needs config.byod_path")
  root = storage.normalize(config.byod_path)  # a local path or a URL
  # Edits to the logs or images make a new dataset, not a stale cache hit.
  # In a bucket: the CSVs' size and time (listing every image is costly).
  files = ({f: storage.stamp(storage.join(root, f))
            for f in (*byod.ITEMS_FILES, *byod.IMPRESSIONS_FILES)}
           if storage.is_remote(root) else byod.file_stamps(config))
  return {"byod_path": root, "byod": config.byod.to_dict(), "files": files}


register(Dataset("synthetic", "synthetic", _section("synthetic"),
                 cheap_source=True))
register(Dataset("sparse", "sparse_log", _section("sparse"),
                 cheap_source=True))
register(Dataset("fashion_mnist", "fashion_mnist", _section("fashion_mnist")))
register(Dataset("byod", "byod", _byod_key))
# The Amazon protocol reads a BYOD directory that data/amazon/convert.py wrote.
register(Dataset("amazon", "byod", _byod_key))
