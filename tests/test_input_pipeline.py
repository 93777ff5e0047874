"""Tests for the Grain pipeline (csctr.data.pipeline): shapes, coverage, state."""

import json
import os
import pathlib
import subprocess
import sys

from etils import epath
import grain
import numpy as np
import pytest

from csctr.data import batch as batch_lib
from csctr.data import pipeline
from csctr.data import prepared
from csctr.data import synthetic
from tests.test_synthetic import tiny_config

K = 5
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
  config = tiny_config(tmp_path_factory.mktemp("data"), num_behaviors=3)
  config.data.groups_per_batch, config.data.unique_images = 4, 8
  # Eval batches hold every behaviour image: a group of K=5 impressions with
  # L=3 references up to 16 images, per process.
  config.data.eval_groups_per_batch, config.data.eval_unique_images = 8, 32
  path = pipeline.prepare_dataset(config)
  source = synthetic.make_source(config)
  truth = {}
  for split in ("train", "test"):
    chunks = list(source.impressions(split))
    truth[split] = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  return config, path, pipeline.load_info(path), truth


def _groups_of(batches):
  """Impression ids of every group slot, in order (padding groups skipped)."""
  out = []
  for b in batches:
    for ids in b["impression_id"].reshape(-1, K):
      if ids[0] >= 0:
        out.append(ids[ids >= 0])
  return out


def _check_batch(b, info, g, u, truth, table):
  want = batch_lib.batch_shapes(info, g, K, u)
  assert set(b) == set(want)
  for key, (shape, dtype) in want.items():
    assert b[key].shape == shape and b[key].dtype == dtype, key
  real = b["weight"] > 0
  assert ((b["impression_id"] >= 0) == real).all()
  ids = b["impression_id"][real] - truth["impression_id"][0]  # contiguous
  np.testing.assert_array_equal(b["label"][real], truth["label"][ids])
  np.testing.assert_array_equal(b["sparse"][real], truth["sparse"][ids])
  np.testing.assert_array_equal(b["user_id"][real], truth["user_id"][ids])
  np.testing.assert_array_equal(b["is_cold"][real], truth["is_cold"][ids])
  # Every impression sees its own ad image, and its category.
  rows = b["ad_image"][real]
  assert b["image_mask"][rows].all()
  np.testing.assert_array_equal(b["images"][rows], table[truth["item"][ids]])
  np.testing.assert_array_equal(b["image_category"][rows], b["sparse"][real, 2])
  # Kept behaviour slots point at the right image; dropped ones are masked.
  beh, mask = truth["behavior"][ids], b["behavior_mask"][real]
  assert not (mask & (beh < 0)).any()
  picked = b["behavior_images"][real][mask]
  assert b["image_mask"][picked].all()
  np.testing.assert_array_equal(b["images"][picked], table[beh[mask]])
  assert not b["label"][~real].any() and not b["behavior_mask"][~real].any()


def test_train_epoch_has_every_impression_once_and_fixed_shapes(ds):
  config, path, info, truth = ds
  table = np.load(os.path.join(path, prepared.IMAGES_FILE))
  n_groups = len(pipeline.groups_source(path, "train"))
  it = pipeline.train_iterator(config, path)
  batches = [next(it) for _ in range(2 * n_groups // 4 + 2)]
  for b in batches:
    _check_batch(b, info, 4, 8, truth["train"], table)
  groups = _groups_of(batches)
  epochs = [np.concatenate(groups[e * n_groups:(e + 1) * n_groups])
            for e in range(2)]
  for ids in epochs:
    np.testing.assert_array_equal(np.sort(ids), truth["train"]["impression_id"])
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
  again = pipeline.train_iterator(config, path)
  np.testing.assert_array_equal(next(again)["impression_id"],
                                batches[0]["impression_id"])  # deterministic
  config.data.shuffle_seed = 1
  other = pipeline.train_iterator(config, path)
  assert not np.array_equal(next(other)["impression_id"],
                            batches[0]["impression_id"])
  config.data.shuffle_seed = 0


def test_eval_has_every_impression_once(ds):
  config, path, info, truth = ds
  table = np.load(os.path.join(path, prepared.IMAGES_FILE))
  batches = list(pipeline.eval_batches(config, path))
  for b in batches:
    _check_batch(b, info, 8, 32, truth["test"], table)
  ids = np.concatenate([b["impression_id"][b["weight"] > 0] for b in batches])
  np.testing.assert_array_equal(np.sort(ids), truth["test"]["impression_id"])
  assert batches[-1]["weight"].min() == 0  # padded last batch
  assert truth["test"]["is_cold"].any() and len(ids) == 400


def test_restored_iterator_yields_the_same_next_batches(ds, tmp_path):
  config, path, _, _ = ds
  it = pipeline.train_iterator(config, path)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as Orbax stores it
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=it)
  want = [next(it) for _ in range(3)]
  for restore in ("set_state", "orbax_handler"):
    fresh = pipeline.train_iterator(config, path)
    if restore == "set_state":
      fresh.set_state(state)
    else:
      fresh = handler.restore(epath.Path(tmp_path), item=fresh)
    for w in want:
      got = next(fresh)
      for key in w:
        np.testing.assert_array_equal(got[key], w[key], err_msg=key)


def test_process_blocks_are_slices_of_one_global_batch(ds):
  """Any split into blocks (any process count, any block order) gives back
  the global batch: global rows, the same order, the same iterator state."""
  config, path, info, truth = ds
  full_it = pipeline.train_iterator(config, path)
  full = [next(full_it) for _ in range(3)]
  full_eval = list(pipeline.eval_batches(config, path))
  for shards in (pipeline.Shards(2, (0,)), pipeline.Shards(2, (1,)),
                 pipeline.Shards(4, (1, 3)), pipeline.Shards(4, (0, 1, 2, 3))):
    d = config.data
    b_rows = shards.rows(d.groups_per_batch * K, "B")
    u_rows = shards.rows(d.unique_images, "U")
    it = pipeline.train_iterator(config, path, shards)
    for want in full:
      got = next(it)
      for key, value in got.items():
        rows = u_rows if key in pipeline.IMAGE_ROW_FIELDS else b_rows
        np.testing.assert_array_equal(value, want[key][rows], err_msg=key)
    assert it.get_state() == full_it.get_state()  # one global position
    got_eval = list(pipeline.eval_batches(config, path, "test", shards))
    assert len(got_eval) == len(full_eval)
    u_rows = shards.rows(d.eval_unique_images, "U")
    b_rows = shards.rows(d.eval_groups_per_batch * K, "B")
    for got, want in zip(got_eval, full_eval):
      np.testing.assert_array_equal(got["images"], want["images"][u_rows])
      np.testing.assert_array_equal(got["ad_image"], want["ad_image"][b_rows])
  with pytest.raises(ValueError, match="not divisible by the 3 devices"):
    pipeline.train_iterator(config, path, pipeline.Shards(3, (0,)))


def test_behavior_overflow_is_masked_and_counted(ds):
  config, path, info, truth = ds
  src = pipeline.groups_source(path, "train")
  groups = [src[i] for i in range(4)]
  tight = pipeline.Collator(path, info, 4, K, 4)  # no room but ads
  b = tight(groups)
  refs = np.concatenate([g["behavior"].reshape(-1) for g in groups])
  ads = np.unique([g["item"] for g in groups])
  valid = refs[refs >= 0]
  # Rows left after the ads go to the most referenced behaviour images.
  items, counts = np.unique(valid[~np.isin(valid, ads)], return_counts=True)
  top = items[np.lexsort((items, -counts))][:4 - len(ads)]
  kept = np.isin(valid, ads) | np.isin(valid, top)
  assert tight.stats["behavior_refs"] == valid.size
  assert tight.stats["dropped_behavior_refs"] == (~kept).sum() > 0
  assert b["behavior_mask"].sum() == kept.sum()
  roomy = pipeline.Collator(path, info, 4, K, 64)
  b = roomy(groups)
  assert roomy.stats["dropped_behavior_refs"] == 0
  assert b["behavior_mask"].sum() == valid.size
  est = pipeline.behavior_overflow(config, path, num_batches=5)
  assert 0 <= est["dropped_fraction"] <= 1 and est["behavior_refs"] > 0


# Grain's worker processes read absl flags: without them parsed the pipeline
# says so (it does not parse them itself); parsed, workers change no batch.
_WORKERS = """
import json, sys
from absl import flags
import ml_collections
import numpy as np
from csctr.data import pipeline
config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
path = pipeline.prepare_dataset(config)  # the fixture's: already prepared
config.data.worker_count = 1
try:
  pipeline.train_iterator(config, path)
  raise SystemExit("no error without parsed flags")
except ValueError as e:
  assert "needs parsed absl flags" in str(e), e
flags.FLAGS.mark_as_parsed()
with_workers = next(pipeline.train_iterator(config, path))
config.data.worker_count = 0
in_process = next(pipeline.train_iterator(config, path))
assert with_workers.keys() == in_process.keys()
for key in in_process:
  np.testing.assert_array_equal(with_workers[key], in_process[key])
print("same batches")
"""


def test_worker_processes_need_parsed_flags_and_change_no_batch(ds):
  config, _, _, _ = ds
  proc = subprocess.run([sys.executable, "-c", _WORKERS, config.to_json()],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().endswith("same batches")
