"""Tests for jaxlora.lora.spec: LoraSpec, scales, target selection, geometry, bad inputs."""

import math

import jax
import pytest
from lora_helpers import QV, tiny_base

from jaxlora import lora
from jaxlora.lora import LoraPair, LoraSpec


def test_scale_standard_vs_rslora_and_patterns():
    base = tiny_base()
    spec = LoraSpec(
        rank=8,
        alpha=16.0,
        targets=("q_proj", "v_proj", "up_proj"),
        rank_pattern={r"v_proj": 4, r"proj": 2},  # first match wins
        alpha_pattern=[(r"up_proj", 1.0)],
    )
    ad = lora.init(jax.random.PRNGKey(0), base, spec)
    q, v = ad["layers"]["attn"]["q_proj"]["kernel"], ad["layers"]["attn"]["v_proj"]["kernel"]
    up = ad["layers"]["mlp"]["up_proj"]["kernel"]
    assert (q.rank, v.rank, up.rank) == (2, 4, 2)
    assert (q.scale, v.scale, up.scale) == (8.0, 4.0, 0.5)
    rs = lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=8, alpha=16.0, scaling="rslora", targets=QV))
    assert rs["layers"]["attn"]["q_proj"]["kernel"].scale == 16.0 / math.sqrt(8)
    assert lora.lora_scale(16.0, 8) == 2.0
    assert hash(spec) == hash(LoraSpec(**{f: getattr(spec, f) for f in spec.__dataclass_fields__}))


def test_target_forms():
    base = tiny_base()
    paths = lambda **kw: lora.resolve_targets(base, LoraSpec(**kw))
    all_linear = paths(targets="all-linear")
    assert all_linear == sorted(
        f"layers/{m}/kernel"
        for m in ["attn/q_proj", "attn/v_proj", "attn/o_proj", "mlp/up_proj", "mlp/down_proj"]
    )
    assert paths(targets=r"attn/(q|o)_proj") == [
        "layers/attn/o_proj/kernel",
        "layers/attn/q_proj/kernel",
    ]
    assert paths(targets="all-linear", exclude=["mlp"]) == [
        "layers/attn/o_proj/kernel",
        "layers/attn/q_proj/kernel",
        "layers/attn/v_proj/kernel",
    ]
    assert paths(targets=["embed", "lm_head"]) == ["embed/embedding", "lm_head/kernel"]


def test_bad_inputs():
    base = tiny_base()
    with pytest.raises(ValueError, match=r"'q_prj'.*q_proj"):
        lora.init(jax.random.PRNGKey(0), base, LoraSpec(targets=("q_prj",)))
    with pytest.raises(ValueError, match="match no adaptable"):
        lora.init(jax.random.PRNGKey(0), base, LoraSpec(targets=r"^nothing/"))
    with pytest.raises(ValueError, match="exceeds min"):
        lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=65, targets=QV))
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match="rank_pattern"):
        LoraSpec(rank_pattern={"q": -1})
    with pytest.raises(ValueError, match="alpha"):
        LoraSpec(alpha=0.0)
    with pytest.raises(ValueError, match="scaling"):
        LoraSpec(scaling="fancy")
    with pytest.raises(ValueError, match="exclude"):
        lora.resolve_targets(base, LoraSpec(targets=("q_proj",), exclude=("attn",)))
    ad = lora.init(jax.random.PRNGKey(0), base, LoraSpec(rank=4, targets=QV))
    bad = jax.tree.map(lambda x: x, ad)
    pair = bad["layers"]["attn"]["q_proj"]["kernel"]
    bad["layers"]["attn"]["q_proj"]["kernel"] = LoraPair(pair.a, pair.b[:, :, :-1], scale=1.0)
    with pytest.raises(ValueError, match="layers/attn/q_proj/kernel.*does not fit"):
        lora.attach(base, bad)
    with pytest.raises(ValueError, match="does not fit"):
        lora.merge(base, bad)
    moved = {"layers": {"attn": {"k_proj": {"kernel": pair}}}}
    with pytest.raises(ValueError, match="not in the base"):
        lora.check_fit(base, moved)


def test_leaf_geometry_is_what_init_builds():
    """The public geometry (stacked axes, in, out axes, rank, scale) is the shape `init` gives."""
    base = tiny_base()
    spec = LoraSpec(
        rank=8,
        alpha=16.0,
        scaling="rslora",
        targets=("q_proj", "up_proj"),
        rank_pattern={"up_proj": 4},
    )
    ad = lora.flatten_paths(lora.init(jax.random.PRNGKey(0), base, spec))
    for path, w in lora.flatten_paths(base).items():
        if path not in ad:
            continue
        g = lora.leaf_geometry(path, tuple(w.shape), spec)
        pair = ad[path]
        assert pair.a.shape == (*g.lead, g.d_in, g.rank)
        assert pair.b.shape == (*g.lead, g.rank, *g.out)
        assert pair.scale == g.scale == lora.lora_scale(16.0, g.rank, "rslora")
    up = lora.leaf_geometry("layers/mlp/up_proj/kernel", (2, 64, 128), spec)
    assert up == ((2,), 64, (128,), 4, 16.0 / math.sqrt(4))
    with pytest.raises(ValueError, match="exceeds min"):
        lora.leaf_geometry("lm_head/kernel", (64, 3), spec)


def test_check_ranks_names_every_narrow_layer_and_the_largest_rank():
    """tiny-llama: k/v project 64 -> 32, the rest are at least 64 wide. Rank 48 fits q, o and
    the MLP but not k/v; the error names exactly those two and the limit (32), and a
    rank_pattern cap or an exclusion makes the same spec valid."""
    from jaxlora import io, models, paths

    shapes = models.param_shapes(io.model_config("tiny-llama"))
    tree = paths.unflatten_paths({p: jax.ShapeDtypeStruct(s, "float32") for p, s in shapes.items()})
    with pytest.raises(ValueError) as info:
        lora.check_ranks(tree, LoraSpec(rank=48))
    msg = str(info.value)
    assert "\n" not in msg and "2 targeted layer(s)" in msg and "is 32" in msg
    assert "layers/attn/k_proj/kernel (rank 48 > 32)" in msg
    assert "layers/attn/v_proj/kernel (rank 48 > 32)" in msg and "q_proj" not in msg
    lora.check_ranks(tree, LoraSpec(rank=48, rank_pattern={"k_proj|v_proj": 32}))
    lora.check_ranks(tree, LoraSpec(rank=48, exclude=("k_proj", "v_proj")))
    lora.check_ranks(tree, LoraSpec(rank=32))  # the limit itself fits
