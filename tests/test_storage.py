"""csctr.storage against a real GCS emulator process on 127.0.0.1."""

import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

import gcs_emulator

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = gcs_emulator.BUCKET


@pytest.fixture(scope="module")
def emulator():
  with gcs_emulator.running() as url:
    yield url


@pytest.fixture
def storage(emulator, monkeypatch):
  """csctr.storage configured for the emulator from STORAGE_EMULATOR_HOST."""
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
  from csctr import storage as storage_lib  # pylint: disable=g-import-not-at-top
  storage_lib.configure()
  return storage_lib


def _dataset_dir(path: pathlib.Path) -> pathlib.Path:
  (path / "groups").mkdir(parents=True)
  np.save(path / "images.npy", np.arange(24, dtype=np.uint8).reshape(2, 2, 2, 3))
  (path / "groups" / "shard").write_bytes(b"\x00\x01records")
  (path / "info.json").write_text('{"done": true}')
  return path


@pytest.mark.parametrize("remote", [True, False])
def test_whole_file_writes_round_trip(storage, tmp_path, remote):
  base = f"gs://{BUCKET}/files" if remote else str(tmp_path / "files")
  path = storage.join(base, "run", "config.json")
  storage.write_json(path, {"a": [1, 2]})
  storage.write_json(path, {"a": [3]})  # overwritten whole
  assert storage.read_json(path) == {"a": [3]}
  assert storage.listdir(storage.join(base, "run")) == ["config.json"]
  assert not storage.exists(storage.join(base, "run", "nothing"))


def test_upload_then_mirror_reads_the_same_files(storage, tmp_path,
                                                 monkeypatch):
  local = _dataset_dir(tmp_path / "ds")
  url = f"gs://{BUCKET}/data/ds-1"
  assert not storage.is_committed(url, "info.json")
  storage.upload_dir(str(local), url, "info.json")
  assert storage.is_committed(url, "info.json")
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  mirror = storage.local_mirror(url, "info.json")
  assert mirror.startswith(str(tmp_path / "cache"))
  for rel in ("images.npy", "groups/shard", "info.json"):
    assert (pathlib.Path(mirror) / rel).read_bytes() == (local / rel).read_bytes()
  np.testing.assert_array_equal(np.load(os.path.join(mirror, "images.npy"),
                                        mmap_mode="r"),
                                np.load(local / "images.npy"))
  # Made once per machine: while the commit file is unchanged, a second
  # call reuses the mirror (a changed data file is not downloaded again)...
  storage.write_bytes(storage.join(url, "groups", "shard"), b"changed")
  assert storage.local_mirror(url + "/", "info.json") == mirror
  assert (pathlib.Path(mirror) / "groups" / "shard").read_bytes() == (
      local / "groups" / "shard").read_bytes()
  # ...and a directory committed again at the same URL is mirrored again.
  storage.write_text(storage.join(url, "info.json"), '{"done": 2}')
  assert storage.local_mirror(url, "info.json") == mirror
  assert (pathlib.Path(mirror) / "groups" / "shard").read_bytes() == b"changed"
  assert (pathlib.Path(mirror) / "info.json").read_text() == '{"done": 2}'


def test_an_interrupted_upload_is_never_read(storage, tmp_path, monkeypatch):
  local = _dataset_dir(tmp_path / "ds")
  (local / "groups" / "unreadable").symlink_to(tmp_path / "missing")
  url = f"gs://{BUCKET}/data/ds-broken"
  with pytest.raises(FileNotFoundError):
    storage.upload_dir(str(local), url, "info.json")
  assert storage.exists(storage.join(url, "images.npy"))  # partly there ...
  assert not storage.is_committed(url, "info.json")  # ... but not committed
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  with pytest.raises(FileNotFoundError, match="not committed"):
    storage.local_mirror(url, "info.json")
  with pytest.raises(TimeoutError, match="did not appear"):
    storage.wait_for(url, "info.json", timeout_s=0.3, poll_s=0.1)


def test_wait_for_returns_once_another_writer_commits(storage, tmp_path):
  local = _dataset_dir(tmp_path / "ds")
  url = f"gs://{BUCKET}/data/ds-late"
  writer = threading.Timer(0.5, storage.upload_dir,
                           (str(local), url, "info.json"))
  writer.start()
  storage.wait_for(url, "info.json", timeout_s=30, poll_s=0.1)
  writer.join()
  assert storage.read_json(storage.join(url, "info.json")) == {"done": True}


_CLIENTS = r"""
import sys
import numpy as np
from csctr import storage  # configures every client from the one variable
from etils import epath
from google.cloud import storage as gcs
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

base = sys.argv[1]
epath.Path(base + "/note.txt").write_text("via gcsfs")
blob = gcs.Client().bucket(base[5:].split("/")[0]).blob(
    base[5:].split("/", 1)[1] + "/note.txt")
assert blob.download_as_text() == "via gcsfs"
tree = {"w": np.arange(6.0).reshape(2, 3)}
with ocp.CheckpointManager(epath.Path(base + "/ckpt")) as mgr:
  mgr.save(3, args=ocp.args.StandardSave(tree))
  mgr.wait_until_finished()
with ocp.CheckpointManager(epath.Path(base + "/ckpt")) as mgr:
  restored_step = mgr.latest_step()
  restored = mgr.restore(restored_step, args=ocp.args.StandardRestore(tree))
np.testing.assert_array_equal(restored["w"], tree["w"])
with SummaryWriter(base + "/tb") as w:
  w.add_scalar("x", 1.5, 7)
(event,) = [p for p in epath.Path(base + "/tb").iterdir()]
assert event.name.startswith("events.out.tfevents"), event
print("OK", restored_step, len(event.read_bytes()))
"""


def test_one_variable_configures_every_client(emulator):
  """gcsfs, google-cloud-storage, Orbax/tensorstore, tensorboardX: all reach it."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("GCSFS_", "TENSORSTORE_", "GCE_"))}
  env.update(STORAGE_EMULATOR_HOST=emulator, JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, "-c", _CLIENTS, f"gs://{BUCKET}/clients"], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[:2] == ["OK", "3"]


@pytest.mark.parametrize("items_file", ["items.csv", "items.parquet"])
def test_a_byod_directory_in_a_bucket_reads_as_on_disk(storage, tmp_path,
                                                        monkeypatch,
                                                        items_file):
  from csctr.data import registry  # pylint: disable=g-import-not-at-top
  from test_byod import collect, make_config, make_dataset  # pylint: disable=g-import-not-at-top
  local = make_dataset(tmp_path / "byod")
  if items_file == "items.parquet":  # image bytes inside, no items.csv
    from test_beam_prepare import write_items_parquet  # pylint: disable=g-import-not-at-top
    write_items_parquet(local)
  url = f"gs://{BUCKET}/byod-{items_file}"
  storage.upload_dir(str(local), url, items_file)
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
  sources = []
  for path in (str(local), url):
    config = make_config(path)
    config.data.group_size = 4
    sources.append(registry.make_source(config))
  on_disk, in_bucket = sources
  assert in_bucket.num_items == on_disk.num_items == 6
  for split in ("train", "test"):
    a, b = collect(on_disk, split), collect(in_bucket, split)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  np.testing.assert_array_equal(
      np.concatenate([x for _, x in in_bucket.item_images()]),
      np.concatenate([x for _, x in on_disk.item_images()]))
  assert (tmp_path / "cache").is_dir()  # read from a local copy


def test_one_process_prepares_into_the_bucket_the_others_wait(
    storage, tmp_path, monkeypatch):
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from csctr.data import pipeline  # pylint: disable=g-import-not-at-top
  from csctr.data import prepared  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data_dir = f"gs://{BUCKET}/prepared"
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "writer"))
  with futures.ThreadPoolExecutor(1) as pool:
    waiter = pool.submit(pipeline.prepare_dataset, config, True)
    path = pipeline.prepare_dataset(config)  # "process 0"
    assert waiter.result(timeout=300) == path  # returned once committed
  assert path.startswith(config.data_dir) and prepared.is_prepared(path)
  info = prepared.load_info(path)  # read from the bucket
  assert info.splits["test"].impressions == 600
  # Another machine reads it through its own mirror: the same files.
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "reader"))
  mine, theirs = (pathlib.Path(prepared.local_copy(path)),
                  pathlib.Path(prepared.mirror_path(path).replace(
                      str(tmp_path / "reader"), str(tmp_path / "writer"))))
  assert mine != theirs
  for rel in ("info.json", "images.npy", "item_category.npy"):
    assert (mine / rel).read_bytes() == (theirs / rel).read_bytes()
  assert pipeline.prepare_dataset(config) == path  # cached: nothing redone
