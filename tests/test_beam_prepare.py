"""The Beam prepare path (local DirectRunner) against the in-process path.

Both read the same BYOD directory (tests/test_byod.py's six items and ten
impressions), as CSV or as Parquet, and must produce the same multiset of
group records, the same vocabularies and the same images.
"""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gcs_emulator
from csctr import storage
from csctr.data import beam_prepare
from csctr.data import byod
from csctr.data import image_store
from csctr.data import pipeline
from csctr.data import prepared
from csctr.data import registry
from csctr.data import split_boundary
from csctr.data import vocab
from tests import test_byod

BEAM = ["--runner=DirectRunner"]
ROOT = pathlib.Path(__file__).resolve().parents[1]
# info.json extras that say how, not what, was prepared.
HOW = ("prepared_by", "prepare_seconds", "image_shards", "image_resize",
       "image_bytes")


def write_parquet(root: pathlib.Path, rows=test_byod.IMPRESSIONS,
                  files=1, row_group=3) -> None:
  """impressions.csv's rows as typed Parquet (int label and timestamp)."""
  cols = list(zip(*rows))
  table = pa.table({
      "user_id": list(cols[0]), "item_id": list(cols[1]),
      "label": pa.array([int(x) for x in cols[2]], pa.int8()),
      "timestamp": pa.array([int(x) for x in cols[3]], pa.int64()),
      "device": [x or None for x in cols[4]],  # null -> '' as in the CSV
      "behavior": list(cols[5])})
  os.remove(root / "impressions.csv")
  if files == 1:
    pq.write_table(table, root / "impressions.parquet",
                   row_group_size=row_group)
    return
  (root / "impressions").mkdir()
  per = -(-len(rows) // files)
  for i in range(files):
    pq.write_table(table.slice(i * per, per),
                   root / "impressions" / f"part-{i}.parquet",
                   row_group_size=row_group)


def write_items_parquet(root: pathlib.Path, corrupt: str = "") -> None:
  """items.csv as items.parquet holding the image files' bytes (in two row
  groups); the CSV and the image files are removed."""
  with open(root / "items.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  blobs = [(root / r["image"]).read_bytes() for r in rows]
  blobs = [b[:len(b) // 2] if r["item_id"] == corrupt else b
           for r, b in zip(rows, blobs)]
  pq.write_table(pa.table({
      "item_id": [r["item_id"] for r in rows],
      "category_id": [r["category_id"] for r in rows],
      "image": pa.array(blobs, pa.binary())}), root / "items.parquet",
                 row_group_size=4)
  os.remove(root / "items.csv")
  shutil.rmtree(root / "img")


def config_for(root, data_dir, **byod_options):
  config = test_byod.make_config(root, **byod_options)
  config.data.group_size = 2
  config.data_dir = str(data_dir)
  config.beam.update(num_shards=3, image_shards=2)
  return config


def records(path):
  """Every group record of both splits as a sortable tuple."""
  out = []
  for split in prepared.SPLITS:
    source = pipeline.groups_source(path, split)
    for i in range(len(source)):
      rec = source[i]
      out.append((split, *((k, np.asarray(v).tolist())
                           for k, v in sorted(rec.items()))))
  return sorted(out, key=repr)


def what(path):
  """info.json without the fields that say how it was prepared."""
  with open(os.path.join(path, prepared.INFO_FILE)) as f:
    info = json.load(f)
  for k in HOW + ("config",):
    info["extras"].pop(k, None)
  for split in info.pop("splits").values():
    split.pop("shard_lengths")
  return info


def assert_same_dataset(a, b):
  assert records(a) == records(b)
  assert what(a) == what(b)
  for s in prepared.SPLITS:
    ca, cb = (prepared.load_info(p).splits[s] for p in (a, b))
    assert sum(cb.shard_lengths) == ca.groups == sum(ca.shard_lengths)
  va, vb = vocab.load_vocabularies(a), vocab.load_vocabularies(b)
  assert sorted(va) == ["category_id", "device", "item_id", "user_id"]
  for name in va:
    assert va[name].ids == vb[name].ids
    np.testing.assert_array_equal(va[name].counts, vb[name].counts)
  ia, ib = (image_store.open_images(p, prepared.load_info(p)) for p in (a, b))
  np.testing.assert_array_equal(ia[np.arange(6)], ib[np.arange(6)])
  np.testing.assert_array_equal(
      np.load(os.path.join(a, prepared.CATEGORY_FILE)),
      np.load(os.path.join(b, prepared.CATEGORY_FILE)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The in-process dataset of the CSV directory."""
  root = test_byod.make_dataset(tmp_path_factory.mktemp("csv"))
  return pipeline.prepare_dataset(
      config_for(root, tmp_path_factory.mktemp("inprocess")))


def test_beam_on_csv_equals_inprocess(reference, tmp_path):
  root = test_byod.make_dataset(tmp_path / "csv")
  path = beam_prepare.prepare(config_for(root, tmp_path / "beam"), BEAM)
  assert prepared.is_prepared(path)
  assert len(prepared.shard_paths(path, "train")) > 1  # really sharded
  assert_same_dataset(reference, path)
  # The same cache key as training's: a later prepare_dataset finds it.
  assert pipeline.prepare_dataset(config_for(root, tmp_path / "beam")) == path
  assert os.listdir(tmp_path / "beam") == [os.path.basename(path)]


def test_beam_on_parquet_equals_inprocess_on_csv(reference, tmp_path):
  root = test_byod.make_dataset(tmp_path / "pq")
  write_parquet(root)
  config = config_for(root, tmp_path / "beam")
  assert_same_dataset(reference, beam_prepare.prepare(config, BEAM))
  # The in-process path reads the same Parquet file.
  config.data_dir = str(tmp_path / "inprocess")
  assert_same_dataset(reference, pipeline.prepare_dataset(config))


@pytest.mark.parametrize("runner", ["inprocess", "beam"])
def test_image_bytes_in_parquet_equal_the_same_images_as_files(
    reference, tmp_path, runner):
  root = test_byod.make_dataset(tmp_path / "pq")
  write_items_parquet(root)
  config = config_for(root, tmp_path / "out")
  path = (beam_prepare.prepare(config, BEAM) if runner == "beam"
          else pipeline.prepare_dataset(config))
  assert_same_dataset(reference, path)


def test_bad_image_bytes_name_the_parquet_row(tmp_path):
  root = test_byod.make_dataset(tmp_path / "pq")
  write_items_parquet(root, corrupt="c")  # truncated PNG on row 3
  with pytest.raises(byod.DataError,
                     match=r"items.parquet, row 3, field 'image'"):
    byod.make_source(test_byod.make_config(root, skip_bad_images=False))
  stats = byod.make_source(test_byod.make_config(root)).stats
  assert (stats["skipped_images_corrupt"], stats["dropped_impressions"]) == (
      1, 3)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_time_boundary_in_bounded_passes_is_the_exact_quantile(tmp_path,
                                                               fmt):
  """byod_log's range / coarse / fine passes == sorting every timestamp."""
  rng = np.random.default_rng(0)
  n = 5000
  # Heavy ties, plus far outliers that put most rows in one coarse bin.
  t = np.concatenate([rng.integers(0, 50, n - 2), [10**12, -10**9]])
  rng.shuffle(t)
  root = test_byod.make_dataset(tmp_path / "ds")
  items = np.array(list("abcdef"))[rng.integers(0, 6, n)]
  table = pa.table({"user_id": ["u"] * n, "item_id": items,
                    "label": pa.array(rng.integers(0, 2, n), pa.int8()),
                    "timestamp": pa.array(t, pa.int64())})
  os.remove(root / "impressions.csv")
  if fmt == "parquet":
    pq.write_table(table, root / "impressions.parquet", row_group_size=999)
  else:
    import pyarrow.csv as pa_csv  # pylint: disable=g-import-not-at-top
    pa_csv.write_csv(table, root / "impressions.csv")
  for fraction in (0.2, 0.5, 0.0001):
    _, _, reader = byod.open_dataset(test_byod.make_config(
        root, test_fraction=fraction))
    good = np.ones(6, bool)
    good[2] = False  # rows of item c do not count
    usable = np.sort(t[items != "c"])
    want = usable[int(len(usable) * (1 - fraction))]
    assert split_boundary.time_boundary(reader, good) == want


def test_group_serializer_writes_the_protos_tfds_writes():
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
  from csctr.data import prepare as prepare_lib  # pylint: disable=g-import-not-at-top
  features = prepare_lib.group_features(4, 2, 3)
  serialize = prepare_lib.group_serializer(features)
  rng = np.random.default_rng(0)
  for n in (1, 2, 25):
    group = {"item": np.int32(7), "label": rng.integers(0, 2, n).astype(
        np.float32), "user_id": rng.integers(0, 9, n).astype(np.int32),
             "impression_id": rng.integers(0, 2**31 - 1, n).astype(np.int32),
             "is_cold": rng.random(n) < 0.5,
             "sparse": rng.integers(0, 99, (n, 4)).astype(np.int32),
             "dense": rng.normal(size=(n, 2)).astype(np.float32),
             "behavior": rng.integers(-1, 5, (n, 3)).astype(np.int32)}
    a, b = tf_example_pb2.Example(), tf_example_pb2.Example()
    a.ParseFromString(features.serialize_example(group))
    b.ParseFromString(serialize(group))
    assert a == b and len(b.features.feature) == 8


@pytest.fixture
def gcs(monkeypatch, tmp_path):
  """csctr.storage pointed at a real GCS emulator on 127.0.0.1."""
  with gcs_emulator.running() as url:
    monkeypatch.setenv(storage.EMULATOR_ENV, url)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "mirror"))
    storage.configure()
    yield f"gs://{gcs_emulator.BUCKET}"


def test_beam_writes_a_committed_dataset_to_gs_that_training_reads(
    reference, gcs, tmp_path):
  root = test_byod.make_dataset(tmp_path / "csv")
  config = config_for(root, gcs + "/data")
  path = beam_prepare.prepare(config, BEAM)
  assert path.startswith(gcs + "/data/") and prepared.is_prepared(path)
  # Only the committed dataset is left: no staging prefix, no local copy.
  assert storage.listdir(gcs + "/data") == [path.rsplit("/", 1)[1]]
  assert not os.path.exists(prepared.mirror_path(path))
  assert len(storage.listdir(path + "/groups")) > 3  # TFDS metadata + shards
  # Training's lookup finds it (same cache key), and reads the same data.
  assert pipeline.prepare_dataset(config, wait=True) == path
  assert_same_dataset(reference, prepared.local_copy(path))


def test_inprocess_reads_a_folder_of_parquet_files(reference, tmp_path):
  root = test_byod.make_dataset(tmp_path / "pq")
  write_parquet(root, files=3, row_group=2)  # row ids run across files
  assert_same_dataset(reference,
                      pipeline.prepare_dataset(config_for(root, tmp_path)))


@pytest.mark.parametrize("storage", ["png", "original"])
def test_encoded_images_decode_to_the_raw_pixels(reference, tmp_path,
                                                 storage):
  root = test_byod.make_dataset(tmp_path / "csv")
  config = config_for(root, tmp_path / "out")
  config.data.image_storage = storage
  path = (beam_prepare.prepare(config, BEAM) if storage == "original"
          else pipeline.prepare_dataset(config))
  assert not os.path.exists(os.path.join(path, prepared.IMAGES_FILE))
  assert records(path) == records(reference)
  raw = image_store.open_images(reference, prepared.load_info(reference))
  table = image_store.open_images(path, prepared.load_info(path))
  np.testing.assert_array_equal(table[np.arange(6)], raw[np.arange(6)])
  # The Grain collator decodes them: same batch as from the raw table.
  a, b = (collate_all(p, "train") for p in (path, reference))
  np.testing.assert_array_equal(a["images"], b["images"])
  np.testing.assert_array_equal(a["ad_image"], b["ad_image"])


def collate_all(path, split):
  """One batch of every group of the split, in impression-id order."""
  source = pipeline.groups_source(path, split)
  groups = sorted((source[i] for i in range(len(source))),
                  key=lambda g: int(g["impression_id"][0]))
  k = prepared.load_info(path).extras["group_size"]
  collate = pipeline.Collator(path, prepared.load_info(path), len(groups), k,
                              len(groups) * (1 + k * 3))
  return collate(groups)


def test_bad_parquet_row_fails_naming_file_and_row(tmp_path):
  rows = list(test_byod.IMPRESSIONS)
  rows[4] = ("u3", "a", "2", "4", "", "")
  root = test_byod.make_dataset(tmp_path / "pq")
  write_parquet(root, rows)
  config = config_for(root, tmp_path / "out")
  where = r"impressions.parquet, row 5, field 'label': label '2'"
  with pytest.raises(byod.DataError, match=where):
    pipeline.prepare_dataset(config)
  # Beam's runner re-raises a worker's DataError as a RuntimeError.
  with pytest.raises(RuntimeError, match="DataError: .*" + where):
    beam_prepare.prepare(config, BEAM)
  assert os.listdir(tmp_path / "out") == []  # no dataset, no tmp debris


def test_a_killed_prepares_tmp_dir_is_removed(tmp_path):
  # A prepare killed with SIGKILL leaves its .tmp- dir behind.
  code = ("import sys, time; from csctr.data import prepared; "
          "print(prepared.make_tmp(sys.argv[1]), flush=True); time.sleep(60)")
  child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ds")],
                           stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
  killed = child.stdout.readline().strip()
  running = prepared.make_tmp(str(tmp_path / "ds"))  # owner alive: kept
  assert sorted(os.listdir(tmp_path)) == sorted(
      os.path.basename(p) for p in (killed, running))
  child.kill()
  child.wait()
  assert prepared.remove_stale_tmp(str(tmp_path)) == [killed]
  assert os.listdir(tmp_path) == [os.path.basename(running)]  # ours: alive


def test_symlink_out_of_the_directory_is_refused(tmp_path):
  root = test_byod.make_dataset(tmp_path / "ds")
  outside = tmp_path / "secret.png"
  os.replace(root / "img" / "d.png", outside)
  os.symlink(outside, root / "img" / "d.png")
  with pytest.raises(byod.DataError, match=r"line 5, field 'image'.*link"):
    byod.make_source(test_byod.make_config(root))
  allowed = test_byod.make_config(root, allow_external_links=True)
  assert byod.make_source(allowed).stats["skipped_images"] == 0


def test_cache_key_covers_image_files(tmp_path):
  root = test_byod.make_dataset(tmp_path)
  config = config_for(root, tmp_path)
  key = registry.dataset_key(config)
  (root / "img" / "b.jpg").write_bytes(test_byod._jpeg_bytes(seed=1))
  assert registry.dataset_key(config) != key


@pytest.mark.slow
def test_raw_ids_through_saved_vocabularies_score_as_the_trainers_eval(
    tmp_path):
  """Beam-prepared data -> training (unchanged) -> scorer fed raw ids."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from csctr import rundir  # pylint: disable=g-import-not-at-top
  from csctr import serving  # pylint: disable=g-import-not-at-top
  from csctr.serving import export  # pylint: disable=g-import-not-at-top
  from csctr.training import loop  # pylint: disable=g-import-not-at-top
  from csctr.training import steps  # pylint: disable=g-import-not-at-top
  root = test_byod.make_dataset(tmp_path / "shop")
  config = tiny.get_config()
  config.dataset, config.byod_path = "byod", str(root)
  config.data_dir = str(tmp_path / "data")
  config.data.update(image_size=8, num_behaviors=0, group_size=2,
                     groups_per_batch=2, unique_images=2,
                     eval_groups_per_batch=4, eval_unique_images=4)
  config.beam.update(num_shards=2, image_shards=2)
  config.num_train_steps, config.eval_every, config.checkpoint_every = 4, 0, 0
  data_path = beam_prepare.prepare(config, BEAM)
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(config, workdir)  # finds the Beam dataset
  assert rundir.load_run_files(workdir)[2] == data_path
  export.export(workdir, progress=False)
  scorer = serving.Scorer.from_workdir(workdir)
  vocabs = rundir.load_vocabularies(workdir)  # copied into the run
  model, config, _, _ = rundir.restore_model(workdir)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  eval_step = jax.jit(steps.make_eval_step(graphdef))
  items = {r[0]: (i, r[1]) for i, r in enumerate(
      [("a", "shoes"), ("b", "shoes"), ("c", "hats"), ("d", "bags"),
       ("e", "hats"), ("f", "")])}
  compared = 0
  for batch in pipeline.eval_batches(config, data_path):
    logits = np.asarray(eval_step({"params": params, "rest": rest},
                                  batch)["logits"])
    for slot in np.flatnonzero(batch["weight"] > 0):
      user, item, _, _, device, _ = test_byod.IMPRESSIONS[
          batch["impression_id"][slot]]
      row, category = items[item]
      request = {"user": {"user_id": int(vocabs["user_id"].row(user))},
                 "candidates": {
                     "image_id": np.array([row]),
                     "item_id": vocabs["item_id"].lookup([item]),
                     "category_id": vocabs["category_id"].lookup([category])
                                    if category else np.zeros(1, np.int32),
                     "device": vocabs["device"].lookup([device])
                               if device else np.zeros(1, np.int32)}}
      result = scorer.score(request)
      np.testing.assert_allclose(result.logits, logits[[slot]], atol=1e-5)
      compared += 1
  assert compared == 2  # the test split: rows 3 and 8
