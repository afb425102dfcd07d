"""notebooks/walkthrough.ipynb, executed as a learner runs it, in its tiny mode (WALKTHROUGH_TINY=1)."""
import base64
import json
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
EXPLAINED = ["rcnn", "fast-rcnn", "faster-rcnn", "fcn"]  # the methods whose pictures the notebook shows


def test_the_notebook_is_kept_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_walkthrough_runs_in_tiny_mode_and_shows_every_methods_pictures(tmp_path, monkeypatch):
    # a kernel on this interpreter, whatever `python` is on PATH and whatever kernels are installed
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("WALKTHROUGH_TINY", "1")
    monkeypatch.setenv("WALKTHROUGH_DIR", str(tmp_path / "walkthrough"))
    for name in ("WALKTHROUGH_IMAGES", "WALKTHROUGH_DEMO", "WALKTHROUGH_IMAGE_ID"):
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"  # where the kernel runs: nothing may be written there
    cwd.mkdir()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()  # a cell's error raises

    shown = [base64.b64decode(output["data"]["image/png"]) for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.outputs if "image/png" in output.get("data", {})]
    explained = list((tmp_path / "walkthrough" / "reports" / "demo" / "explain").iterdir())
    assert len(explained) == 1 and (explained[0] / "index.html").is_file()
    for method in EXPLAINED:
        record = json.loads((explained[0] / f"{method}.json").read_text())
        assert record["pictures"], method
        for picture in record["pictures"]:  # every picture explain wrote is in the notebook, byte for byte
            assert (explained[0] / picture["file"]).read_bytes() in shown, picture["file"]
    assert not list(cwd.iterdir())
