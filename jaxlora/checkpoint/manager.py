"""`CheckpointManager`: Orbax checkpoints of a TrainState, with checksums and a damaged-step fallback.

Orbax (``ocp.CheckpointManager``) does what it does: it writes each step into a temporary
directory and renames it when complete, lists the finalized steps, keeps the newest ``keep``
plus the ``keep_best`` best by a metric (its preservation policies, applied when a save
finalizes) and names the best step. This module adds what Orbax cannot tell: whether a
finalized step is still readable (every leaf checked against the crc32 of its manifest; see
`jaxlora.checkpoint.leaves`), the fallback to the previous step when the newest is not, and
the rewrite of a damaged step when it is saved again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from jaxlora.checkpoint.base import BASE_JSON, FORMAT_VERSION, check_adapters_fit, check_base_record
from jaxlora.checkpoint.leaves import (
    check_template,
    crc32,
    flatten,
    leaf_key,
    leaf_table,
    unflatten_like,
)
from jaxlora.errors import CheckpointError, JaxloraWarning

__all__ = ["CheckpointManager", "Restored"]

_STATE, _DATA, _META = "state", "data", "meta"
# Retention moves a step here in one atomic rename, then removes it: a kill midway leaves a
# half-deleted folder only in here, never among the steps, and the next writer removes it.
_TRASH = ".deleted"
_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `CheckpointManager.restore` returns."""

    step: int
    state: Any  # the TrainState (same structure as the template)
    data_position: dict[str, int]
    metrics: dict[str, float]


class _Corrupt(CheckpointError):
    """A step directory that exists but cannot be read back completely."""


class _OrbaxManager(ocp.CheckpointManager):
    """Orbax's manager, reading a step's unreadable metrics file as "no metrics".

    Orbax reads every step's metrics when it lists the steps (on creation and `reload`) and
    lets a JSON error through, so one damaged metrics file would make the whole directory
    unopenable. As "no metrics" the step is only kept while among the newest, and `restore`
    judges it by its own checks like any other step.
    """

    def metrics(self, step: int) -> Any:
        try:
            return super().metrics(step)
        except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
            return None


def _metric_fn(name: str, mode: str) -> Callable[[Mapping[str, Any]], float]:
    """The ranking value of a step's metrics; a step without ``name`` ranks last."""
    worst = math.inf if mode == "min" else -math.inf
    return lambda m: float(m[name]) if m.get(name) is not None else worst


def _orbax_options(
    keep: int, keep_best: int, metric_fn: Callable, best_mode: str, async_save: bool,
    read_only: bool,
):
    """Orbax options: keep the newest ``keep`` and the ``keep_best`` best by ``metric_fn``.

    A preservation policy rather than ``max_to_keep=`` with ``best_fn=``: with both set Orbax
    keeps the ``max_to_keep`` *best* steps, and the newest only if it is among them. A writer
    removes the temporary folders of interrupted saves when it opens and deletes old steps by
    a rename into ``_TRASH``; a reader (``read_only``) creates, removes and renames nothing:
    it never saves (see `CheckpointManager.save`), so retention never runs. Not Orbax's own
    ``read_only``, which logs a warning on every open.
    """
    if read_only:
        return ocp.CheckpointManagerOptions(
            best_fn=metric_fn, best_mode=best_mode, create=False, enable_async_checkpointing=False
        )
    policy = ocp_policies.AnyPreservationPolicy(
        [
            ocp_policies.LatestN(n=keep),
            ocp_policies.BestN(
                get_metric_fn=metric_fn,
                reverse=best_mode == "min",
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    return ocp.CheckpointManagerOptions(
        best_fn=metric_fn,  # makes Orbax write each step's metrics and rank by them
        best_mode=best_mode,
        preservation_policy=policy,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,
        todelete_subdir=_TRASH,
    )


class CheckpointManager:
    """Orbax checkpoints of a TrainState under ``run_dir/checkpoints``.

    Keeps the newest ``keep`` steps plus the ``keep_best`` best by ``best_metric`` (lower is
    better when ``best_mode="min"``; steps without the metric rank last). Saves
    asynchronously: `save` returns after the arrays are copied to host; call `wait` (or
    `close`, or use it as a context manager) before exiting. A manager that only restores
    never deletes anything: Orbax applies retention when a save finalizes. A ``read_only``
    manager writes nothing at all (not even ``base.json``): `eval`, `info`, `export` and
    `generate` open run directories with one.

    Example::

        with CheckpointManager(run_dir, save_every=100, keep=3, base=base_rec) as ckpt:
            for step in ...:
                ckpt.save(step, state, data_position={"epoch": 0, "index": i},
                          metrics={"val_loss": vl})
            ckpt.save(final_step, state, force=True)
        restored = CheckpointManager(run_dir, base=base_rec).restore(template_state)
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        save_every: int = 1,
        keep: int = 3,
        keep_best: int = 1,
        best_metric: str = "val_loss",
        best_mode: str = "min",
        async_save: bool = True,
        base: Mapping[str, Any] | None = None,
        read_only: bool = False,
    ) -> None:
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, got {keep_best}")
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.save_every = int(save_every)
        self.keep, self.keep_best = int(keep), int(keep_best)
        self.best_metric, self.best_mode = best_metric, best_mode
        self._base = dict(base) if base is not None else None
        self.read_only = bool(read_only)
        if self.read_only:
            if not self.directory.is_dir():
                raise CheckpointError(f"{self.directory}: no checkpoints (no such folder)")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._write_or_check_base()
            self._purge_trash()
        metric_fn = _metric_fn(best_metric, best_mode)
        options = _orbax_options(
            self.keep, self.keep_best, metric_fn, best_mode, async_save, self.read_only
        )
        self._async = async_save and not self.read_only
        self._mgr = _OrbaxManager(
            self.directory, options=options, item_names=(_STATE, _DATA, _META)
        )
        self._damaged: set[int] = set()  # steps found unreadable by restore (dropped on save)

    # ---- base record -----------------------------------------------------------------------

    def _write_or_check_base(self) -> None:
        """Write ``base.json`` if absent; never overwrite a record of another base."""
        if self._base is None:
            return
        path = self.directory / BASE_JSON
        if path.exists():  # resuming on a different model fails
            check_base_record(self._read_base_json(), self._base)
            return
        if jax.process_index() != 0:  # multi-host: the processes share the folder; one writes
            return
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self._base, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def _purge_trash(self) -> None:
        """Remove the steps retention moved to ``_TRASH`` (what a kill left half-deleted too).

        Errors are ignored: whatever is left is not a step, and the next writer tries again.
        """
        shutil.rmtree(self.directory / _TRASH, ignore_errors=True)

    def _read_base_json(self) -> dict[str, Any]:
        path = self.directory / BASE_JSON
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable base record ({e})") from e

    # ---- steps -----------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps Orbax tracks, ascending: the finalized ones and those this manager is writing.

        Temporary directories of interrupted saves are never listed.
        """
        return sorted(int(s) for s in self._mgr.all_steps())

    def latest_step(self) -> int | None:
        """The newest step Orbax tracks (None if none); it may be damaged (see `restore`)."""
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the best ``best_metric`` (None if no step has it).

        Waits for writes in flight (the metric is read from the finalized step).
        """
        self.wait()
        step = self._mgr.best_step()
        if step is None or (self._mgr.metrics(step) or {}).get(self.best_metric) is None:
            return None
        return step

    def should_save(self, step: int) -> bool:
        """Whether ``step`` is a multiple of ``save_every``.

        Not Orbax's ``should_save``: that refuses every step at or below the newest one on
        disk, so a damaged newest step could never be written again after a fallback.
        """
        return self.save_every > 0 and step % self.save_every == 0

    # ---- save ------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_position: Mapping[str, int] | None = None,
        metrics: Mapping[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Save ``state`` at ``step`` if it is a multiple of ``save_every`` (or ``force``).

        Returns whether a save was started. Asynchronous: the arrays are copied to host now,
        written in the background. A step is written once: saving a step that already exists
        (e.g. the final save right after resuming a finished run, or re-saving the last good
        state after a non-finite step) writes nothing and returns False. The first save
        deletes the steps `restore` found damaged, so retention never counts them and a
        damaged step saved again is written anew.
        """
        step = int(step)
        if self.read_only:
            raise CheckpointError(f"{self.directory}: opened read-only; not saving step {step}")
        if not (force or self.should_save(step)):
            return False
        if step in self._mgr.all_steps() and step not in self._damaged:
            return False
        for s in sorted(self._damaged & set(self._mgr.all_steps())):
            self._mgr.delete(s)
        if self._damaged:  # now, or retention could not move the rewritten step there later
            self._purge_trash()
        self._damaged.clear()
        host, manifest = flatten(state)
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "metrics": metrics,  # restored from here (checked); Orbax's copy ranks the steps
            "manifest": manifest,
            "base_fingerprint": self._base.get("fingerprint") if self._base else None,
        }
        pos = {k: int(v) for k, v in (data_position or {}).items()}
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(host),
                _DATA: ocp.args.JsonSave(pos),
                _META: ocp.args.JsonSave(meta),
            }
        )
        started = bool(self._mgr.save(step, args=args, metrics=metrics, force=True))
        if not self._async:
            self._purge_trash()
        return started

    def wait(self) -> None:
        """Block until background writes (and the deletions retention asks for) are done."""
        self._mgr.wait_until_finished()
        if not self.read_only:
            self._purge_trash()

    def close(self) -> None:
        self.wait()
        self._mgr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- restore ---------------------------------------------------------------------------

    def restore(self, template: Any, *, step: int | None = None, base: Any = None) -> Restored:
        """Restore into ``template`` (a freshly initialized TrainState: structure, shapes, dtypes).

        Args:
          template: pytree with the same leaves as the saved state.
          step: the step to restore; None = the newest readable one (a damaged newest step is
            skipped with a warning).
          base: the current base Params; when given, checks that the saved adapters fit it.
            The base.json record (passed as ``base=`` to the constructor) is checked too.

        Raises:
          CheckpointError: no checkpoint, a damaged one (explicit ``step``), a different base,
            or a template that does not match the saved leaves.
        """
        if self._base is not None and (self.directory / BASE_JSON).exists():
            check_base_record(self._read_base_json(), self._base)
        out = self._first_readable(step, lambda s: self._restore_step(s, template, ""))
        if base is not None:
            adapters = getattr(out.state, "adapters", None)
            if adapters is not None:
                check_adapters_fit(base, adapters)
        return out

    def restore_adapters(
        self, template_adapters: Any, *, step: int | str | None = None
    ) -> Restored:
        """Restore only the adapters (for export / inference): no optimizer template needed.

        Args:
          template_adapters: an Adapters tree (e.g. ``jax.eval_shape`` of ``lora.init``) giving
            structure, shapes and the static scales.
          step: a step, "best", or None / "latest".

        Returns:
          `Restored` whose ``state`` is the adapters tree.
        """
        if step == "best":
            step = self.best_step()
            if step is None:
                raise CheckpointError(
                    f"{self.directory}: no checkpoint with a {self.best_metric!r} metric"
                )
        if step == "latest":
            step = None
        return self._first_readable(
            step, lambda s: self._restore_step(s, template_adapters, "adapters/")
        )

    def _first_readable(self, step: int | None, read: Callable[[int], _T]) -> _T:
        """``read(step)``, or with ``step=None`` ``read`` of the newest step it does not find damaged."""
        self.wait()
        self._mgr.reload()  # the directory as it is now (another process may have written)
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore")
        if step is not None:
            if int(step) not in steps:
                raise CheckpointError(
                    f"{self.directory}: no checkpoint for step {step}; have {steps}"
                )
            return read(int(step))
        errors = []
        for s in reversed(steps):
            try:
                return read(s)
            except _Corrupt as e:
                errors.append(str(e))
                self._damaged.add(s)
                warnings.warn(f"skipping damaged checkpoint: {e}", JaxloraWarning, stacklevel=3)
        raise CheckpointError("no readable checkpoint: " + "; ".join(errors))

    def _restore_step(self, step: int, template: Any, prefix: str) -> Restored:
        """One step's leaves under ``prefix`` (all of them for ""), restored into ``template``."""
        meta, leaves, pos = self._read_step(step)
        sub = [
            (m, x)
            for m, x in zip(meta["manifest"], leaves, strict=True)
            if m["path"].startswith(prefix)
        ]
        manifest = [dict(m, path=m["path"][len(prefix) :]) for m, _ in sub]
        check_template(self.directory / str(step), manifest, leaf_table(template))
        return Restored(
            step=step,
            state=unflatten_like(template, [x for _, x in sub]),
            data_position=pos,
            metrics=dict(meta.get("metrics", {})),
        )

    def _read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` item of one step (manifest, metrics), checked against the base record."""
        where = self.directory / str(step)
        try:
            meta = self._mgr.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
        except Exception as e:  # noqa: BLE001 - any failure to read means a damaged step
            raise _Corrupt(f"{where}: metadata unreadable ({type(e).__name__}: {e})") from e
        if not isinstance(meta, Mapping) or "manifest" not in meta:
            raise _Corrupt(f"{where}: metadata incomplete")
        if self._base is not None and meta.get("base_fingerprint") not in (
            None,
            self._base.get("fingerprint"),
        ):
            raise CheckpointError(
                f"{where}: made with a different base model (fingerprint "
                f"{str(meta.get('base_fingerprint'))[:20]}... vs {str(self._base.get('fingerprint'))[:20]}...)"
            )
        return dict(meta)

    def _read_step(self, step: int) -> tuple[dict, list[np.ndarray], dict]:
        """(meta, leaves in manifest order, data position) of one step, all checksummed."""
        where = self.directory / str(step)
        meta = self._read_meta(step)
        manifest = meta["manifest"]
        abstract = {
            leaf_key(i): np.zeros(m["shape"], dtype=np.dtype(m["dtype"]))
            for i, m in enumerate(manifest)
        }
        try:
            got = self._mgr.restore(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardRestore(abstract), _DATA: ocp.args.JsonRestore()}
                ),
            )
            arrays, pos = got[_STATE], got[_DATA]
        except Exception as e:  # noqa: BLE001
            raise _Corrupt(f"{where}: state unreadable ({type(e).__name__}: {str(e)[:200]})") from e
        leaves = []
        for i, entry in enumerate(manifest):
            if leaf_key(i) not in arrays:
                raise _Corrupt(f"{where}: leaf {entry['path']} missing")
            x = np.asarray(arrays[leaf_key(i)])
            if crc32(x) != entry["crc32"]:
                raise _Corrupt(f"{where}: leaf {entry['path']} fails its checksum")
            leaves.append(x)
        return meta, leaves, {k: int(v) for k, v in dict(pos or {}).items()}
