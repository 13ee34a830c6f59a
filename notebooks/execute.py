"""Run notebooks at full size, top to bottom in a fresh kernel, and store them with outputs.

    .venv/bin/python notebooks/execute.py notebooks/quickstart.ipynb [...]

This is how the committed outputs are made (`make notebooks` runs all three); a notebook is
written back only when every cell succeeded, so a failed run never replaces a good one.
"""

import sys
import time
from pathlib import Path

import nbclient
import nbformat


def execute(path: Path) -> float:
    """Execute ``path`` in place (working directory: its folder); returns the seconds taken."""
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    nbclient.NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    elapsed = time.perf_counter() - t0
    tmp = path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(path)
    return elapsed


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(f"{arg}: executed in {execute(Path(arg)) / 60:.1f} min", flush=True)
