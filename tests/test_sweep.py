"""jaxlora.sweep: parsing, expansion, the resumable runner, results table and plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from jaxlora.config import Config, ConfigError, load_config
from jaxlora.sweep import STATUS_FILE, expand, load_sweep, run_name, run_sweep

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments").glob("*_sweep.toml"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_sweep(
    tmp_path: Path, body: str, base: str = "[lora]\nrank = 8\n[train]\nsteps = 10\n"
) -> Path:
    (tmp_path / "base.toml").write_text(base)
    p = tmp_path / "sweep.toml"
    p.write_text('base = "base.toml"\n' + body)
    return p


class FakeRun:
    """Pretends to train: writes a loss curve, returns metrics that depend on the config."""

    def __init__(self, fail_on: set[str] = frozenset(), interrupt_at: int | None = None):
        self.calls: list[str] = []
        self.fail_on, self.interrupt_at = fail_on, interrupt_at

    def __call__(self, cfg: Config, run_dir: Path) -> dict:
        self.calls.append(cfg.name)
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if cfg.name in self.fail_on:
            raise RuntimeError(f"boom in {cfg.name}\nsecond line")
        assert run_dir.is_dir() and (run_dir / "config.toml").is_file()
        assert load_config(run_dir / "config.toml") == cfg  # the resolved config is written
        bonus = 0.1 if cfg.lora.scaling == "rslora" else 0.0
        val = 3.0 - 0.2 * cfg.lora.rank**0.5 - bonus
        with (run_dir / "metrics.jsonl").open("w") as fh:
            for step in range(0, cfg.train.steps + 1, 2):
                fh.write(json.dumps({"step": step, "loss": val + 1.0 / (step + 1)}) + "\n")
            for step in (0, cfg.train.steps):
                fh.write(json.dumps({"step": step, "val_loss": val + 1.0 / (step + 1)}) + "\n")
            fh.write('{"step": 99, "lo')  # a line cut short by an interrupt is ignored
        return {
            "train_loss": val - 0.1,
            "val_loss": val,
            "tokens_per_s": 100.0 * cfg.lora.rank,
            "adapter_bytes": 1000 * cfg.lora.rank,
            "not_scalar": [1, 2],
            "name": cfg.name, "model": "/site-packages/x/model.gguf", "qtype": "nf4",
        }


GRID_2x2 = """
[set]
"train.steps" = 6
[grid]
"lora.rank" = [1, 16]
"lora.scaling" = ["standard", "rslora"]
"""


def read_csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_experiment_sweeps_expand(path):
    specs = expand(path)
    assert len(specs) > 1
    assert len({s.name for s in specs}) == len(specs)
    assert len({s.config for s in specs}) == len(specs)  # every run differs
    sweep = load_sweep(path)
    for spec in specs:
        assert spec.config.run_dir.name == spec.name
        for key, value in spec.overrides:
            section, field = key.split(".")
            assert getattr(getattr(spec.config, section), field) == value
        for key, value in sweep.set:
            section, field = key.split(".")
            got = getattr(getattr(spec.config, section), field)
            assert got == (tuple(value) if isinstance(value, list) else value)


def test_there_are_experiment_sweeps():
    names = {p.name for p in SWEEPS}
    assert {"rank_scaling_sweep.toml", "quant_sweep.toml"} <= names


def test_expand_grid_zip_random(tmp_path):
    p = make_sweep(
        tmp_path,
        """
[set]
lora.alpha = 4.0            # nested (unquoted) keys work like "lora.alpha"
[grid]
"lora.scaling" = ["standard", "rslora"]
[zip]
"lora.rank" = [2, 4, 8]
"lora.dropout" = [0.0, 0.1, 0.2]
[random]
n = 2
seed = 3
"optim.lr" = { low = 1e-5, high = 1e-3, log = true }
"train.seed" = [0, 1, 2]
"data.batch_size" = { low = 1, high = 4 }
""",
    )
    specs = expand(p, out_dir=tmp_path / "out")
    assert len(specs) == 2 * 3 * 2
    assert all(s.config.lora.alpha == 4.0 for s in specs)
    for s in specs:
        o = dict(s.overrides)
        assert (o["lora.rank"], o["lora.dropout"]) in {(2, 0.0), (4, 0.1), (8, 0.2)}
        assert 1e-5 <= o["optim.lr"] <= 1e-3 and s.config.optim.lr == o["optim.lr"]
        assert isinstance(o["data.batch_size"], int) and 1 <= o["data.batch_size"] <= 4
        assert s.config.output_dir == str(tmp_path / "out")
    # deterministic: the same file gives the same runs
    assert [s.name for s in expand(p, out_dir=tmp_path / "out")] == [s.name for s in specs]
    assert len({s.name for s in specs}) == len(specs)


def test_run_names():
    assert run_name([("lora.rank", 16), ("lora.scaling", "rslora")]) == "rank-16_scaling-rslora"
    assert run_name([]) == "base"
    same_leaf = run_name([("data.seed", 1), ("train.seed", 2)])
    assert same_leaf == "data.seed-1_train.seed-2"
    long = run_name([("model.name", "x" * 200)])
    assert len(long) <= 80 and long != run_name([("model.name", "x" * 199)])
    assert "/" not in run_name([("model.name", "../../etc/passwd")])
    assert run_name([("optim.lr", 1e30)]) == "lr-1e30"  # not lr-1e-30
    assert run_name([("optim.lr", 1e-30)]) == "lr-1e-30"


SWEEP_ERRORS = [
    ('[grid]\n"lora.rnak" = [1, 2]\n', ["grid.lora.rnak", "did you mean 'lora.rank'"]),
    ('[grid]\n"lora.rank" = []\n', ["grid.lora.rank", "empty"]),
    ('[grid]\n"lora.rank" = 4\n', ["grid.lora.rank", "list"]),
    (
        '[zip]\n"lora.rank" = [1, 2]\n"lora.alpha" = [1.0]\n',
        ["zip", "lora.rank: 2", "lora.alpha: 1"],
    ),
    ('[set]\n"optim.lrr" = 1.0\n', ["set.optim.lrr", "optim.lr"]),
    (
        '[random]\nn = 2\n"optim.lr" = { low = 0.0, high = 1.0, log = true }\n',
        ["random.optim.lr", "low > 0"],
    ),
    ('[random]\n"optim.lr" = [1e-3]\n', ["random.n"]),
    ('[grid]\n"lora.rank" = [1]\n[set]\n"lora.rank" = 2\n', ["grid.lora.rank", "[set]"]),
    ('[gird]\n"lora.rank" = [1]\n', ["'gird'", "grid"]),
    ("[grid]\n", ["[grid]: no keys to sweep"]),
    ("[zip]\n", ["[zip]: no keys to sweep"]),
]


@pytest.mark.parametrize("body,needles", SWEEP_ERRORS)
def test_sweep_errors_name_the_key(tmp_path, body, needles):
    p = make_sweep(tmp_path, body)
    with pytest.raises(ConfigError) as info:
        load_sweep(p)
    msg = str(info.value)
    assert str(p) in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_invalid_axis_value_fails_at_expand_with_key(tmp_path):
    p = make_sweep(tmp_path, '[grid]\n"lora.rank" = [4, -1]\n')
    with pytest.raises(ConfigError, match=r"lora\.rank.*>= 1"):
        expand(p, out_dir=tmp_path / "out")


def test_missing_base_config(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('base = "nowhere.toml"\n[grid]\n"lora.rank" = [1]\n')
    with pytest.raises(ConfigError) as info:
        load_sweep(p)
    assert "base" in str(info.value) and "nowhere.toml" in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_sweep(tmp_path / "no_sweep.toml")


def test_sweep_end_to_end(tmp_path):
    p = make_sweep(tmp_path, GRID_2x2)
    fake = FakeRun()
    res = run_sweep(p, fake, out_dir=tmp_path / "out", log=None)
    names = [
        "rank-1_scaling-standard",
        "rank-1_scaling-rslora",
        "rank-16_scaling-standard",
        "rank-16_scaling-rslora",
    ]
    assert fake.calls == names
    assert [r.status for r in res.runs] == ["done"] * 4
    rows = read_csv(res.csv_path)
    assert [r["run"] for r in rows] == names
    assert list(rows[0])[:3] == ["lora.rank", "lora.scaling", "val_loss"]  # axes, then metrics
    assert list(rows[0])[-3:] == ["status", "run", "error"]
    header = list(rows[0])
    assert len(header) == len(set(header))
    assert not {"name", "model", "qtype"} & set(header)  # the run's name once; no model path
    assert {"train_loss", "val_loss", "tokens_per_s", "adapter_bytes", "wall_s"} <= set(rows[0])
    assert "not_scalar" not in rows[0]  # non-scalar metrics are dropped
    by_name = {r["run"]: r for r in rows}
    assert float(by_name["rank-16_scaling-rslora"]["val_loss"]) == pytest.approx(3.0 - 0.8 - 0.1)
    md = res.md_path.read_text().splitlines()
    assert md[0].startswith("| lora.rank | lora.scaling | val_loss |")
    assert len(md) == 2 + 4 and all(any(n in line for line in md) for n in names)
    for run in res.runs:
        status = json.loads((run.run_dir / STATUS_FILE).read_text())
        assert status["status"] == "done"
    # plots: the metrics against each axis (numeric rank, categorical scaling) and the loss
    # curves, valid PNGs
    plot_names = sorted(x.name for x in res.plots)
    assert plot_names == ["loss_curves.png", "metrics_vs_lora_rank.png",
                          "metrics_vs_lora_scaling.png"]
    for plot in res.plots:
        data = plot.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
    # a second invocation runs nothing and reports the same table
    again = FakeRun()
    res2 = run_sweep(p, again, out_dir=tmp_path / "out", log=None)
    assert again.calls == []
    assert all(r.skipped for r in res2.runs)
    assert read_csv(res2.csv_path) == rows


def test_interrupted_sweep_resumes_only_missing_runs(tmp_path):
    p = make_sweep(tmp_path, GRID_2x2)
    out = tmp_path / "out"
    first = FakeRun(interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(p, first, out_dir=out, log=None)
    assert len(first.calls) == 3
    # the two finished runs are already in the table written on the way out
    assert [r["run"] for r in read_csv(out / "results.csv")] == first.calls[:2]
    second = FakeRun()
    res = run_sweep(p, second, out_dir=out, log=None)
    assert second.calls == ["rank-16_scaling-standard", "rank-16_scaling-rslora"]
    assert [r.skipped for r in res.runs] == [True, True, False, False]
    assert len(read_csv(res.csv_path)) == 4


def test_failed_run_is_recorded_and_sweep_goes_on(tmp_path):
    p = make_sweep(tmp_path, GRID_2x2)
    out = tmp_path / "out"
    fake = FakeRun(fail_on={"rank-1_scaling-rslora"})
    res = run_sweep(p, fake, out_dir=out, log=None)
    assert len(fake.calls) == 4
    assert [r.status for r in res.runs] == ["done", "failed", "done", "done"]
    rows = {r["run"]: r for r in read_csv(res.csv_path)}
    assert rows["rank-1_scaling-rslora"]["error"] == "RuntimeError: boom in rank-1_scaling-rslora"
    assert rows["rank-1_scaling-rslora"]["val_loss"] == ""
    assert "failed" in res.md_path.read_text()
    status = json.loads((out / "rank-1_scaling-rslora" / STATUS_FILE).read_text())
    assert status["status"] == "failed" and "Traceback" in status["traceback"]
    # the failed run is retried next time; the others are not
    retry = FakeRun()
    res2 = run_sweep(p, retry, out_dir=out, log=None)
    assert retry.calls == ["rank-1_scaling-rslora"]
    assert all(r.status == "done" for r in res2.runs)


def test_changed_config_in_existing_run_dir_is_not_reused(tmp_path):
    p = make_sweep(tmp_path, GRID_2x2)
    out = tmp_path / "out"
    run_sweep(p, FakeRun(), out_dir=out, log=None)
    # same run names, different fixed settings: the old results must not be reported as these
    p.write_text(p.read_text().replace('"train.steps" = 6', '"train.steps" = 8'))
    fake = FakeRun()
    res = run_sweep(p, fake, out_dir=out, log=None)
    assert fake.calls == []
    assert all(r.status == "failed" and "different config" in r.error for r in res.runs)


def test_default_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = make_sweep(tmp_path, '[grid]\n"lora.rank" = [1, 2]\n', base='output_dir = "myruns"\n')
    specs = expand(p)
    assert specs[0].config.run_dir == Path("myruns/sweep/rank-1")


def test_run_fn_returning_none_uses_summary_json(tmp_path):
    p = make_sweep(tmp_path, '[grid]\n"lora.rank" = [1, 2]\n')

    def run_fn(cfg, run_dir):
        (run_dir / "summary.json").write_text(
            json.dumps({"val_loss": cfg.lora.rank / 10, "nested": {}})
        )

    res = run_sweep(p, run_fn, out_dir=tmp_path / "out", log=None)
    assert [r.metrics["val_loss"] for r in res.runs] == [0.1, 0.2]
    assert all("nested" not in r.metrics for r in res.runs)
    # one numeric axis and no other: a single line, still plotted
    assert [x.name for x in res.plots] == ["metrics_vs_lora_rank.png"]


def test_overrides_apply_to_every_run_but_not_to_swept_keys(tmp_path):
    p = make_sweep(tmp_path, GRID_2x2)
    specs = expand(p, out_dir=tmp_path / "o", overrides=["train.steps=3", "optim.lr=1e-3"])
    assert {(s.config.train.steps, s.config.optim.lr) for s in specs} == {(3, 1e-3)}
    with pytest.raises(ConfigError, match="lora.rank"):
        expand(p, out_dir=tmp_path / "o", overrides=["lora.rank=2"])
    with pytest.raises(ConfigError, match="did you mean 'train.steps'"):
        expand(p, out_dir=tmp_path / "o", overrides=["train.stesp=2"])


def test_peak_rss_is_each_runs_own(tmp_path):
    """A run that allocates little after one that allocated much reports its own peak."""
    import numpy as np

    def run(cfg: Config, run_dir: Path) -> dict:
        if cfg.lora.rank == 1:
            big = np.ones(400 * 2**20 // 8)  # 400 MiB, touched
            del big
        return {"val_loss": 1.0, "peak_rss_mb": 0.0}

    p = make_sweep(tmp_path, '[grid]\n"lora.rank" = [1, 2]\n')
    res = run_sweep(p, run, out_dir=tmp_path / "out", log=None)
    first, second = (r.metrics["peak_rss_mb"] for r in res.runs)
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("no /proc/self/clear_refs: the peak cannot be reset")
    assert first - second > 300, (first, second)


def test_loss_curves_read_training_and_held_out_points(tmp_path):
    from jaxlora.sweep.results import _read_curves

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0, "val_loss": 3.0}\n{"step": 2, "loss": 2.5}\n'
                 '{"step": 4, "loss": 2.0, "lr": 1e-3}\n{"step": 4, "val_loss": 2.25}\n{"st')
    assert _read_curves(p) == ([(2, 2.5), (4, 2.0)], [(0, 3.0), (4, 2.25)])
    assert _read_curves(tmp_path / "missing.jsonl") == ([], [])


def test_methods_mix_in_populations_where_they_can(tmp_path):
    """LoRA, rsLoRA and LoRA+ share a population; DoRA runs form their own; PiSSA and LoftQ
    (they change the base) train alone."""
    p = make_sweep(tmp_path, """
[zip]
"lora.method" = ["lora", "lora", "lora", "dora", "dora", "lora", "lora"]
"lora.scaling" = ["standard", "rslora", "standard", "standard", "rslora", "standard", "standard"]
"optim.lora_plus_ratio" = [1.0, 1.0, 16.0, 1.0, 1.0, 1.0, 1.0]
"lora.init" = ["kaiming", "kaiming", "kaiming", "kaiming", "kaiming", "pissa", "loftq"]
""")

    class FakePopulation:
        groups: list[list[str]] = []

        @staticmethod
        def group_key(cfg):
            return "one base"

        @staticmethod
        def plan_size(cfg, size):
            return 8

        def run(self, configs, dirs):
            self.groups.append(sorted((c.lora.method, c.optim.lora_plus_ratio) for c in configs))
            return [{"val_loss": 1.0} for _ in configs]

    alone = FakeRun()
    pop = FakePopulation()
    res = run_sweep(p, alone, out_dir=tmp_path / "out", log=None, population=pop)
    assert all(r.status == "done" for r in res.runs) and len(res.runs) == 7
    assert sorted(pop.groups) == [[("dora", 1.0), ("dora", 1.0)],
                                  [("lora", 1.0), ("lora", 1.0), ("lora", 16.0)]]
    assert len(alone.calls) == 2 and all("init-pissa" in c or "init-loftq" in c for c in alone.calls)


def test_a_run_recorded_by_an_older_version_still_counts_as_done(tmp_path):
    """An older jaxlora recorded another hash for the same config (a field added since then
    takes its default): the run's config.toml, read now, decides, so it is not run again."""
    p = make_sweep(tmp_path, GRID_2x2)
    out = tmp_path / "out"
    run_sweep(p, FakeRun(), out_dir=out, log=None)
    for status in out.glob(f"*/{STATUS_FILE}"):
        rec = json.loads(status.read_text())
        status.write_text(json.dumps({**rec, "config_hash": "from-an-older-version"}))
    again = FakeRun()
    res = run_sweep(p, again, out_dir=out, log=None)
    assert again.calls == [] and all(r.skipped and r.status == "done" for r in res.runs)
