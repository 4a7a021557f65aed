"""Every notebook executes as a notebook (nbclient + an ipykernel of this interpreter) with the
CI settings (SPARSEFL_NOTEBOOK_SMOKE=1), and is stored without outputs."""
import glob
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
KERNEL = "sparsefl-test"
# Figures each notebook must write (under notebook_runs/<name>/), beyond "no cell failed".
FIGURES = {
    "quickstart": ["acc_round.png", "acc_bytes.png"],
    "zerofl_swat": ["accuracy_vs_round.png", "accuracy_vs_mb.png", "upload_density.png"],
    "fedsparsify": ["accuracy_vs_round.png", "density_vs_round.png", "target_sparsity.png",
                    "accuracy_vs_cost.png"],
    "sparsyfed_vs_topk": ["accuracy_vs_round.png", "regrowth.png", "mask_iou.png",
                          "mask_iou_sparsyfed.png", "mask_iou_topk.png"],
}


def _load(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  """A kernel spec that starts ipykernel with this test's own interpreter."""
  base = tmp_path_factory.mktemp("jupyter")
  spec = base / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "sparsefl_jax (tests)", "language": "python"}))
  return str(base)


def test_every_notebook_has_figures_listed():
  assert sorted(FIGURES) == sorted(os.path.basename(p)[:-6] for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_without_outputs(path):
  for i, cell in enumerate(_load(path)["cells"]):
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, (
          f"{os.path.basename(path)} cell {i} has stored outputs; clear them before committing")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_colab_ready(path):
  code = ["".join(c["source"]) for c in _load(path)["cells"] if c["cell_type"] == "code"]
  assert "SPARSEFL_NOTEBOOK_SMOKE" in code[0]        # the parameters cell comes first
  assert 'find_spec("sparsefl_jax")' in code[1] and "jax.devices()" in code[1]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, kernel_dir, tmp_path, monkeypatch):
  import nbclient
  import nbformat
  monkeypatch.setenv("JUPYTER_PATH", kernel_dir)
  monkeypatch.setenv("SPARSEFL_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  nb = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  seconds = time.perf_counter() - start
  name = os.path.basename(path)[:-6]
  print(f"{name}: executed in {seconds:.1f} s")
  for fig in FIGURES[name]:
    out = tmp_path / "notebook_runs" / name / fig
    assert out.exists() and out.stat().st_size > 1000, f"{name} did not write {fig}"
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert len(images) >= len(FIGURES[name]) - 1 or name == "quickstart", name
