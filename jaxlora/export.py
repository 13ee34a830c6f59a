"""Exporting a trained adapter: as a PEFT folder, or merged into a plain Hugging Face model.

Merging (``W' = W + s * A @ B``) dequantizes QTensor bases and adds in float32
(`jaxlora.lora.merge`); the result is written in float32 or bfloat16 and is *never*
re-quantized -- re-quantizing after the merge is what makes PEFT's merged 4-bit models differ
from the adapter model they came from (peft#1043, #2321).

Every export writes into a temporary sibling directory and renames it into place when
complete, and refuses to write into an existing non-empty ``out``: an interrupted or failed
export never leaves a half-written folder where a model is expected.

``export(run_dir, fmt, out)`` rebuilds what it needs from a run directory the way training
built it (`jaxlora.train`: the resolved ``config.toml`` gives model, quantization and LoRA
spec; the base is verified against ``checkpoints/base.json``) and takes the adapters of the
best (or latest) checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from jaxlora import lora
from jaxlora.errors import CheckpointError

__all__ = ["export_merged", "export", "RunPieces", "atomic_dir", "FORMATS"]

FORMATS = ("peft", "merged")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success rename it to ``out``.

    Raises CheckpointError (before anything is written) if ``out`` exists and is not an
    empty directory. On any error the temporary directory is removed and ``out`` untouched.
    """
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not empty; refusing to overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory otherwise
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_merged(
    folder: str | os.PathLike,
    config: Any,
    base_params: lora.Params,
    adapters: lora.Adapters,
    tokenizer: Any = None,
    dtype: str = "float32",
) -> Path:
    """Merge ``adapters`` into ``base_params`` and write a Hugging Face model folder.

    Args:
      folder: output directory; must not exist or be empty (CheckpointError otherwise).
      config: the `ModelConfig` of the base.
      base_params: base Params (float arrays and/or QTensors).
      adapters: the adapters to merge.
      tokenizer: optional `jaxlora.io.Tokenizer`, saved alongside.
      dtype: "float32" or "bfloat16" for the stored weights.

    Returns:
      The folder. Loading it with `jaxlora.io.load_model` gives a float model whose forward
      equals the (unmerged) adapter model up to float rounding (bfloat16 storage aside).
    """
    from jaxlora.io import save_hf

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"export_merged: dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    merged = lora.merge(base_params, adapters)  # float32 add, QTensors dequantized, no requant
    with atomic_dir(folder) as tmp:
        save_hf(tmp, config, merged, tokenizer, dtype=dtype)
    return Path(folder)


class RunPieces(NamedTuple):
    """What an export needs from a run (`export` builds it with `jaxlora.train.open_run`)."""

    model_config: Any  # ModelConfig
    base: lora.Params  # the base the adapters were trained on (PiSSA: the residual)
    adapters: lora.Adapters
    tokenizer: Any
    spec: lora.LoraSpec
    model_name: str
    step: int


def export(
    run_dir: str | os.PathLike | None,
    fmt: str,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    step: int | str = "best",
    pieces: RunPieces | None = None,
) -> Path:
    """Export a run's adapters as ``fmt`` into ``out`` (atomically; never overwrites).

    Args:
      run_dir: a run directory (``config.toml`` + ``checkpoints/``); ignored with ``pieces``.
      fmt: "peft" (a folder for ``peft.PeftModel.from_pretrained``) or "merged" (a Hugging
        Face model folder with the adapters merged in).
      out: the output folder; must not exist or be empty.
      dtype: merged weights dtype, "float32" or "bfloat16".
      step: which checkpoint: "best", "latest" or a step number.
      pieces: the base/adapters/spec explicitly (skips reading ``run_dir``).

    Raises:
      CheckpointError: unknown format, ``out`` not empty, no or damaged checkpoint, a base that
        differs from the run's, or a PiSSA / LoftQ run exported as PEFT (its base is not the
        checkpoint's).
    """
    if fmt not in FORMATS:
        raise CheckpointError(f"export: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not empty; refusing to overwrite")
    if pieces is None:
        if run_dir is None:
            raise CheckpointError("export: give a run directory or the pieces")
        from jaxlora import train

        o = train.open_run(run_dir, step)  # the base is verified against checkpoints/base.json
        pieces = RunPieces(o.loaded.config, o.base, o.adapters, o.loaded.tokenizer, o.spec,
                           o.config.model.name, o.step)
    if fmt == "peft":
        if pieces.spec.init in ("pissa", "loftq"):
            what = {"pissa": "PiSSA run's adapters only fit its residual base",
                    "loftq": "LoftQ run's adapters only fit its LoftQ-quantized base"}
            raise CheckpointError(f"export: a {what[pieces.spec.init]}; export it 'merged'")
        from jaxlora.io.peft import save_peft

        with atomic_dir(out) as tmp:
            save_peft(tmp, pieces.adapters, pieces.spec, base_model_name=pieces.model_name,
                      arch=pieces.model_config)
        return out
    return export_merged(out, pieces.model_config, pieces.base, pieces.adapters,
                         pieces.tokenizer, dtype=dtype)
