"""Exchange 4-bit QLoRA base weights with bitsandbytes (PyTorch) as state-dict entries.

QLoRA (Dettmers et al. 2023, arXiv 2305.14314) stores the frozen base in NF4 with double
quantization; bitsandbytes' ``Linear4bit`` serializes it as these keys (for a module prefix
such as ``model.layers.0.self_attn.q_proj.``):

    weight                                  uint8 [(n+1)//2, 1]  packed codes, high nibble first
    weight.absmax                           float32 [nblocks], or uint8 codes under double quant
    weight.quant_map                        float32 [16]   the 4-bit code table
    weight.nested_absmax                    float32 [ceil(nblocks/256)]   (double quant only)
    weight.nested_quant_map                 float32 [256]  signed dynamic map (double quant only)
    weight.quant_state.bitsandbytes__nf4    uint8 [k]      packed JSON: quant_type, blocksize,
                                            dtype, shape, nested_blocksize, nested_dtype,
                                            nested_offset   (``__fp4`` for fp4)

`jaxlora.quant` produces exactly bitsandbytes' codes and statistics (tests/test_bnb.py), so the
conversion is a relabelling of arrays, no requantization.

Layout: a torch ``Linear.weight`` is ``[out, in]`` while a jaxlora kernel is ``[in, out]``.
These functions work on the **torch layout**: pass a `QTensor` quantized from ``kernel.T``
(``quantize(kernel.T)``, item shape ``(out, in)``), and `from_bnb_state_dict` returns one with
item shape ``(out, in)``; ``dequantize(q).T`` is then the jaxlora kernel. (Quantizing the
kernel itself would block it along the other axis and give different codes.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxlora.quant import DYNAMIC_CODE, FP4_CODE, NESTED_BLOCK, NF4_CODE, QTensor

__all__ = ["to_bnb_state_dict", "from_bnb_state_dict", "BNB_BLOCK_SIZES"]

BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
_DTYPES = ("float32", "bfloat16", "float16")


def to_bnb_state_dict(q: QTensor, prefix: str = "") -> dict[str, np.ndarray]:
    """Serialize a torch-layout `QTensor` as bitsandbytes ``Linear4bit`` weight entries.

    Args:
      q: an unbatched nf4/fp4 QTensor (e.g. ``quantize(kernel.T)``), item shape ``(out, in)``.
      prefix: the module prefix, e.g. ``"model.layers.0.self_attn.q_proj."``.
    Returns:
      ``{prefix + "weight": uint8 [(n+1)//2, 1], prefix + "weight.absmax": ..., ...}`` as numpy
      arrays (``torch.from_numpy`` each, then ``Linear4bit.load_state_dict``).
    """
    where = f"to_bnb_state_dict {prefix!r}"
    if q.qtype not in _TABLES:
        raise ValueError(f"{where}: bitsandbytes stores nf4/fp4 only, got {q.qtype!r}")
    if q.batch_shape:
        raise ValueError(
            f"{where}: expected an unbatched QTensor, got batch dims "
            f"{q.batch_shape}; export each layer separately"
        )
    if q.block_size not in BNB_BLOCK_SIZES:
        raise ValueError(f"{where}: block_size {q.block_size} is not one bitsandbytes supports")
    w = prefix + "weight"
    meta = {
        "quant_type": q.qtype,
        "blocksize": q.block_size,
        "dtype": q.orig_dtype,
        "shape": list(q.item_shape),
    }
    sd = {
        w: np.asarray(q.codes, np.uint8).reshape(-1, 1),
        f"{w}.absmax": np.asarray(q.absmax),
        f"{w}.quant_map": _TABLES[q.qtype].copy(),
    }
    if q.double_quant:
        sd[f"{w}.nested_absmax"] = np.asarray(q.nested_absmax, np.float32)
        sd[f"{w}.nested_quant_map"] = DYNAMIC_CODE.copy()
        meta.update(
            nested_blocksize=NESTED_BLOCK,
            nested_dtype="float32",
            nested_offset=float(np.asarray(q.offset, np.float32)),
        )
    packed = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy()
    sd[f"{w}.quant_state.bitsandbytes__{q.qtype}"] = packed
    return sd


def _get(sd: Mapping[str, np.ndarray], key: str, where: str) -> np.ndarray:
    if key not in sd:
        raise ValueError(f"{where}: missing key {key!r}")
    return np.asarray(sd[key])


def from_bnb_state_dict(sd: Mapping[str, np.ndarray], prefix: str = "") -> QTensor:
    """Read bitsandbytes ``Linear4bit`` weight entries into a torch-layout `QTensor`.

    Accepts numpy arrays (convert torch tensors with ``.numpy()``). Returns a QTensor of item
    shape ``(out, in)``; use ``dequantize(q).T`` for the jaxlora ``[in, out]`` kernel.
    Raises ValueError naming the key when an entry is missing or inconsistent, or when the
    quant maps are not the standard bitsandbytes tables (nothing else can be represented).
    """
    w = prefix + "weight"
    where = f"from_bnb_state_dict {w!r}"
    qs_keys = [k for k in sd if k.startswith(f"{w}.quant_state.bitsandbytes__")]
    if len(qs_keys) != 1:
        raise ValueError(
            f"{where}: expected one '{w}.quant_state.bitsandbytes__nf4|fp4' key, found {qs_keys}"
        )
    meta = json.loads(np.asarray(sd[qs_keys[0]], np.uint8).tobytes().decode("utf-8"))
    qtype, block = meta["quant_type"], int(meta["blocksize"])
    if qtype not in _TABLES or block not in BNB_BLOCK_SIZES or meta["dtype"] not in _DTYPES:
        raise ValueError(f"{where}: unsupported quant state {meta}")
    if not np.array_equal(_get(sd, f"{w}.quant_map", where).astype(np.float32), _TABLES[qtype]):
        raise ValueError(f"{where}: quant_map is not bitsandbytes' standard {qtype} table")
    shape = tuple(int(d) for d in meta["shape"])
    n = int(np.prod(shape))
    nblocks = -(-n // block)
    codes = _get(sd, w, where).astype(np.uint8).reshape(-1)
    if codes.size != (n + 1) // 2:
        raise ValueError(f"{where}: {codes.size} packed bytes do not fit shape {shape}")
    absmax = _get(sd, f"{w}.absmax", where)
    if absmax.shape != (nblocks,):
        raise ValueError(f"{where}.absmax: shape {absmax.shape}, expected ({nblocks},)")
    double = "nested_absmax" in meta or f"{w}.nested_absmax" in sd or "nested_offset" in meta
    nested = offset = None
    if double:
        if int(meta.get("nested_blocksize", -1)) != NESTED_BLOCK:
            raise ValueError(
                f"{where}: nested_blocksize {meta.get('nested_blocksize')} is not {NESTED_BLOCK}"
            )
        if not np.array_equal(
            _get(sd, f"{w}.nested_quant_map", where).astype(np.float32), DYNAMIC_CODE
        ):
            raise ValueError(f"{where}: nested_quant_map is not bitsandbytes' dynamic map")
        nested = jnp.asarray(_get(sd, f"{w}.nested_absmax", where).astype(np.float32))
        offset = jnp.asarray(np.float32(meta["nested_offset"]))
        absmax = absmax.astype(np.uint8)
    else:
        absmax = absmax.astype(np.float32)
    return QTensor(
        jnp.asarray(codes),
        jnp.asarray(absmax),
        nested,
        offset,
        shape,
        meta["dtype"],
        qtype,
        block,
        bool(double),
    )
