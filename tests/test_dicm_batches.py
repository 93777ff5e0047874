"""DICM batches: evals drop no behaviour image, training counts and bounds drops."""

import numpy as np
import pytest

from configs import tiny
from csctr.data import batch as batch_lib
from csctr.data import pipeline
from csctr.data import prepared
from csctr.training import loop


@pytest.fixture(scope="module")
def dicm(tmp_path_factory):
  config = tiny.get_config()
  config.data_dir = str(tmp_path_factory.mktemp("data"))
  config.data.num_behaviors = 3
  # A group of K=4 impressions references at most 1 + 4 * 3 = 13 images.
  config.data.eval_unique_images = 16
  config.data.eval_groups_per_batch = 16  # batches cut by images, not G
  return config, pipeline.prepare_dataset(config)


def test_eval_batches_keep_every_behaviour_image(dicm):
  config, path = dicm
  table = np.load(f"{path}/{prepared.IMAGES_FILE}")
  source = pipeline.groups_source(path, "test")
  by_id = {}
  for i in range(len(source)):
    g = source[i]
    for imp, beh in zip(g["impression_id"], g["behavior"]):
      by_id[int(imp)] = beh
  seen, references = 0, 0
  for batch in pipeline.eval_batches(config, path, "test"):
    assert batch["behavior_dropped"].sum() == 0
    for j in np.flatnonzero(batch["weight"] > 0):
      want = by_id[int(batch["impression_id"][j])]
      np.testing.assert_array_equal(batch["behavior_mask"][j], want >= 0)
      for slot in np.flatnonzero(want >= 0):
        row = batch["behavior_images"][j, slot]
        np.testing.assert_array_equal(batch["images"][row], table[want[slot]])
        references += 1
      seen += 1
  assert seen == len(by_id) and references > 100


def test_eval_plan_fits_the_budget_and_refuses_an_impossible_group():
  groups = [{"item": 0, "behavior": np.array([[1, 2], [3, -1]])},
            {"item": 4, "behavior": np.array([[1, 5]])},
            {"item": 1, "behavior": np.array([[6, 7]])}]
  assert pipeline.eval_plan(groups, range(3), 8, 5) == [[0], [1, 2]]
  assert pipeline.eval_plan(groups, range(3), 2, 8) == [[0, 1], [2]]
  with pytest.raises(ValueError, match=r"eval group 0 references 4"):
    pipeline.eval_plan(groups, range(3), 8, 3)


def test_training_batches_count_what_the_budget_drops(dicm):
  config, path = dicm
  info = pipeline.load_info(path)
  collate = pipeline.Collator(path, info, 8, 4, 8)  # U = 8: drops plenty
  source = pipeline.groups_source(path, "train")
  batch = collate([source[i] for i in range(8)])
  assert batch["behavior_dropped"].sum() == collate.stats[
      "dropped_behavior_refs"] > 0
  beh = np.concatenate([source[i]["behavior"] for i in range(8)])
  kept = batch["behavior_mask"].sum()
  assert kept + batch["behavior_dropped"].sum() == (beh >= 0).sum()


def test_progress_stops_above_the_configured_fraction():
  progress = loop._StepLog(0, 10, None, slots=4, max_dropped=0.05)  # pylint: disable=protected-access
  ok = {"loss": 1.0, "grad_norm": 1.0, "impressions": 4, "learning_rate": 0.1,
        "behavior_refs": 100, "dropped_behavior_refs": 5}
  progress.pending = [(1, ok)]
  progress.flush(log=True)  # 5% is allowed
  progress.pending = [(2, dict(ok, dropped_behavior_refs=6))]
  with pytest.raises(ValueError, match=r"dropped 6 of 100 behaviour"):
    progress.flush(log=False)


def test_one_truncation_policy_last_valid_ids():
  ids = np.array([10, -1, 11, 99, 12, 13])
  valid = np.array([1, 0, 1, 0, 1, 1], bool)  # -1 and an unknown id
  np.testing.assert_array_equal(batch_lib.last_valid(ids, valid, 3),
                                [11, 12, 13])
  np.testing.assert_array_equal(batch_lib.last_valid(ids, valid, 9),
                                [10, 11, 12, 13])
  assert batch_lib.last_valid(ids, valid, 0).size == 0
