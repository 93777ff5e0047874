"""Model selection: a validation split, the best checkpoint, test scored once."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from csctr import metrics as metrics_lib
from csctr import rundir
from csctr.data import pipeline
from csctr.training import loop


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = tiny.get_config()
  c.data_dir = str(tmp_path_factory.mktemp("data"))
  c.data.validation_fraction = 0.2
  c.eval_every = 6
  return c


@pytest.fixture(scope="module")
def run(config, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  return workdir, loop.train_and_evaluate(config, workdir)


def _ids(path, split):
  source = pipeline.groups_source(path, split)
  return np.concatenate([source[i]["impression_id"]
                         for i in range(len(source))])


def test_validation_is_the_latest_fifth_of_train(config):
  path = pipeline.prepare_dataset(config)
  splits = pipeline.load_info(path).splits
  assert splits["validation"].impressions == 480  # 0.2 * 2400
  assert splits["train"].impressions == 1920
  assert splits["test"].impressions == 600  # test is untouched
  train, val, test = (_ids(path, s) for s in ("train", "validation", "test"))
  # Synthetic impression ids are time order: train < validation < test.
  assert train.max() < val.min() and val.max() < test.min()
  assert len(np.unique(np.concatenate([train, val]))) == 2400
  assert 0.5 < splits["validation"].bayes_auc < 1.0


def test_best_validation_checkpoint_is_what_test_scores(run, config):
  workdir, record = run
  log = rundir.read_eval_log(workdir)
  val = [e for e in log if e["split"] == "validation"]
  assert [e["step"] for e in val] == [6, 12, 18, 24]
  assert [e["split"] for e in log].count("test") == 1 and log[-1] == record
  aucs = [e["auc"] for e in val]
  best_step = val[int(np.argmax(aucs))]["step"]  # ties: the earliest
  assert record["best_step"] == best_step
  assert record["best_validation_auc"] == max(aucs)
  assert os.listdir(rundir.best_checkpoint_dir(workdir)) == [str(best_step)]
  # The test record is the best checkpoint's predictions, recomputed here.
  model, _, _, step = rundir.restore_model(workdir, best=True)
  assert step == best_step
  logits, labels, users, cold = [], [], [], []
  for batch in pipeline.eval_batches(config, pipeline.prepare_dataset(config),
                                     "test"):
    keep = batch["weight"] > 0
    logits.append(np.asarray(model(batch))[keep])
    labels.append(batch["label"][keep])
    users.append(batch["user_id"][keep])
    cold.append(batch["is_cold"][keep])
  expected = metrics_lib.compute_metrics(
      *(np.concatenate(x) for x in (logits, labels, users, cold)))
  np.testing.assert_allclose(record["auc"], expected["auc"], rtol=1e-6)
  np.testing.assert_allclose(record["logloss"], expected["logloss"],
                             rtol=1e-5)


@pytest.mark.slow
def test_rerun_of_a_finished_run_logs_nothing_new(run, config):
  workdir, record = run
  before = rundir.read_eval_log(workdir)
  assert loop.train_and_evaluate(config, workdir) == record
  assert rundir.read_eval_log(workdir) == before


def test_baselines_json_beside_the_run(run):
  workdir, _ = run
  with open(os.path.join(workdir, "baselines.json")) as f:
    baselines = json.load(f)
  assert set(baselines) == {"validation", "test"}
  assert set(baselines["test"]) == {"popularity", "item_ctr", "user_category",
                                    "id_lr"}
  assert baselines["test"]["item_ctr"]["num_impressions"] == 600
