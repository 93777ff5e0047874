"""The online scorer and the export import nothing of the training stack."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINING_STACK = ("grain", "tensorflow_datasets", "tensorboardX", "optax")


def _imported_after(statement: str) -> dict[str, object]:
  code = (f"{statement}\nimport json, sys\nprint(json.dumps({{"
          f"'stack': sorted(m for m in {TRAINING_STACK!r} if m in sys.modules),"
          "'csctr': sorted(m for m in sys.modules if m.startswith('csctr'))}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_serving_and_export_import_no_training_stack():
  # flax.nnx itself imports optax (for nnx.Optimizer), so what csctr may not
  # add is measured against a bare flax import.
  baseline = set(_imported_after("import flax.nnx")["stack"])
  got = _imported_after("import csctr.serving")  # scorer, export, rundir
  assert {"csctr.serving.scorer", "csctr.serving.export",
          "csctr.rundir"} <= set(got["csctr"])
  assert set(got["stack"]) <= baseline, got["stack"]
  assert not [m for m in got["csctr"] if m.startswith("csctr.training")]
  assert "csctr.data.pipeline" not in got["csctr"]
  assert "csctr.data.prepare" not in got["csctr"]
