"""play.ipynb: runs top to bottom on a tiny real run, and is committed without outputs."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import ROOT, TINY, run_train

NOTEBOOK = os.path.join(ROOT, "play.ipynb")


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_committed_notebook_has_no_outputs():
    nb = read_notebook()
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, \
            f"clear the outputs of play.ipynb:\n{cell.source[:200]}"


@pytest.fixture(scope="module")
def executed(tmp_path_factory, hellaswag_val):
    """A 20-step run with validation, HellaSwag, two checkpoints and one skipped update, then the
    notebook run on it (in memory: play.ipynb itself is never written)."""
    log_dir = tmp_path_factory.mktemp("run") / "log"
    run_train(*TINY, "--batch-size", "8", "--max-steps", "20", "--val-every", "5", "--checkpoint-every", "10",
              "--hellaswag-every", "10", "--hellaswag-limit", "8",
              "--hellaswag-data", hellaswag_val, "--log-dir", str(log_dir),
              nan_steps=7)
    nb = read_notebook()
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this process's environment
        mp.setenv("LOG_DIR", str(log_dir))
        mp.delenv("MPLBACKEND", raising=False)  # keep the kernel's inline backend, which makes image/png outputs
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    return nb, log_dir


def test_notebook_runs_on_a_tiny_run(executed):
    nb, log_dir = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert cell.execution_count is not None, f"cell did not run:\n{cell.source[:200]}"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"{errors[0].ename}: {errors[0].evalue}"
    outputs = [o for c in code for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # loss, HellaSwag, position embeddings
    for name in ("loss.png", "hellaswag.png", "position_embeddings.png"):
        with open(log_dir / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "(non-finite loss): [7]" in text  # the NaN loss of step 7 is read, not fatal
    assert "after 20 steps" in text  # the latest checkpoint was loaded
    assert text.count("ROMEO:") == 4  # a text-file run samples from the Shakespeare prompt
    assert "not FineWeb-Edu" in text  # so no GPT-2 FineWeb-Edu loss line
