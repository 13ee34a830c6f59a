"""The `jaxlora` command, in-process through `jaxlora.cli.main` (plus one real subprocess).

The tiny run of conftest.py is trained once per module (4 steps of tiny-llama on nf4); eval,
info, export and generate then work on that run directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_config

from jaxlora import cli, generate, lora, train
from jaxlora.config import field_paths

SUBCOMMANDS = ["train", "sweep", "eval", "generate", "export", "plan", "info", "config"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def listing(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"")
        for p in sorted(folder.rglob("*"))
    }


# --------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_of_every_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: jaxlora {cmd}")


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in SUBCOMMANDS)


def test_config_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        cli.main(["config", "--help"])
    out = capsys.readouterr().out
    listed, section = [], None
    for line in out.splitlines():
        if m := re.match(r"## \[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"\| `([\w]+)` \|", line):
            listed.append(f"{section}.{m.group(1)}" if section else m.group(1))
    assert sorted(listed) == sorted(field_paths())
    assert len(listed) == len(set(listed))


# --------------------------------------------------------------------------------------------
# User errors: exit 2, one line, no traceback, nothing written
# --------------------------------------------------------------------------------------------
def _sweep(tmp_path: Path, body: str, base: str = "tiny.toml", name: str = "sw") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'base = "{base}"\n{body}')
    return p


ERRORS = {
    "unknown key": (["--set", "lora.rnak=4"], r"unknown key 'lora.rnak'; did you mean 'lora.rank'"),
    "unknown section": (
        ["--set", "loar.rank=4"],
        r"unknown key 'loar.rank'; did you mean 'lora.rank'",
    ),
    "wrong type": (["--set", "lora.rank=abc"], r"lora.rank: expected an integer, got str 'abc'"),
    "negative rank": (["--set", "lora.rank=-2"], r"lora.rank: must be >= 1, got -2"),
    "unknown qtype": (
        ["--set", "quant.qtype=nf5"],
        r"quant.qtype: 'nf5' is not one of .*did you mean 'nf4'",
    ),
    "bad --set": (["--set", "lora.rank"], r"override 'lora.rank': expected KEY=VALUE"),
    "zero batch": (["--set", "data.batch_size=0"], r"data.batch_size: must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_train_config_errors_exit_2(case, tiny_config, tmp_path, capsys):
    path = tiny_config()
    before = listing(tmp_path)
    args, pattern = ERRORS[case]
    rc, out, err = run_cli(capsys, "train", path, *args)
    assert rc == 2
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("jaxlora: error: "), err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    assert listing(tmp_path) == before and not (tmp_path / "runs").exists()


def test_file_errors_exit_2(tiny_config, tmp_path, capsys):
    tiny_config()
    cases = []
    (tmp_path / "child.toml").write_text('base = "missing_base.toml"\n[lora]\nrank = 2\n')
    cases.append((["train", tmp_path / "child.toml"], "base config file not found"))
    cases.append((["train", tmp_path / "nope.toml"], "config file not found"))
    (tmp_path / "typo.toml").write_text("[lora]\nrank = 2\nalpah = 3.0\n")
    cases.append(
        (["train", tmp_path / "typo.toml"], "unknown key 'lora.alpah'; did you mean 'lora.alpha'")
    )
    (tmp_path / "broken.toml").write_text("[lora\nrank = 2\n")
    cases.append((["train", tmp_path / "broken.toml"], "invalid TOML"))
    sw = tmp_path / "sweeps"
    sw.mkdir()
    shutil.copy(tmp_path / "tiny.toml", sw / "tiny.toml")
    cases.append(
        (
            ["sweep", _sweep(sw, '[grid]\n"lora.rnak" = [1, 2]\n', name="s1")],
            "unknown config key 'lora.rnak'; did you mean 'lora.rank'",
        )
    )
    cases.append((["sweep", _sweep(sw, '[grid]\n"lora.rank" = []\n', name="s2")], "empty axis"))
    cases.append(
        (
            ["sweep", _sweep(sw, '[grid]\n"lora.rank" = [1, 2]\n', "gone.toml", "s3")],
            "base config file not found",
        )
    )
    cases.append(
        (
            ["sweep", _sweep(sw, '[grid]\n"lora.rank" = [1, -2]\n', name="s4")],
            "lora.rank: must be >= 1",
        )
    )
    cases.append((["sweep", sw / "no_sweep.toml"], "sweep file not found"))
    cases.append((["config", tmp_path / "typo.toml"], "did you mean 'lora.alpha'"))
    for argv, needle in cases:
        before = listing(tmp_path)
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2, (argv, err)
        assert len(err.splitlines()) == 1 and err.startswith("jaxlora: error: "), (argv, err)
        assert needle in err, (argv, err)
        assert "Traceback" not in err
        assert listing(tmp_path) == before, argv
    assert not (tmp_path / "runs").exists()


def test_console_script_exit_codes_without_traceback(tiny_config, tmp_path):
    """The installed entry point: a config error exits 2 with one line; --version exits 0."""
    exe = Path(sys.executable).with_name("jaxlora")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "jaxlora.cli"]
    path = tiny_config()
    env = {**os.environ, "JAXLORA_DEBUG": ""}
    env.pop("JAXLORA_DEBUG")
    p = subprocess.run(
        [*cmd, "train", str(path), "--set", "lora.rank=-1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"jaxlora: error: {path}")
    assert lines[0].endswith("lora.rank: must be >= 1, got -1")
    assert not (tmp_path / "runs").exists()
    p = subprocess.run([*cmd, "bogus"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("jaxlora: error: argument command: invalid choice: 'bogus'")


# --------------------------------------------------------------------------------------------
# A trained run: train, eval, info, export, generate
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_run")
    path = write_tiny_config(folder, "clirun")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["train", str(path)])
    return folder, path, folder / "runs" / "clirun", rc, out.getvalue(), err.getvalue()


def test_train_prints_held_out_loss(trained):
    _, _, run_dir, rc, out, _ = trained
    assert rc == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    line = next(line for line in out.splitlines() if line.startswith("held-out loss"))
    assert f"{summary['val_loss_before']:.4f} -> {summary['val_loss']:.4f}" in line
    assert f"run directory        {run_dir}" in out


def test_train_again_does_not_retrain(trained, capsys):
    _, path, run_dir, *_ = trained
    before = listing(run_dir)
    rc, out, err = run_cli(capsys, "train", path)
    assert rc == 0 and "already finished" in err
    assert "held-out loss" in out
    assert listing(run_dir) == before


def test_eval_prints_base_and_adapted_loss(trained, capsys):
    _, _, run_dir, *_ = trained
    rc, out, _ = run_cli(capsys, "eval", run_dir)
    assert rc == 0
    res = json.loads(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert res["step"] == 4
    np.testing.assert_allclose(res["base"]["val_loss"], summary["val_loss_before"], rtol=1e-6)
    np.testing.assert_allclose(res["adapted"]["val_loss"], summary["val_loss"], rtol=1e-6)
    assert res["adapted"]["val_loss"] != res["base"]["val_loss"]


def test_info_of_run_and_model(trained, capsys):
    _, _, run_dir, *_ = trained
    rc, out, _ = run_cli(capsys, "info", run_dir)
    assert rc == 0
    assert out.startswith(f"run {run_dir} (step 4)") and "model: tiny-llama" in out
    assert "val_loss:" in out
    # the run's mesh on this machine, and what one device holds there (all of it, on one)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "mesh data=1 x fsdp=1 x tensor=1 (1 cpu device(s), 1 process(es))" in out
    assert f"adapters {summary['adapter_bytes'] / 2**20:.2f} MiB" in out
    assert f"base {summary['base_bytes'] / 2**20:.1f} MiB" in out
    rc, out, _ = run_cli(capsys, "info", "tiny-llama")
    assert rc == 0 and "architecture: llama (tiny-llama), 2 layers" in out


def test_export_peft_then_refuse_overwrite(trained, capsys):
    folder, _, run_dir, *_ = trained
    dest = folder / "peft"
    rc, out, _ = run_cli(capsys, "export", run_dir, "--format", "peft", "--out", dest)
    assert rc == 0 and str(dest) in out
    assert {p.name for p in dest.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    conf = json.loads((dest / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["peft_type"] == "LORA"
    before = listing(dest)
    rc, out, err = run_cli(capsys, "export", run_dir, "--format", "peft", "--out", dest)
    assert rc != 0 and "refusing to overwrite" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert listing(dest) == before


def test_export_merged_hf_folder(trained, capsys):
    from jaxlora import io as jio

    folder, _, run_dir, *_ = trained
    dest = folder / "merged"
    rc, _, _ = run_cli(capsys, "export", run_dir, "--format", "merged", "--out", dest)
    assert rc == 0
    names = {p.name for p in dest.iterdir()}
    assert {"config.json", "model.safetensors"} <= names
    loaded = jio.load_model(str(dest))
    opened = train.open_run(run_dir)
    want = lora.flatten_paths(lora.merge(opened.base, opened.adapters))
    got = lora.flatten_paths(loaded.params)
    key = "layers/attn/q_proj/kernel"
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-6, atol=1e-7)


def test_generate_with_run_adapters_is_deterministic(trained, capsys):
    _, _, run_dir, *_ = trained
    rc, out, _ = run_cli(
        capsys,
        "generate",
        "--model",
        "tiny-llama",
        "--adapter",
        run_dir,
        "abc",
        "--max-new-tokens",
        "5",
    )
    assert rc == 0 and len(out) > 1
    opened = train.open_run(run_dir)
    want = generate.generate(
        opened.loaded.config,
        opened.base,
        opened.loaded.tokenizer,
        ["abc"],
        adapters=opened.adapters,
        max_new_tokens=5,
    )
    assert out == want[0] + "\n"


# --------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------
def test_sweep_four_runs_then_skip(tmp_path, capsys):
    write_tiny_config(tmp_path, "tiny", steps=2)
    sw = _sweep(tmp_path, '[set]\n"eval.samples" = []\n[grid]\n"train.seed" = [0, 1]\n'
                '"lora.scaling" = ["standard", "rslora"]\n')
    rc, out, err = run_cli(capsys, "sweep", sw)
    assert rc == 0, err
    folder = tmp_path / "runs" / "sw"
    md = (folder / "results.md").read_text()
    rows = [line for line in md.splitlines()[2:] if line.startswith("| ")]
    assert len(rows) == 4 and all("| done |" in r for r in rows), md
    names = [r.split("|")[-3].strip() for r in rows]  # the run column, before the error
    assert len(set(names)) == 4 and all((folder / n / "summary.json").is_file() for n in names)
    vals = [json.loads((folder / n / "summary.json").read_text())["val_loss"] for n in names]
    assert len(set(vals)) == 4  # every run trained its own adapters
    before = {n: listing(folder / n) for n in names}
    rc, out, err = run_cli(capsys, "sweep", sw)
    assert rc == 0
    assert out.count("done before, skipped") == 4, out
    assert {n: listing(folder / n) for n in names} == before


def test_sweep_with_a_rank_wider_than_a_layer_stops_before_training(tmp_path, capsys):
    """The check reads the model's shapes only: the whole sweep is refused, naming the run,
    the narrow layers and the largest rank, before any run directory exists."""
    write_tiny_config(tmp_path, "tiny", steps=2)
    sw = _sweep(tmp_path, '[grid]\n"lora.rank" = [8, 48]\n')
    rc, out, err = run_cli(capsys, "sweep", sw)
    assert rc == 2 and "Traceback" not in err  # a config error
    line = err.strip()
    assert "\n" not in line and "rank-48" in line and "k_proj" in line and "is 32" in line
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------------
# config printing and run failures (exit 1, one line)
# --------------------------------------------------------------------------------------------
def test_config_prints_the_resolved_config(tiny_config, tmp_path, capsys):
    from jaxlora.config import load_config

    path = tiny_config()
    rc, out, _ = run_cli(capsys, "config", path, "--set", "lora.rank=7", "--set", "name=x")
    assert rc == 0
    (tmp_path / "resolved.toml").write_text(out)
    assert load_config(tmp_path / "resolved.toml") == load_config(path, ["lora.rank=7", "name=x"])
    assert not (tmp_path / "runs").exists()


def test_failures_exit_1_with_one_line(tiny_config, tmp_path, capsys):
    path = tiny_config()
    cases = [
        (
            ["train", path, "--set", "data.seq_len=1024"],
            "data.seq_len = 1024 exceeds the model's context of 512 positions",
        ),
        (
            ["train", path, "--set", f'data.sources=["{tmp_path}/missing.txt"]', "--set", "name=m"],
            "no such file or folder",
        ),
        (["eval", tmp_path], "not a run directory"),
        (
            ["export", tmp_path, "--format", "peft", "--out", tmp_path / "out"],
            "not a run directory",
        ),
        (["info", tmp_path / "no_such_model.gguf"], "no_such_model.gguf"),
    ]
    for argv, needle in cases:
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 1, (argv, err)
        assert len(err.strip().splitlines()) == 1 or all(
            line.startswith("jaxlora: ") for line in err.strip().splitlines()
        ), err
        last = err.strip().splitlines()[-1]
        assert last.startswith("jaxlora: error: ") and needle in last, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Issue 18: read-only commands write nothing; OS failures are one line naming the path
# --------------------------------------------------------------------------------------------
def _digest(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every path under `folder` with its mode and bytes (folders: b"")."""
    return {str(p.relative_to(folder)): (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def test_read_only_commands_change_no_byte_of_the_run(trained, capsys):
    folder, _, run_dir, *_ = trained
    before = _digest(run_dir)
    commands = [
        ["eval", run_dir],
        ["info", run_dir],
        ["generate", "--model", "tiny-llama", "--adapter", run_dir, "a", "--max-new-tokens", "2"],
        ["export", run_dir, "--format", "peft", "--out", folder / "ro_export"],
    ]
    for argv in commands:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 0, (argv, err)
        assert _digest(run_dir) == before, argv


def test_eval_and_info_of_a_config_only_folder_create_nothing(trained, tmp_path, capsys):
    _, _, run_dir, *_ = trained
    shutil.copy(run_dir / "config.toml", tmp_path / "config.toml")
    for cmd in ("eval", "info"):
        rc, _, err = run_cli(capsys, cmd, tmp_path)
        assert rc == 1 and err == f"jaxlora: error: {tmp_path}: the run has no checkpoints yet " \
                                  "(no checkpoints/)\n", err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def _one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("jaxlora: error: "), err
    assert all(line.startswith("jaxlora: ") for line in lines), err
    assert all(n in lines[-1] for n in needles), (needles, err)


@pytest.fixture
def no_write(tmp_path):
    """A folder this process may not create entries in: a read-only (0o555) folder, or, for
    root (whom permissions do not stop), a sysfs folder, where not even root may."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    sysfs = Path("/sys/kernel")
    with pytest.raises(PermissionError):  # the premise, checked: root cannot create there
        (sysfs / "jaxlora-probe").mkdir()
    yield sysfs


def test_train_os_failures(tiny_config, tmp_path, capsys):
    path = tiny_config()
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["--run-dir", tmp_path / "a_file"], [f"{tmp_path / 'a_file'}: not a directory"]),
        (["--run-dir", tmp_path / "a_file" / "run"], [str(tmp_path / "a_file")]),
        (["--set", f'output_dir="{tmp_path / "a_file"}"'], [str(tmp_path / "a_file")]),
    ]
    for args, needles in cases:
        rc, out, err = run_cli(capsys, "train", path, *args)
        assert rc == 1, (args, err)
        _one_error_line(err, *needles)


def test_train_in_an_unwritable_output_dir(tiny_config, no_write, capsys):
    rc, _, err = run_cli(capsys, "train", tiny_config(), "--set", f'output_dir="{no_write}"')
    assert rc == 1
    _one_error_line(err, str(no_write / "tiny"))
    assert any(w in err for w in ("permission denied", "operation not permitted")), err


def test_export_os_failures(trained, tmp_path, capsys):
    _, _, run_dir, *_ = trained
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file" / "below", tmp_path / "a_file"):
        rc, _, err = run_cli(capsys, "export", run_dir, "--format", "peft", "--out", out)
        assert rc == 1, err
        _one_error_line(err, str(tmp_path / "a_file"))


def test_eval_info_of_a_file_or_missing_folder(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    for cmd in ("eval", "export"):
        extra = ["--format", "peft", "--out", tmp_path / "o"] if cmd == "export" else []
        for target in (tmp_path / "a_file", tmp_path / "missing"):
            rc, _, err = run_cli(capsys, cmd, target, *extra)
            assert rc == 1, err
            _one_error_line(err, str(target), "not a run directory")


def test_sweep_out_below_a_file(tmp_path, capsys):
    write_tiny_config(tmp_path, "tiny", steps=2)
    (tmp_path / "a_file").write_text("x")
    sw = _sweep(tmp_path, '[grid]\n"train.seed" = [0, 1]\n')
    rc, _, err = run_cli(capsys, "sweep", sw, "--out", tmp_path / "a_file" / "sw")
    assert rc == 1
    _one_error_line(err, str(tmp_path / "a_file"))


def test_closed_stdout_is_one_line(tmp_path):
    """`jaxlora config | head -1`: the reader goes away; one line, exit 1, no traceback."""
    r, w = os.pipe()
    os.close(r)
    p = subprocess.run([sys.executable, "-m", "jaxlora.cli", "config"], stdout=w,
                       stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
                       timeout=120)
    os.close(w)
    assert p.returncode == 1
    assert p.stderr == "jaxlora: error: stdout: the reader closed the pipe\n"


def test_stdout_on_a_full_device_is_one_error_line():
    """Output to a full disk (/dev/full answers every write with ENOSPC)."""
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "jaxlora.cli", "config"], stdout=full,
                           stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1],
                           timeout=120)
    assert p.returncode == 1
    assert p.stderr == "jaxlora: error: stdout: no space left on device\n"


def test_help_and_config_errors_import_no_jax(tiny_config):
    """`--help` and a config error answer before JAX is imported (it takes seconds)."""
    path = tiny_config()
    code = (
        "import sys\nfrom jaxlora import cli\n"
        "rc = cli.main(sys.argv[1:])\n"
        "print('jax' in sys.modules, rc)\n"
    )
    for argv, rc in ((["train", str(path), "--set", "lora.rank=-1"], 2),
                     (["sweep", str(path) + ".missing"], 2),
                     (["config", str(path)], 0)):
        p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                           cwd=Path(__file__).parents[1], timeout=120)
        assert p.stdout.splitlines()[-1] == f"False {rc}", (argv, p.stdout, p.stderr)
    p = subprocess.run([sys.executable, "-c", "import sys\nfrom jaxlora import cli\n"
                        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n"
                        "    print('jax' in sys.modules)\n"],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert p.stdout.splitlines()[-1] == "False", p.stderr


def test_lora_targets_typo_names_the_key(tiny_config, capsys):
    rc, _, err = run_cli(capsys, "train", tiny_config(), "--set", 'lora.targets=["q_prj"]')
    assert rc == 2  # a config error, found from the model's header before anything loads
    _one_error_line(err, "lora.targets: module 'q_prj' matches no adaptable parameter",
                    "layers/attn/q_proj/kernel")


def test_another_runs_directory_is_refused_without_saying_resuming(trained, tmp_path, capsys):
    _, _, run_dir, *_ = trained
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run_dir / "config.toml", other / "config.toml")
    (other / "checkpoints").mkdir()
    rc, _, err = run_cli(capsys, "train", write_tiny_config(tmp_path, "x"), "--run-dir", other)
    assert rc == 2
    assert err == (f"jaxlora: error: {other}: holds a different run (its config.toml differs); "
                   "choose another name (--set name=...) or output_dir instead of overwriting it\n")


def test_a_skipped_data_file_is_one_notice_and_counted_in_the_summary(tmp_path, capsys):
    path = write_tiny_config(tmp_path, "skip", steps=2)
    (tmp_path / "bad.txt").write_bytes(b"the quick \xff fox")
    rc, _, err = run_cli(capsys, "train", path, "--set",
                         f'data.sources=["{tmp_path / "train.txt"}", "{tmp_path / "bad.txt"}"]',
                         "--set", "eval.samples=[]")
    assert rc == 0, err
    notice = f"jaxlora: {tmp_path / 'bad.txt'}: file skipped: invalid UTF-8 at byte 10 of the file"
    assert err.splitlines().count(notice) == 1, err
    summary = json.loads((tmp_path / "runs" / "skip" / "summary.json").read_text())
    assert summary["skipped_files"] == 1


def test_dora_on_an_embedding_is_a_config_error_before_loading(tiny_config, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", tiny_config(), "--run-dir", tmp_path / "r", "--set",
                         'lora.method="dora"', "--set", 'lora.targets="embed"')
    assert rc == 2 and "Traceback" not in err
    assert "'embed/embedding' is an embedding table" in err.strip().splitlines()[-1]
    assert not (tmp_path / "r").exists()
