"""Hugging Face PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

Saves jaxlora adapters so that ``peft.PeftModel.from_pretrained(hf_model, folder)`` gives the
same outputs, and loads PEFT LoRA adapters back into an `Adapters` tree.

Layout facts (PEFT, huggingface/peft):

* keys ``base_model.model.<module>.lora_A.weight`` with shape ``(r, in)`` and
  ``base_model.model.<module>.lora_B.weight`` with shape ``(out, r)`` (torch layout), where
  ``<module>`` is e.g. ``model.layers.3.self_attn.q_proj`` (Llama) or
  ``transformer.h.3.attn.c_attn`` (GPT-2);
* jaxlora stacks layers: ``a [L, in, r]``, ``b [L, r, out]``, so saving un-stacks the leading
  axis and transposes (``lora_A = a[i].T``, ``lora_B = b[i].T``);
* GPT-2 uses ``Conv1D`` modules whose weight is ``(in, out)``; PEFT handles them with
  ``fan_in_fan_out=True`` but the lora_A / lora_B shapes are the same as for ``Linear``;
* the scale is ``lora_alpha / r`` or, with ``use_rslora``, ``lora_alpha / sqrt(r)``; per-module
  ranks/alphas go in ``rank_pattern`` / ``alpha_pattern`` (keys matched as a suffix of the
  module name).

DoRA adapters (``use_dora``) add ``<module>.lora_magnitude_vector``, shape ``(out,)``: PEFT's
``get_peft_model_state_dict`` drops the adapter name and the ``.weight`` of the
``DoraLinearLayer`` holding it; both spellings are read.

Embedding-table adapters are refused: jaxlora's tied LM head applies the embedding adapter to
the output projection too, which PEFT's ``lora_embedding_A/B`` does not, so outputs would differ.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora import lora, models
from jaxlora.errors import CheckpointError
from jaxlora.models import Family

__all__ = ["save_peft", "load_peft", "peft_module_names", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."

def _family(arch: Any) -> Family:
    """The family record of ``arch`` ("llama" | "gemma3" | "gpt2" or a ModelConfig)."""
    try:
        return models.family(arch)
    except ValueError:
        name = getattr(arch, "arch", arch)
        raise CheckpointError(
            f"PEFT: unsupported architecture {name!r} (have {sorted(models.FAMILIES)})") from None


def peft_module_names(arch: Any) -> dict[str, str]:
    """jaxlora leaf path -> HF module name template (``{i}`` = layer index) for ``arch``."""
    return {p: t for p, (t, _) in _family(arch).peft_modules().items()}


def _safetensors():
    try:
        from safetensors.numpy import load_file, save_file
    except ImportError as e:  # pragma: no cover - declared dependency
        raise CheckpointError("PEFT files need the 'safetensors' package") from e
    return load_file, save_file


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _rslora_of(spec_or_info: Any) -> bool:
    if spec_or_info is None:
        return False
    if isinstance(spec_or_info, lora.LoraSpec):
        return spec_or_info.scaling == "rslora"
    if isinstance(spec_or_info, dict):
        if "use_rslora" in spec_or_info:
            return bool(spec_or_info["use_rslora"])
        return spec_or_info.get("scaling", "standard") == "rslora"
    raise CheckpointError(f"save_peft: spec_or_info must be a LoraSpec or a dict, got {type(spec_or_info).__name__}")


def save_peft(
    folder: str | os.PathLike,
    adapters: lora.Adapters,
    spec_or_info: Any = None,
    base_model_name: str | None = None,
    arch: Any = "llama",
) -> Path:
    """Write ``adapters`` as a PEFT LoRA folder (config + safetensors).

    Args:
      folder: output directory (created; existing PEFT files in it are replaced).
      adapters: jaxlora adapters; only linear kernels listed in `peft_module_names` are allowed.
      spec_or_info: the `lora.LoraSpec` used (or a dict with ``scaling``/``use_rslora``), to
        know whether the scale is rsLoRA. Rank, alpha and dropout are read from the adapters
        themselves (``alpha = scale * r`` or ``scale * sqrt(r)``).
      base_model_name: written as ``base_model_name_or_path``.
      arch: "llama" | "gemma3" | "gpt2" or a ModelConfig.

    Returns:
      The folder path.

    Raises:
      CheckpointError: an adapter path that has no PEFT module name.
    """
    fam = _family(arch)
    name, table = fam.arch, fam.peft_modules()
    rslora = _rslora_of(spec_or_info)
    _, save_file = _safetensors()

    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts = set()
    flat = lora.flatten_paths(adapters)
    dora = {p for p, pair in flat.items() if pair.m is not None}
    if dora and dora != set(flat):
        raise CheckpointError(f"save_peft: DoRA on {sorted(dora)[0]!r} but not on "
                              f"{sorted(set(flat) - dora)[0]!r}; PEFT's use_dora is one switch")
    for path, pair in sorted(flat.items()):
        if path not in table:
            raise CheckpointError(
                f"save_peft: adapter {path!r} has no PEFT module name for arch {name!r} "
                f"(supported: {', '.join(table)})"
            )
        template, short = table[path]
        a = np.asarray(pair.a, dtype=np.asarray(pair.a).dtype)
        b = np.asarray(pair.b)
        r = int(a.shape[-1])
        n_lead = 1 if path.startswith("layers/") else 0
        if a.ndim != n_lead + 2:
            raise CheckpointError(f"save_peft: adapter {path!r}: a has shape {a.shape}, expected {n_lead + 2} axes")
        b = b.reshape(*b.shape[: n_lead + 1], -1)  # [*lead, r, out]
        ranks[short] = r
        alphas[short] = pair.scale * (math.sqrt(r) if rslora else r)
        dropouts.add(float(pair.dropout))
        layers = range(a.shape[0]) if n_lead else [None]
        for i in layers:
            ai = a[i] if i is not None else a  # [in, r]
            bi = b[i] if i is not None else b  # [r, out]
            module = template.format(i=i)
            tensors[f"{_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(ai.T)  # (r, in)
            tensors[f"{_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(bi.T)  # (out, r)
            if pair.m is not None:
                m = np.asarray(pair.m)
                mi = (m[i] if i is not None else m).reshape(-1)  # [out]
                tensors[f"{_PREFIX}{module}.{_MAGNITUDE}"] = np.ascontiguousarray(mi)
    if not tensors:
        raise CheckpointError("save_peft: the adapter tree is empty")

    config = _peft_config(ranks, alphas, dropouts, rslora, fam.hf_kernels_in_out, base_model_name,
                          bool(dora))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _peft_config(ranks: dict[str, int], alphas: dict[str, float], dropouts: set[float],
                 rslora: bool, fan_in_fan_out: bool, base_model_name: str | None,
                 use_dora: bool) -> dict[str, Any]:
    """``adapter_config.json``: the most common rank / alpha, the others as patterns."""
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(round(v, 9) for v in alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": r0,
        "lora_alpha": _num(a0),
        "use_rslora": rslora,
        "target_modules": sorted(ranks),
        "rank_pattern": {k: v for k, v in sorted(ranks.items()) if v != r0},
        "alpha_pattern": {k: _num(v) for k, v in sorted(alphas.items()) if round(v, 9) != a0},
        "lora_dropout": max(dropouts) if dropouts else 0.0,
        "fan_in_fan_out": fan_in_fan_out,  # GPT-2's Conv1D stores (in, out)
        "bias": "none",
        "use_dora": use_dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "inference_mode": True,
        "revision": None,
    }


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module name as a dotted suffix (regex allowed)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], Path]:
    """(adapter config, tensors, weights path) of a PEFT folder, its options checked."""
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: not found (a PEFT adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("bias", "none") not in ("none", None):
        raise CheckpointError(f"{cfg_path}: bias={cfg.get('bias')!r} is not supported")
    if cfg.get("modules_to_save"):
        raise CheckpointError(f"{cfg_path}: modules_to_save={cfg['modules_to_save']!r} is not supported")
    load_file, _ = _safetensors()
    try:
        tensors = load_file(str(w_path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{w_path}: unreadable ({type(e).__name__}: {e})") from e
    if not tensors:
        raise CheckpointError(f"{w_path}: contains no tensors")
    return cfg, tensors, w_path


_Found = dict[str, dict[int | None, dict[str, np.ndarray]]]  # path -> layer -> "A"/"B"/"M" -> tensor
_MAGNITUDE = "lora_magnitude_vector"


def _group_by_module(tensors: dict[str, np.ndarray], table: dict[str, tuple[str, str]],
                     w_path: Path, arch: str) -> _Found:
    """Sort PEFT keys into jaxlora paths and layers; a key of no module is an error."""
    matchers = []  # HF module regex -> jaxlora path
    for path, (template, _) in table.items():
        rx = re.escape(template).replace(re.escape("{i}"), r"(\d+)")
        matchers.append((re.compile(rf"^{rx}\.(?:lora_(A|B)\.weight|{_MAGNITUDE}(?:\.weight)?)$"), path))
    found: _Found = {}
    unmapped = []
    for key, value in tensors.items():
        module_key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        module_key = module_key.replace(".default.weight", ".weight")  # keys saved with adapter name
        for rx, path in matchers:
            m = rx.match(module_key)
            if m:
                layer = int(m.group(1)) if rx.groups == 2 else None
                found.setdefault(path, {}).setdefault(layer, {})[m.group(rx.groups) or "M"] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(
            f"{w_path}: {len(unmapped)} keys do not map to a {arch} model (another architecture?), "
            f"e.g. {', '.join(sorted(unmapped)[:3])}"
        )
    return found


def _check_layers(per_layer: dict[int | None, dict[str, np.ndarray]], template: str,
                  n_layers: int | None, w_path: Path, dora: bool) -> list[int | None]:
    """The layer ids the base has; every one must have lora_A and lora_B (and with DoRA its
    magnitude), no others."""
    layer_ids = list(range(n_layers)) if n_layers is not None else [None]
    names = {"A": "lora_A.weight", "B": "lora_B.weight", **({"M": _MAGNITUDE} if dora else {})}
    missing = []
    for i in layer_ids:
        for key, name in names.items():
            if key not in per_layer.get(i, {}):
                missing.append(f"{_PREFIX}{template.format(i=i)}.{name}")
        if not dora and "M" in per_layer.get(i, {}):
            raise CheckpointError(f"{w_path}: {template.format(i=i)}.{_MAGNITUDE} but the "
                                  "adapter config has no use_dora")
    extra = [i for i in per_layer if i not in layer_ids]
    if extra:
        raise CheckpointError(
            f"{w_path}: {template.format(i=extra[0])} is beyond the base's {n_layers} layers"
        )
    if missing:
        raise CheckpointError(f"{w_path}: missing keys: {', '.join(missing[:4])}"
                              + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""))
    return layer_ids


def _module_pair(path: str, per_layer: dict[int | None, dict[str, np.ndarray]], template: str,
                 wshape: tuple[int, ...], cfg: dict[str, Any], w_path: Path,
                 dtype: Any) -> lora.LoraPair:
    """One module's stacked `LoraPair` from its per-layer PEFT tensors (shapes checked)."""
    stacked = path.startswith("layers/")
    dora = bool(cfg.get("use_dora", False))
    layer_ids = _check_layers(per_layer, template, wshape[0] if stacked else None, w_path, dora)
    rank_pat = dict(cfg.get("rank_pattern") or {})
    r_default = int(cfg.get("r", 8))
    d_in = wshape[1] if stacked else wshape[0]
    out_axes = wshape[2:] if stacked else wshape[1:]
    d_out = int(np.prod(out_axes))
    a_list, b_list, m_list = [], [], []
    r = None
    for i in layer_ids:
        ta, tb = per_layer[i]["A"], per_layer[i]["B"]
        module = template.format(i=i)
        r_i = int(ta.shape[0]) if ta.ndim == 2 else -1
        if r is None:
            r = r_i
        exp_rank = int(_pattern_value(rank_pat, module, r_default))
        for key_ab, t, expect in (("lora_A", ta, (exp_rank, d_in)), ("lora_B", tb, (d_out, exp_rank))):
            if tuple(t.shape) != expect:
                raise CheckpointError(
                    f"{w_path}: {_PREFIX}{module}.{key_ab}.weight has shape {tuple(t.shape)}, "
                    f"expected {expect} for base {path} {list(wshape)} with r={exp_rank}"
                )
        a_list.append(np.asarray(ta, np.float32).T)  # [in, r]
        b_list.append(np.asarray(tb, np.float32).T.reshape(r_i, *out_axes))  # [r, *out]
        if dora:
            tm = per_layer[i]["M"]
            if tuple(tm.shape) != (d_out,):
                raise CheckpointError(f"{w_path}: {_PREFIX}{module}.{_MAGNITUDE} has shape "
                                      f"{tuple(tm.shape)}, expected ({d_out},) for base {path}")
            m_list.append(np.asarray(tm, np.float32).reshape(out_axes))  # [*out]
    alpha_pat = dict(cfg.get("alpha_pattern") or {})
    alpha = float(_pattern_value(alpha_pat, template.format(i=0), float(cfg.get("lora_alpha", 8))))
    rslora = bool(cfg.get("use_rslora", False))
    scale = lora.lora_scale(alpha, r, "rslora" if rslora else "standard")
    a = np.stack(a_list) if stacked else a_list[0]
    b = np.stack(b_list) if stacked else b_list[0]
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    m = None
    if dora:
        m = jnp.asarray(np.stack(m_list) if stacked else m_list[0], dtype)
    return lora.LoraPair(jnp.asarray(a, dtype), jnp.asarray(b, dtype), scale=scale, dropout=dropout,
                         m=m)


def load_peft(
    folder: str | os.PathLike,
    base_params: lora.Params,
    arch: Any = "llama",
    *,
    dtype: Any = jnp.float32,
) -> lora.Adapters:
    """Load a PEFT LoRA folder into jaxlora adapters that fit ``base_params``.

    Args:
      folder: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      base_params: the base Params (Array or QTensor leaves; only shapes are read).
      arch: "llama" | "gemma3" | "gpt2" or a ModelConfig.
      dtype: adapter dtype.

    Returns:
      Adapters with stacked ``LoraPair(a [L, in, r], b [L, r, out], scale, dropout)`` leaves
      (with ``use_dora``: and ``m [L, out]``).

    Raises:
      CheckpointError: missing files, unsupported PEFT options (biases, ...), keys that do
        not map to this architecture, missing keys (named), or tensors whose shapes do not fit
        the base (named, expected vs got).
    """
    fam = _family(arch)
    cfg, tensors, w_path = _read_folder(Path(folder))
    table = fam.peft_modules()
    found = _group_by_module(tensors, table, w_path, fam.arch)
    flat_base = lora.flatten_paths(base_params)

    # Modules named in target_modules (a list) must be present.
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for path, (template, short) in table.items():
            if any(("." + template).endswith("." + t) for t in targets) and path not in found:
                if path in flat_base:
                    raise CheckpointError(
                        f"{w_path}: missing keys for target module {short!r}, e.g. "
                        f"{_PREFIX}{template.format(i=0)}.lora_A.weight"
                    )

    out: dict[str, lora.LoraPair] = {}
    for path, per_layer in sorted(found.items()):
        template, _ = table[path]
        if path not in flat_base:
            raise CheckpointError(f"{w_path}: adapter for {template} but the base has no {path}")
        out[path] = _module_pair(path, per_layer, template, tuple(flat_base[path].shape), cfg,
                                 w_path, dtype)
    adapters = lora.unflatten_paths(out)
    try:
        lora.check_fit(base_params, adapters)
    except ValueError as e:
        raise CheckpointError(f"{w_path}: {e}") from e
    return adapters
