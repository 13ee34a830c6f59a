"""Execute the example notebooks under notebooks/ and check what they claim.

Every notebook runs on the real SmolLM2-135M-Instruct. Its first code cell, tagged
`parameters`, starts with the line `FAST = False` and sets the sizes from it; the test runs a
fresh copy in tmp_path with that line turned into `FAST = True` (a few steps, the same code
path). Each notebook ends with a cell of assertions on its own results that prints
"all checks passed"; a failing assertion or any cell error fails the test. Notebooks are
stored executed in git at full size (FAST = False), with their outputs.

The kernel is this interpreter: a kernelspec written to tmp_path (found through JUPYTER_PATH,
which takes precedence over any installed `python3` kernelspec) runs ``sys.executable``, so the
notebooks see the same environment (the project's .venv) as pytest.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["quickstart", "rank_and_scaling", "quantization"]
TIMEOUT_S = 600  # per cell
FAST_LINE = "FAST = False"

# Text each notebook must print (besides "all checks passed"), and the least number of plots.
EXPECTED = {
    "quickstart": (
        ["bits/param", "trainable params:", "held-out loss:", "bit-equal", "max |merged - adapted|"],
        1,
    ),
    "rank_and_scaling": (["the largest rank every target allows is 192", "one compiled step",
                         "random subspaces (exact)", "sigma (dense SVD)"], 4),
    "quantization": (["max |rebuilt - NF4_CODE|", "in-model NF4 kernel", "NF4(W')",
                      "QLoRA (nf4) ends"], 6),
}


def _kernelspec(root: Path) -> Path:
    """A `python3` kernelspec in ``root/kernels`` that runs this interpreter."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (test)",
                "language": "python",
            }
        )
    )
    return root


def _parameters(nb):
    """The notebook's parameters cell: its first code cell, tagged `parameters`."""
    cell = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in cell.metadata.get("tags", []), "first code cell is not tagged parameters"
    assert cell.source.splitlines()[0].startswith(FAST_LINE), cell.source[:200]
    return cell


def _outputs(nb) -> tuple[str, int, list[str]]:
    """(all text output, number of PNG outputs, error names) of an executed notebook."""
    text, pngs, errors = [], 0, []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            kind = out.get("output_type")
            if kind == "stream":
                text.append(out.get("text", ""))
            elif kind == "error":
                errors.append(f"{out.get('ename')}: {out.get('evalue')}")
            else:
                data = out.get("data", {})
                pngs += "image/png" in data
                text.append(data.get("text/plain", "") + data.get("text/markdown", ""))
    return "\n".join(text), pngs, errors


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    src = NOTEBOOKS / f"{name}.ipynb"
    work = tmp_path / "nb"
    work.mkdir()
    path = work / src.name
    shutil.copy(src, path)
    monkeypatch.setenv("JUPYTER_PATH", str(_kernelspec(tmp_path / "jupyter")))

    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert "2-core CPU" in nb.cells[0].source  # the title cell states the runtime
    cell = _parameters(nb)
    cell.source = cell.source.replace(FAST_LINE, "FAST = True", 1)

    client = nbclient.NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - t0

    text, pngs, errors = _outputs(nb)
    assert not errors, errors
    assert "all checks passed" in text, text[-2000:]
    needles, min_pngs = EXPECTED[name]
    for needle in needles:
        assert needle in text, f"{name}: {needle!r} not in the output"
    assert pngs >= min_pngs, f"{name}: {pngs} plots, expected >= {min_pngs}"
    print(f"{name}.ipynb executed in {elapsed:.1f} s")


@pytest.mark.parametrize("name", NAMES)
def test_stored_notebook_is_small_and_clean(name):
    """The committed notebooks: a full-size run (FAST = False) executed top to bottom in one
    kernel, every check passed, no errors, under 400 KB."""
    path = NOTEBOOKS / f"{name}.ipynb"
    assert path.stat().st_size < 400_000, f"{path.name} is {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    _parameters(nb)
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), counts
    text, pngs, errors = _outputs(nb)
    assert not errors, errors
    assert "all checks passed" in text


def test_kernel_is_this_interpreter(tmp_path, monkeypatch):
    """The tmp kernelspec wins over any installed one: the kernel runs sys.executable."""
    monkeypatch.setenv("JUPYTER_PATH", str(_kernelspec(tmp_path / "jupyter")))
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    text, _, errors = _outputs(nb)
    assert not errors, errors
    assert text.strip() == sys.executable
