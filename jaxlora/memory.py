"""Process memory: the peak resident set, and handing freed heap pages back to the OS.

QLoRA's promise is measured as the process's peak RSS. Two transient phases, streaming the
checkpoint and compiling the train step, each free a few hundred MB that glibc keeps in its
arenas; later allocations (the step's buffers) then land beside that dead memory instead of
in it, and the peak counts both. `return_freed_memory` after each phase keeps the peak to
what is really live.
"""

from __future__ import annotations

import ctypes
import resource

__all__ = ["peak_rss_mb", "device_peak_mb", "return_freed_memory"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mb() -> float | None:
    """Peak memory in use on the first accelerator so far (MiB; ``memory_stats()``), or None
    where the backend does not report it (XLA:CPU)."""
    import jax

    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass
