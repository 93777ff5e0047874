"""Test setup: deterministic, single-device CPU JAX (multi-device tests use subprocesses)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: an end-to-end test of a minute or more (CI runs it)")


@pytest.fixture(scope="session")
def trained_tiny_workdir(tmp_path_factory) -> str:
  """A tiny 6-step trained run (one eval, one checkpoint), shared by the export and serving tests."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from csctr.training import loop as train  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("csctr_serving_run")
  workdir = root / "run"
  config = tiny.get_config()
  config.data_dir = str(root / "data")
  config.num_train_steps = 6
  config.eval_every = 0  # one eval and one checkpoint, at step 6
  config.checkpoint_every = 0
  train.train_and_evaluate(config, str(workdir))
  return str(workdir)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: end-to-end tests over ~30 s (CI still runs them)")
