"""The colabs run top to bottom (quick mode), so they never rot.

Each notebook is executed by nbclient in a fresh kernel of this interpreter
with CSCTR_NB_QUICK=1 (tiny data, few steps: about a minute each on 2 CPU
cores) and a private dataset cache; the assertions check that each produced
what it is for (metrics, pictures), not only that it did not raise.
"""

import pathlib
import re
import subprocess
import sys

import nbclient
import nbformat
import pytest

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"
KERNEL = "csctr-test"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
  """A kernelspec for exactly this interpreter, in a private prefix.

  A user-level 'python3' spec may point at another Python (without jax);
  installing into a temporary prefix leaves the user's Jupyter untouched.
  """
  prefix = tmp_path_factory.mktemp("jupyter")
  subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix",
                  str(prefix), "--name", KERNEL], check=True,
                 capture_output=True)
  return str(prefix / "share" / "jupyter")


def _execute(name, jupyter_path, tmp_path, monkeypatch):
  monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
  monkeypatch.setenv("CSCTR_NB_QUICK", "1")
  monkeypatch.setenv("CSCTR_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  with open(COLABS / name) as f:
    nb = nbformat.read(f, as_version=4)
  # Committed clean: outputs would bloat diffs and go stale.
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, name
  nbclient.NotebookClient(
      nb, timeout=600, kernel_name=KERNEL,
      resources={"metadata": {"path": str(COLABS)}}).execute()
  text = "\n".join(
      out.get("text", "") + out.get("data", {}).get("text/plain", "")
      for cell in nb.cells if cell.cell_type == "code"
      for out in cell.outputs)
  images = sum("image/png" in out.get("data", {})
               for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)
  return text, images


def _metric(text, key):
  match = re.search(rf"{key}: ([0-9.]+)", text)
  assert match, f"no {key} in the notebook's output"
  return float(match.group(1))


def test_quickstart(jupyter_path, tmp_path, monkeypatch):
  text, images = _execute("quickstart.ipynb", jupyter_path, tmp_path,
                          monkeypatch)
  assert "quick mode: True" in text
  assert 0.5 < _metric(text, "bayes_auc") < 1
  assert 0 < _metric(text, " auc") < 1
  assert images == 1  # the learning curves
  assert "predicted CTR of the first 8" in text


def test_attention_maps(jupyter_path, tmp_path, monkeypatch):
  text, images = _execute("attention_maps.ipynb", jupyter_path, tmp_path,
                          monkeypatch)
  assert "cscnn: AUC" in text and "cbam: AUC" in text
  # images, priors A^s_k, maps M_s per layer, mean maps, channel priors.
  assert images == 5
  assert re.search(r"\n\s+2\s+top left\s+[+-]\d\.\d{3}\s+[+-]\d\.\d{3}", text)


def test_bring_your_own_data(jupyter_path, tmp_path, monkeypatch):
  text, images = _execute("bring_your_own_data.ipynb", jupyter_path,
                          tmp_path, monkeypatch)
  assert "item_id,category_id,image" in text
  assert 0 < _metric(text, "auc") < 1
  assert "skipped_images_corrupt: 1" in text
  assert images == 0
