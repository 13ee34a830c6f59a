"""Sweeps: a sweep file's runs (`spec`), the resumable runner that trains them one at a time
or as populations (`runner`), and the results table and plots (`results`).

See `jaxlora.sweep.spec` for the sweep file format.
"""

from jaxlora.sweep.results import RunResult, plot_results, write_results
from jaxlora.sweep.runner import STATUS_FILE, RunFn, SweepResult, run_sweep
from jaxlora.sweep.spec import RunSpec, Sweep, expand, load_sweep, run_name, sweep_dir

__all__ = [
    "Sweep",
    "RunSpec",
    "RunResult",
    "SweepResult",
    "RunFn",
    "load_sweep",
    "expand",
    "run_name",
    "run_sweep",
    "write_results",
    "sweep_dir",
    "plot_results",
    "STATUS_FILE",
]
