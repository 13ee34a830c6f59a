"""The `jaxlora` command: train, sweep, eval, generate, export, plan, info, config.

Exit status: 0 on success, 2 on a usage or config error, 1 when a run fails. User mistakes
and failures of the operating system (a path that cannot be read or written, a file where a
folder should be, a closed stdout) print one line, ``jaxlora: error: ...`` naming the path,
and no traceback (set JAXLORA_DEBUG=1 to see one). SIGTERM stops `train` and `sweep` cleanly
(exit 0) at any point; the same command resumes. Nothing imports JAX before the config is
read and checked, so `--help` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxlora.errors import ConfigError, JaxloraError, JaxloraWarning

__all__ = ["main", "os_error_message"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        self.exit(2, f"jaxlora: error: {message} (see `{self.prog} --help`)\n")


def _config(args) -> Any:
    from jaxlora.config import load_config

    return load_config(args.config, overrides=args.set or ())


def _holds_unfinished_run(cfg: Any, run_dir: Path) -> bool:
    """Whether `run_dir` holds checkpoints of this same run, not finished (it will resume)."""
    from jaxlora.config import load_config
    from jaxlora.train.runs import same_run

    if not (run_dir / "checkpoints").is_dir() or (run_dir / "summary.json").exists():
        return False
    try:
        return same_run(load_config(run_dir / "config.toml"), cfg)
    except (ConfigError, OSError):  # train.run reports what is wrong with it
        return False


def cmd_train(args) -> int:
    cfg = _config(args)  # before importing JAX: a config error answers at once
    from jaxlora import sharding, train

    run_dir = Path(args.run_dir) if args.run_dir else Path(cfg.output_dir) / cfg.name
    if not args.resume and _holds_unfinished_run(cfg, run_dir):
        print(f"jaxlora: {run_dir} holds checkpoints of an unfinished run; resuming it",
              file=sys.stderr)
    summary = train.run(cfg, run_dir)
    if "stopped" in summary or not sharding.is_primary():  # multi-host: process 0 reports
        return 0
    _print_summary(summary, run_dir)
    return 0


def _print_summary(s: dict[str, Any], run_dir: Path) -> None:
    def f(x, fmt=".4f"):
        return "n/a" if x is None else format(x, fmt)

    print(f"run directory        {run_dir}")
    print(f"held-out loss        {f(s.get('val_loss_before'))} -> {f(s.get('val_loss'))} "
          f"(perplexity {f(s.get('val_ppl'), '.2f')})")
    for sample in s.get("samples", []):
        print(f"\nprompt:\n{sample['prompt']}\n--- before fine-tuning ---\n{sample['base']}\n"
              f"--- after fine-tuning ----\n{sample['adapted']}\n")
    print(f"train loss (last)    {f(s.get('train_loss'))}")
    print(f"adapters             {s['adapter_params']:,} params, "
          f"{s['adapter_bytes'] / 2**20:.2f} MiB (base {s['base_bytes'] / 2**20:.1f} MiB, "
          f"{s['qtype']})")
    print(f"throughput           {f(s.get('tokens_per_s'), '.0f')} tokens/s, peak RSS "
          f"{f(s.get('peak_rss_mb'), '.0f')} MiB, wall {f(s.get('wall_s'), '.0f')} s")


class _Population:
    """`jaxlora.population`, imported on first use (a sweep checks every config first)."""

    def __getattr__(self, name: str) -> Any:
        import importlib

        return getattr(importlib.import_module("jaxlora.population"), name)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _train_run(cfg: Any, run_dir: Any) -> dict[str, Any]:
    """`jaxlora.train.run`, imported on the first run (a sweep checks every config first)."""
    from jaxlora import train

    return train.run(cfg, run_dir)


def _check_run(cfg: Any) -> None:
    """`jaxlora.train.assemble.check_targets` (JAX is imported once every config parsed)."""
    from jaxlora.train import assemble

    assemble.check_targets(cfg)


def cmd_sweep(args) -> int:
    from jaxlora import sweep

    result = sweep.run_sweep(args.sweep, _train_run, out_dir=args.out, overrides=args.set or (),
                             population=_Population(), population_size=args.population_size,
                             check=_check_run)
    print(f"results: {result.md_path}")
    failed = [r for r in result.runs if r.status != "done"]
    return 1 if failed else 0


def cmd_eval(args) -> int:
    from jaxlora import train

    out = train.evaluate_run(args.run_dir, max_batches=args.batches)
    print(json.dumps(out, indent=2))
    return 0


def cmd_generate(args) -> int:
    from jaxlora import generate, train

    loaded, adapters = train.load_for_inference(args.model, args.adapter, qtype=args.qtype)
    outs = generate.generate(
        loaded.config, loaded.base, loaded.tokenizer, [args.prompt], adapters=adapters,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, chat=args.chat,
    )
    print(outs[0])
    return 0


def cmd_export(args) -> int:
    from jaxlora import export

    path = export.export(args.run_dir, args.format, args.out, dtype=args.dtype)
    print(f"exported {args.format} to {path}")
    return 0


def cmd_info(args) -> int:
    from jaxlora import train

    print(train.describe(args.target, qtype=args.qtype))
    return 0


def cmd_plan(args) -> int:
    cfg = _config(args)  # before importing JAX
    from jaxlora import plan

    p = plan.plan(cfg, args.population_size, platform=args.platform, devices=args.devices)
    print(plan.format_plan(p, cfg.model.remat))
    return 0


def cmd_config(args) -> int:
    from jaxlora.config import describe, dump_config

    if args.config:
        print(dump_config(_config(args)), end="")
    else:
        print(describe())
    return 0


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set lora.rank=32 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from jaxlora import __version__

    p = _Parser(prog="jaxlora", description="LoRA / QLoRA fine-tuning in JAX.")
    p.add_argument("--version", action="version", version=f"jaxlora {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="run one experiment from a TOML config",
                       description="Train adapters as a config file describes. A run directory "
                       "that holds the same config resumes from its latest checkpoint.")
    t.add_argument("config", help="TOML config (see `jaxlora config`)")
    _add_set(t)
    t.add_argument("--run-dir", help="run directory (default: output_dir/name)")
    t.add_argument("--resume", action="store_true",
                   help="resume from the run directory's latest checkpoint (also automatic)")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sweep", help="run a sweep file (skips finished runs)")
    s.add_argument("sweep", help="sweep TOML file")
    s.add_argument("--out", help="sweep folder (default: from the sweep file)")
    s.add_argument("--population-size", type=_positive_int, default=None, metavar="N",
                   help="train up to N runs that share a base at once, in one step (default: "
                        "the sweep file's population_size, else what the memory estimate "
                        "allows; 1 = one run at a time)")
    _add_set(s)
    s.set_defaults(fn=cmd_sweep)

    e = sub.add_parser("eval", help="held-out loss of a run's adapters and of the base")
    e.add_argument("run_dir")
    e.add_argument("--batches", type=int, default=None, help="at most this many batches")
    e.set_defaults(fn=cmd_eval)

    g = sub.add_parser("generate", help="generate a completion (printed alone to stdout)")
    g.add_argument("prompt")
    g.add_argument("--model", required=True, help="model name, GGUF file or HF folder")
    g.add_argument("--adapter", help="a run directory or a PEFT adapter folder")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--qtype", default="none", help="quantize the base on load (none, nf4, ...)")
    g.set_defaults(fn=cmd_generate)

    x = sub.add_parser("export", help="export a run's adapters (PEFT) or a merged model")
    x.add_argument("run_dir")
    x.add_argument("--format", choices=("peft", "merged"), required=True)
    x.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    x.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="merged weights dtype")
    x.set_defaults(fn=cmd_export)

    m = sub.add_parser("plan", help="predict a run's peak memory from its config (nothing loaded)",
                       description="The memory planner: the peak host RSS (CPU) or accelerator "
                       "memory of a training run, term by term, from the config and the model "
                       "file's header alone.")
    m.add_argument("config", help="TOML config")
    m.add_argument("--population-size", type=_positive_int, default=1, metavar="K",
                   help="K runs of this config trained at once as a population (default 1)")
    m.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default=None,
                   help="plan for this platform (default: this machine's JAX backend)")
    m.add_argument("--devices", type=_positive_int, default=None, metavar="N",
                   help="the mesh spans N devices (default: this machine's)")
    _add_set(m)
    m.set_defaults(fn=cmd_plan)

    i = sub.add_parser("info", help="summary of a model or a run directory")
    i.add_argument("target", help="model name, GGUF file, HF folder or run directory")
    i.add_argument("--qtype", default="nf4", help="quantization to report for a model")
    i.set_defaults(fn=cmd_info)

    c = sub.add_parser("config", help="list every config field, or print a resolved config",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_config_epilog())
    c.add_argument("config", nargs="?", help="a TOML config to resolve and print")
    _add_set(c)
    c.set_defaults(fn=cmd_config)
    return p


def _config_epilog() -> str:
    from jaxlora.config import describe

    return describe()


class _Terminated(BaseException):
    """SIGTERM outside the training loop (which handles it itself by saving and stopping).

    A BaseException, so that no ``except Exception`` on the way takes it for a failure."""


def _raise_terminated(signum, frame):
    raise _Terminated


def os_error_message(e: OSError) -> str:
    """One line naming the path(s) of an OS error and the problem, e.g.
    ``/runs/x/metrics.jsonl: permission denied``."""
    what = (e.strerror or str(e) or type(e).__name__).lower()
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {what}" if paths else what


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """While entered (main thread only), SIGTERM raises `_Terminated`."""
    try:
        old = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _jaxlora_warnings() -> Iterator[None]:
    """Show a `JaxloraWarning` as one ``jaxlora: warning:`` line (no source line)."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, JaxloraWarning):
                print(f"jaxlora: warning: {message}", file=sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the exit flush does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(message: str, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"jaxlora: error: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(os.environ.get("JAXLORA_DEBUG"))
    try:
        with _sigterm_stops(), _jaxlora_warnings():
            status = args.fn(args)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return status
    except ConfigError as e:
        return _fail(str(e), 2, debug)
    except BrokenPipeError:
        _silence_stdout()
        return _fail("stdout: the reader closed the pipe", 1, debug)
    except OSError as e:
        if e.filename is None and e.errno in (errno.ENOSPC, errno.EIO):
            # every file jaxlora writes is opened by path (the error names it): an unnamed
            # write that fails is the command's output, e.g. stdout on a full disk
            _silence_stdout()
            return _fail(f"stdout: {os_error_message(e)}", 1, debug)
        return _fail(os_error_message(e), 1, debug)
    except (JaxloraError, ValueError) as e:
        return _fail(str(e), 1, debug)
    except KeyboardInterrupt:
        print("jaxlora: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("jaxlora: SIGTERM received outside training; stopped (the same command picks "
              "up from the last checkpoint)", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
