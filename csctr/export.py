r"""`python -m csctr.export --workdir=DIR`: writes a run's embedding table.

  python -m csctr.export --workdir=DIR [--images=DIR|FILE.npz] [--output=DIR]
  python -m csctr.export --workdir=DIR --only_new --base_table=DIR \
      --images=catalogue.npz         # daily update: embeds new items only

The implementation lives in csctr/serving/export.py; this module holds the
command line (flags are defined here, not at import: csctr.main owns
--workdir too).
"""

import json

from absl import app
from absl import flags

from csctr.serving import export

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory.")
_IMAGES = flags.DEFINE_string(
    "images", None, "Prepared dataset dir or .npz (images, categories"
    "[, ids, raw_ids]); default: the run's dataset.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "Table directory (default WORKDIR/embedding_tables/"
    "STEP; with --only_new, BASE_TABLE's next version STEP.K).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default latest).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per encoder call.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing "
                               "table.")
_ONLY_NEW = flags.DEFINE_bool(
    "only_new", False, "Incremental: embed only the images --base_table "
    "lacks and write base + new rows as a new table.")
_BASE_TABLE = flags.DEFINE_string(
    "base_table", None, "The previous table (with --only_new); of the same "
    "checkpoint.")


def main(argv):
  export.quiet_orbax_logging()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _ONLY_NEW.value != (_BASE_TABLE.value is not None):
    raise app.UsageError("--only_new and --base_table go together")
  path = export.export(_WORKDIR.value, _IMAGES.value, _OUTPUT.value,
                       _STEP.value, _BATCH.value, overwrite=_OVERWRITE.value,
                       base_table=_BASE_TABLE.value)
  meta = export.EmbeddingTable(path).meta
  print(json.dumps({"path": path, **{k: meta.get(k) for k in (
      "step", "num_rows", "new_rows", "d", "images_per_sec", "seconds",
      "config_hash")}}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
