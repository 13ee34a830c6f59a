"""jaxlora.config: parsing, validation with key paths, overrides, inheritance, round trip."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from jaxlora import config as C
from jaxlora.config import Config, ConfigError, dump_config, load_config
from jaxlora.errors import JaxloraError
from jaxlora.sharding import ShardingSpec, mesh_sizes

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_CONFIGS = [
    p for p in sorted((REPO / "experiments").glob("*.toml")) if not p.name.endswith("_sweep.toml")
]


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_valid_and_frozen():
    cfg = Config()
    assert C.config_from_dict(C.to_dict(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora.rank = 4  # type: ignore[misc]
    hash(cfg)  # frozen and all-tuple: usable as a dict key / static jit argument


def test_every_field_has_a_doc_and_describe_lists_it():
    text = C.describe()
    for path in C.field_paths():
        cls, f, _ = C._lookup(path)
        assert f.metadata.get("doc"), path
        assert f"`{path.rsplit('.', 1)[-1]}`" in text
    for sec in C.SECTIONS:
        assert f"## [{sec}]" in text
    assert '"nf4" \\| "fp4"' in text  # choices listed, pipes escaped for Markdown


def test_there_are_experiment_configs():
    assert EXPERIMENT_CONFIGS, "experiments/ holds no run config"


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_experiment_configs_parse_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert load_config(write(tmp_path, dump_config(cfg), "resolved.toml")) == cfg


def test_load_sets_fields_and_name_defaults_to_stem(tmp_path):
    p = write(
        tmp_path,
        """
[lora]
rank = 4
alpha = 8          # an integer where a float is expected is fine
targets = ["q_proj", "v_proj"]
rank_pattern = { "attn/q_proj" = 16, "mlp/.*" = 2 }
[data]
sources = "corpus.txt"  # a single string where a list is expected is fine
[sharding]
mesh = { data = -1 }
""",
        "my_run.toml",
    )
    cfg = load_config(p)
    assert cfg.name == "my_run"
    assert cfg.lora.rank == 4 and cfg.lora.alpha == 8.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.lora.targets == ("q_proj", "v_proj")  # module names
    assert cfg.data.sources == ("corpus.txt",)
    assert load_config(p, ["lora.targets=attn/(q|v)_proj"]).lora.targets == "attn/(q|v)_proj"
    assert dict(cfg.lora.rank_pattern) == {"attn/q_proj": 16, "mlp/.*": 2}
    assert list(dict(cfg.lora.rank_pattern)) == ["attn/q_proj", "mlp/.*"]  # order kept
    assert cfg.sharding.mesh == (("data", -1),)  # a table read as (key, value) pairs
    assert cfg.run_dir == Path("runs/my_run")


def test_round_trip_dump_load(tmp_path):
    p = write(
        tmp_path,
        r"""
name = "weird \"name\" ü"
[lora]
rank = 32
scaling = "rslora"
targets = "layers/.*/(q|v)_proj/kernel$"
exclude = ["o_proj"]
rank_pattern = { "a.b|c" = 3 }
alpha_pattern = { "x" = 0.5 }
[data]
sources = ["a b.txt", "stdlib:json/*.py", "tab\there"]
[optim]
lr = 1e-5
eps = 1e-12
[eval]
samples = ["line1\nline2", "quote \" and backslash \\"]
""",
    )
    cfg = load_config(p)
    text = dump_config(cfg)
    again = write(tmp_path, text, "dumped.toml")
    assert load_config(again) == cfg
    assert load_config(write(tmp_path, dump_config(cfg, comments=False), "plain.toml")) == cfg
    # the dump holds every field, not only the ones set
    raw = tomllib.loads(text)
    for path in C.field_paths():
        node = raw
        for part in path.split("."):
            node = node[part]
    assert C.config_hash(load_config(again)) == C.config_hash(cfg)


def test_overrides_strings_and_mapping(tmp_path):
    p = write(tmp_path, "[lora]\nrank = 4\n")
    cfg = load_config(
        p,
        [
            "lora.rank=32",
            "model.name=tiny-llama",
            'lora.targets=["q_proj"]',
            "quant.double_quant=false",
            "lora.rank_pattern.q_proj=2",
            "sharding.mesh.data=-1",
            "name=x",
        ],
    )
    assert cfg.lora.rank == 32
    assert cfg.model.name == "tiny-llama"  # not a TOML literal: kept as a string
    assert cfg.lora.targets == ("q_proj",)
    assert cfg.quant.double_quant is False
    assert dict(cfg.lora.rank_pattern) == {"q_proj": 2}
    assert dict(cfg.sharding.mesh) == {"data": -1}
    assert cfg.name == "x"
    assert load_config(p, {"optim.lr": 1e-3}).optim.lr == 1e-3
    assert C.apply_overrides(cfg, ["lora.rank=2"]).lora.rank == 2
    assert C.parse_override("optim.lr = 3e-4") == ("optim.lr", 3e-4)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        C.parse_override("lora.rank")


def test_base_inheritance(tmp_path):
    (tmp_path / "sub").mkdir()
    write(
        tmp_path,
        'name = "parent"\n[lora]\nrank = 4\nalpha = 4.0\n[optim]\nlr = 1e-3\n',
        "parent.toml",
    )
    child = write(tmp_path, 'base = "../parent.toml"\n[lora]\nrank = 16\n', "sub/child.toml")
    cfg = load_config(child)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr, cfg.name) == (16, 4.0, 1e-3, "parent")
    # overrides win over both files
    assert load_config(child, ["lora.alpha=1"]).lora.alpha == 1.0


def test_base_cycle(tmp_path):
    write(tmp_path, 'base = "b.toml"\n', "a.toml")
    write(tmp_path, 'base = "a.toml"\n', "b.toml")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.toml")


BAD_CASES = [
    # (toml text, overrides, substrings the message must contain)
    ("[lora]\nrnak = 4\n", (), ["lora.rnak", "did you mean 'lora.rank'"]),
    ("[lroa]\nrank = 4\n", (), ["'lroa'", "did you mean 'lora'"]),
    ("[lora]\nlr = 1e-3\n", (), ["lora.lr", "optim.lr"]),  # right name, wrong section
    ('[lora]\nrank = "8"\n', (), ["lora.rank", "expected an integer"]),
    ("[lora]\nrank = 8.0\n", (), ["lora.rank", "expected an integer"]),
    ("[lora]\nrank = true\n", (), ["lora.rank", "expected an integer"]),
    ("[lora]\nrank = -1\n", (), ["lora.rank", ">= 1"]),
    ("[lora]\nrank = 0\n", (), ["lora.rank", ">= 1"]),
    ('[lora]\nscaling = "rs"\n', (), ["lora.scaling", "'rs'", "'rslora'"]),
    ("[lora]\ndropout = 1.0\n", (), ["lora.dropout", "< 1"]),
    ('[lora]\ntargets = "("\n', (), ["lora.targets", "invalid regex"]),
    ('[lora]\ntargets = ["all-linear"]\n', (), ["lora.targets", "as a string"]),
    ("[lora]\ntargets = 3\n", (), ["lora.targets", "string or a list"]),
    ('[quant]\ninclude = "["\n', (), ["quant.include", "invalid regex"]),
    ("[lora]\nrank_pattern = { q = 0 }\n", (), ["lora.rank_pattern", "'q'"]),
    ('[lora]\nrank_pattern = { q = "x" }\n', (), ["lora.rank_pattern.q", "expected an integer"]),
    ('[quant]\nqtype = "nf3"\n', (), ["quant.qtype", "'nf3'", "'nf4'"]),
    ("[quant]\nblock_size = 48\n", (), ["quant.block_size", "power of two"]),
    ("[quant]\nblock_size = 16\n", (), ["quant.block_size", "32..4096"]),
    ("[quant]\nblock_size = 8192\n", (), ["quant.block_size"]),
    ("[optim]\nlr = 0\n", (), ["optim.lr", "> 0"]),
    ("[optim]\nlr = -1e-4\n", (), ["optim.lr"]),
    ("[optim]\nlr = nan\n", (), ["optim.lr"]),
    (
        "[optim]\nwarmup_steps = 50\n[train]\nsteps = 10\n",
        (),
        ["optim.warmup_steps", "train.steps"],
    ),
    (  # the default cosine decay needs a step after warmup (optax's schedule refuses none)
        "[optim]\nwarmup_steps = 10\n[train]\nsteps = 10\n",
        (),
        ["optim.warmup_steps", "cosine decay", "train.steps (10)"],
    ),
    ("[data]\nsources = 3\n", (), ["data.sources", "list of strings"]),
    ('[data]\nsources = ["a", 3]\n', (), ["data.sources[1]"]),
    ("[sharding]\nmesh = { data = -1, fsdp = -1 }\n", (), ["sharding.mesh", "at most one"]),
    ("[sharding]\nmesh = { data = 0 }\n", (), ["sharding.mesh"]),
    ("lora = 3\n", (), ["lora", "table"]),
    ("", ["lora.rnak=3"], ["lora.rnak", "lora.rank", "override"]),
    ("", ["lora.rank=-2"], ["override lora.rank", ">= 1"]),
    ("", ["lora.rank=abc"], ["override lora.rank", "expected an integer"]),
    ("", ["quant.qtype=nf5"], ["override quant.qtype", "'nf4'"]),
    ("[sharding]\nmesh = { data = -1, model = 2 }\n", (), ["sharding.mesh", "unknown axis 'model'"]),
    ('[sharding]\nstrategy = "fsdp"\n', (), ["sharding.strategy"]),
    ("", ["sharding.mesh.fsdp=0"], ["sharding.mesh", "size 0"]),
    ('[sharding]\ncoordinator_address = "host"\n', (), ["sharding.coordinator_address", "host:port"]),
]


@pytest.mark.parametrize("text,overrides,needles", BAD_CASES)
def test_bad_input_names_key_path(tmp_path, text, overrides, needles):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p, overrides)
    msg = str(info.value)
    assert str(p) in msg
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert isinstance(info.value, JaxloraError)


def test_missing_file_and_missing_base(tmp_path):
    with pytest.raises(ConfigError, match="not found.*nope.toml"):
        load_config(tmp_path / "nope.toml")
    p = write(tmp_path, 'base = "missing_parent.toml"\n')
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert "base" in str(info.value) and "missing_parent.toml" in str(info.value)


def test_invalid_toml_names_file(tmp_path):
    p = write(tmp_path, "[lora\nrank = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)


def test_config_hash_ignores_name_and_tracks_values():
    a = Config()
    assert C.config_hash(a) == C.config_hash(dataclasses.replace(a, name="other", output_dir="x"))
    b = C.apply_overrides(a, ["lora.rank=9"])
    assert C.config_hash(a) != C.config_hash(b)
    assert len(C.config_hash(a)) == 10


def test_sections_are_the_library_specs():
    """[lora] / [quant] / [data] / [optim] are LoraSpec / QuantRules / DataConfig / OptimSpec."""
    from jaxlora import quant
    from jaxlora.data import DataConfig
    from jaxlora.lora import LoraSpec
    from jaxlora.optim import OptimSpec
    from jaxlora.quant import QuantRules

    specs = {"lora": LoraSpec, "quant": QuantRules, "data": DataConfig, "optim": OptimSpec}
    for sec, cls in specs.items():
        assert C.SECTIONS[sec] is cls
    cfg = Config()
    spec = cfg.lora
    assert (spec.rank, spec.targets, spec.scaling) == (8, "all-linear", "standard")
    assert (cfg.lora, cfg.quant, cfg.data, cfg.optim) == (
        LoraSpec(), QuantRules(), DataConfig(), OptimSpec()  # one default for each field
    )
    qtype = {f.name: f for f in dataclasses.fields(QuantRules)}["qtype"]
    assert qtype.metadata["choices"] == (*quant.QTYPES, "none")  # one list of qtypes
    # fields the config file does not set (stacked-axis rules) are not keys
    assert "lora.stacked" not in C.field_paths() and "quant.stacked" not in C.field_paths()
    with pytest.raises(ConfigError, match="lora.stacked"):
        C.config_from_dict({"lora": {"stacked": {}}})


def test_toml_spellings_of_python_values(tmp_path):
    """0 is TOML's None for data.max_documents; [] is 'exclude nothing' for lora.exclude."""
    cfg = load_config(write(tmp_path, "[data]\nmax_documents = 0\n[lora]\nexclude = []\n"))
    assert cfg.data.max_documents is None and cfg.lora.exclude == ()
    assert C.to_dict(cfg)["data"]["max_documents"] == 0
    assert load_config(write(tmp_path, "[data]\nmax_documents = 3\n")).data.max_documents == 3


def test_sharding_mesh_table_is_the_sharding_spec(tmp_path):
    """[sharding] maps onto sharding.ShardingSpec: axes in any order, sizes kept as written."""
    p = write(tmp_path, '[sharding]\nmesh = { fsdp = 4, data = 2 }\n')
    spec = load_config(p).sharding
    assert spec == ShardingSpec(mesh=(("fsdp", 4), ("data", 2)))
    assert mesh_sizes(spec, 8) == {"members": 1, "data": 2, "fsdp": 4, "tensor": 1}
    assert mesh_sizes(ShardingSpec(), 8) == {"members": 1, "data": 8, "fsdp": 1, "tensor": 1}
    assert mesh_sizes(ShardingSpec(mesh=(("fsdp", -1), ("tensor", 2))), 8)["fsdp"] == 4
    with pytest.raises(ConfigError, match=r"sharding.mesh: \{fsdp=4, data=2\} needs 8 devices, but there are 4"):
        mesh_sizes(spec, 4)
    with pytest.raises(ConfigError, match=r"does not divide the 6 devices"):
        mesh_sizes(ShardingSpec(mesh=(("data", -1), ("fsdp", 4))), 6)


def test_one_check_answers_from_toml_and_from_python(tmp_path):
    """LoraSpec's targets-form check: a field check for the file, __post_init__ for Python."""
    p = write(tmp_path, '[lora]\ntargets = ["q_proj", "all-linear"]\n')
    with pytest.raises(ConfigError, match=r"lora\.targets.*as a string"):
        load_config(p)
    from jaxlora.lora import LoraSpec

    with pytest.raises(ValueError, match="as a string"):  # the same check from Python
        LoraSpec(targets=["q_proj", "all-linear"])


def test_schema_imports_without_jax():
    """The field helper stays jax-free so config errors can later answer without jax."""
    import subprocess
    import sys

    code = "import sys, jaxlora.schema; assert 'jax' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_non_utf8_config_names_the_file(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=rf"{re.escape(str(p))}: not UTF-8 text \(invalid byte at offset 11\)"):
        load_config(p)


def test_config_and_its_specs_import_no_jax():
    """Configs are read and checked without JAX (it costs seconds to import)."""
    import subprocess
    import sys

    code = ("import sys, jaxlora.config, jaxlora.sweep, jaxlora.cli\n"
            "from jaxlora.config import load_config, Config\n"
            "c = Config()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'optax', 'orbax')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).parents[1], timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", p.stdout


def test_remat_policies_are_the_models():
    from jaxlora.config import REMAT_POLICIES
    from jaxlora.models.common import REMAT_POLICIES as MODELS

    assert REMAT_POLICIES == MODELS


def test_warmup_may_fill_a_run_without_decay(tmp_path):
    """A constant schedule's warmup may take every step; the schedule then builds (the
    decaying schedules' limit is one step less, refused above)."""
    from jaxlora import optim

    cfg = load_config(write(tmp_path, '[optim]\nschedule = "constant"\nwarmup_steps = 10\n'
                                      "[train]\nsteps = 10\n"))
    lr = optim.make_schedule(cfg.optim.lr, "constant", cfg.optim.warmup_steps, cfg.train.steps)
    assert float(lr(5)) == pytest.approx(cfg.optim.lr / 2, rel=1e-6)
    assert float(lr(10)) == pytest.approx(cfg.optim.lr, rel=1e-6)
