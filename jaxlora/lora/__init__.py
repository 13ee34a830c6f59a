"""LoRA adapters as a separate pytree, and the one primitive that applies them.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a weight ``W [in, out]`` and learns a
low-rank update ``delta W = A @ B`` with ``A [in, r]``, ``B [r, out]``, scaled by
``s = alpha / r``; rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) uses ``s = alpha / sqrt(r)``
so that learning does not collapse at high rank. PiSSA (Meng et al. 2024, arXiv 2404.02948)
starts the adapters at the top singular directions of ``W``; DoRA (Liu et al. 2024, arXiv
2402.09353, ``LoraSpec.method = "dora"``) learns a magnitude per output column over the
direction of ``W + s A B``.

One module per concept (see ``docs/DESIGN.md``):

* `jaxlora.lora.spec`: `LoraSpec` and target selection. Selection is static: regexes / module
  names over ``/``-joined paths, resolved once outside jit by `resolve_targets`; a target that
  matches nothing is an error that lists the closest paths.
* `jaxlora.lora.primitive`: the leaves (`LoraPair`, `LoraWeight`) and the primitive
  (`linear`, its einsum twin ``primitive.einsum``, `embed`, `attend`, with their custom VJPs),
  `attach` and `check_fit`. The base (``Params``: Array or ``quant.QTensor`` leaves) and the
  adapters (``Adapters``: `LoraPair` leaves at the targeted paths) are two pytrees; only the
  adapters are trained. Model code only calls `linear` / `embed` / `attend` on whatever leaf
  it holds. Stacked leaves (under ``layers/``) carry leading axes ``[*lead, ...]`` on every
  child, so ``lax.scan`` slices them together.
* `jaxlora.lora.adapters`: `init`, `init_pissa` (which changes the base too), `merge`,
  `unmerge`, `summary`.
* `jaxlora.lora.loftq`: LoftQ (Li et al. 2023, arXiv 2310.08659), the quantized base and the
  adapters chosen together while the checkpoint loads (`load_loftq`).
* `jaxlora.lora.nnx`: `nnx_params` / `nnx_bind` run any Flax NNX model on this primitive.

Example::

    spec = LoraSpec(rank=16, alpha=32.0, targets="all-linear")
    adapters = init(jax.random.key(0), base, spec)
    y = model_forward(attach(base, adapters, dropout_key), tokens)  # model calls `linear`

Names are imported from their module on first use (`jaxlora._lazy`), and `spec` imports no
JAX: a config (which holds a `LoraSpec`) is read and checked before JAX is loaded.
"""

from jaxlora import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    {
        "jaxlora.lora.primitive": (
            "Params", "Adapters", "LoraPair", "LoraWeight", "attach", "linear",
            "register_linear", "embed", "attend", "check_fit", "column_norm",
        ),
        "jaxlora.lora.spec": (
            "LoraSpec", "Targets", "METHODS", "LeafGeometry", "resolve_targets", "check_ranks",
            "leaf_geometry", "lora_scale",
        ),
        "jaxlora.lora.adapters": (
            "Summary", "init", "init_pissa", "merge", "unmerge", "dora_norms", "summary",
        ),
        "jaxlora.paths": ("flatten_paths", "unflatten_paths"),
        "jaxlora.lora.nnx": ("nnx_params", "nnx_bind"),
        "jaxlora.lora.loftq": ("load_loftq",),
    },
    submodules=("adapters", "loftq", "nnx", "primitive", "spec"),
)
