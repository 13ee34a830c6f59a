"""Generate the bitsandbytes reference fixtures ``tests/data/bnb_*.npz``.

NOT run by the tests (they only read the .npz). Needs a scratch virtualenv with torch (CPU)
and bitsandbytes 0.50 -- never the project's venv:

    /tmp/scratch/bin/python tests/data/make_bnb_fixtures.py

For each input (a random N(0,1) matrix spanning two 256-blocks of absmax, an odd-sized matrix
with a partial last block, and a block whose values sit exactly on the code midpoints) and
each of nf4/fp4 x (double quant off/on) at block size 64, it stores bitsandbytes'
``quantize_4bit`` packed codes, absmax, and under double quant the offset, nested absmax and
the quantized absmax codes, plus ``dequantize_4bit`` of the small inputs and one serialized
``Linear4bit``-style quant state (``QuantState.as_dict(packed=True)``).

``--check-linear4bit OURS.npz`` instead loads state dicts written by
``jaxlora.io.bnb.to_bnb_state_dict`` into ``bnb.nn.Linear4bit`` modules (through
``Params4bit.from_prequantized``, as transformers does) and checks that bitsandbytes'
dequantized weight and forward pass agree with jaxlora's. Write OURS.npz with the project venv:

    .venv/bin/python -c "import numpy as np; from jaxlora.quant import quantize, dequantize; \
    from jaxlora.io.bnb import to_bnb_state_dict as t; k = np.random.default_rng(1).standard_normal( \
    (96, 160)).astype('float32') * .05; o = {}; \
    [o.update({f'{q}{int(d)}|{n}': v for n, v in t(quantize(k.T, q, 64, d)).items()} | \
    {f'{q}{int(d)}|ours': np.asarray(dequantize(quantize(k.T, q, 64, d)))}) \
    for q in ('nf4', 'fp4') for d in (True, False)]; np.savez('/tmp/ours_sd.npz', kernel=k, **o)"
    /tmp/scratch/bin/python tests/data/make_bnb_fixtures.py --check-linear4bit /tmp/ours_sd.npz
"""

import os

import bitsandbytes as bnb
import bitsandbytes.functional as F
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20231)
    big = rng.standard_normal((64, 320)).astype(np.float32)  # 320 blocks: 2 nested blocks
    odd = (rng.standard_normal((33, 65)) * 0.02).astype(np.float32)  # 2145: partial, odd
    nf4 = F.get_4bit_type("nf4", device="cpu").numpy()
    mids = ((nf4[:-1] + nf4[1:]) / np.float32(2)).astype(np.float32)
    ties = np.zeros(128, np.float32)
    ties[0] = 1.0
    ties[1:16] = mids
    ties[16:31] = -mids
    ties[64] = -1.0
    fp4 = np.sort(F.get_4bit_type("fp4", device="cpu").numpy())
    fm = ((fp4[:-1] + fp4[1:]) / np.float32(2)).astype(np.float32)
    ties[65 : 65 + fm.size] = fm
    return {"big": big, "odd": odd, "ties": ties.reshape(2, 64)}


def main() -> None:
    out: dict[str, np.ndarray] = {}
    for name, x in inputs().items():
        out[f"{name}/x"] = x
        t = torch.from_numpy(x)
        for qt in ("nf4", "fp4"):
            for dq in (False, True):
                key = f"{name}/{qt}/{'dq' if dq else 'nodq'}"
                q, s = F.quantize_4bit(t, blocksize=64, quant_type=qt, compress_statistics=dq)
                out[f"{key}/codes"] = q.numpy().reshape(-1)
                out[f"{key}/absmax"] = s.absmax.numpy()
                if dq:
                    out[f"{key}/offset"] = np.float32(s.offset.item())
                    out[f"{key}/nested_absmax"] = s.state2.absmax.numpy()
                    out[f"{key}/nested_code"] = s.state2.code.numpy()
                if name != "big":
                    out[f"{key}/deq"] = F.dequantize_4bit(q, s).numpy()
    # one serialized quant state, as a Linear4bit state dict stores it
    q, s = F.quantize_4bit(
        torch.from_numpy(out["odd/x"]), blocksize=64, quant_type="nf4", compress_statistics=True
    )
    out["sd/weight"] = q.numpy()
    for k, v in s.as_dict(packed=True).items():
        out[f"sd/weight.{k}"] = v.numpy()
    out["version"] = np.array(bnb.__version__)
    path = os.path.join(HERE, "bnb_quantize_4bit.npz")
    np.savez_compressed(path, **out)
    print(path, os.path.getsize(path), "bytes;", sorted(k for k in out if k.startswith("sd/")))


def check_linear4bit(path: str) -> None:
    """Load jaxlora-written state dicts into Linear4bit; compare weights and outputs."""
    f = np.load(path)
    din, dout = f["kernel"].shape  # jaxlora kernel [in, out]; torch weight [out, in]
    for tag in ("nf41", "nf40", "fp41", "fp40"):
        sd = {
            k.split("|", 1)[1]: torch.from_numpy(f[k].copy())
            for k in f.files
            if k.startswith(tag + "|") and not k.endswith("|ours")
        }
        lin = bnb.nn.Linear4bit(din, dout, bias=False, quant_type=tag[:3])
        stats = {k[len("weight.") :]: v for k, v in sd.items() if k != "weight"}
        lin.weight = bnb.nn.Params4bit.from_prequantized(
            data=sd["weight"], quantized_stats=stats, requires_grad=False, device="cpu"
        )
        w = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state).numpy()
        x = torch.randn(3, din)
        y = lin(x).detach().numpy()
        ours = f[tag + "|ours"]
        print(
            tag,
            "max |bnb dequant - jaxlora dequant| =",
            float(np.abs(w - ours).max()),
            "; max |Linear4bit(x) - x @ W_jaxlora.T| =",
            float(np.abs(y - x.numpy() @ ours.T).max()),
        )
        assert np.array_equal(w, ours)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--check-linear4bit":
        check_linear4bit(sys.argv[2])
    else:
        main()
