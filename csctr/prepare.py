r"""Prepares a dataset and exits: in-process, or on Apache Beam.

  python -m csctr.prepare --config=configs/byod.py \
      --config.byod_path=/data/shop [--runner=DirectRunner] \
      [--pipeline_options="--direct_num_workers=2"]

writes the prepared dataset where training looks for it (the cache path of
the config: config.data_dir, $CSCTR_DATA_DIR or ~/.cache/csctr), so a later
`python -m csctr.main` with the same config starts training at once.

--runner=inprocess (default) runs csctr.data.prepare in this process, the
fast path for up to ~10^7 impressions and the only one for the synthetic and
Fashion-MNIST datasets. Any Beam runner (DirectRunner, PrismRunner,
DataflowRunner, FlinkRunner, SparkRunner) runs csctr.data.beam_prepare on a
BYOD log; --pipeline_options are passed to Beam as they are (Dataflow's
project, region, temp_location, ...: docs/data.md).
"""

from __future__ import annotations

import shlex

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from csctr.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")
_RUNNER = flags.DEFINE_string(
    "runner", "inprocess", "'inprocess' or a Beam runner name.")
_OPTIONS = flags.DEFINE_string(
    "pipeline_options", "", "Further Beam pipeline options, shell-quoted.")


def main(argv):
  del argv
  config = _CONFIG.value
  if _RUNNER.value == "inprocess":
    path = pipeline.prepare_dataset(config)
  else:
    from csctr.data import beam_prepare  # pylint: disable=g-import-not-at-top
    path = beam_prepare.prepare(
        config, ["--runner=" + _RUNNER.value,
                 *shlex.split(_OPTIONS.value)])
  logging.info("prepared dataset: %s", path)
  print(path)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
