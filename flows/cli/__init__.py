"""The `ganflow` command line.

Conventions every command follows: `--help`; `--json` prints the result as one JSON object
on the last line of stdout; errors are one line on stderr and a non-zero exit, with the
traceback only under `--debug`; local state lives under GANFLOW_HOME (default ./.ganflow).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from flows.errors import UserError
from gan_core.config import FAMILIES, ConfigError
from gan_core.overrides import apply_overrides
from gan_core.presets import preset


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON object on the last line of stdout",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, MLflow's and Prefect's own output here (default: a log file)",
    )


def _families(text: str) -> list[str]:
    names = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in names if f not in FAMILIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown family {', '.join(bad) or text!r}; choose from {', '.join(FAMILIES)}"
        )
    return names


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors in one line and a pointer to --help (argparse's own is the
    whole usage, 8-9 lines, before the one line that matters). Subparsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ganflow", description="Train, evaluate and benchmark GANs (GAN, cGAN, CycleGAN)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "local",
        help="train each family in this process (no Ray, MLflow or Prefect), evaluate, write sample grids",
    )
    run.add_argument(
        "--families",
        type=_families,
        default=list(FAMILIES),
        help="comma-separated subset of gan,cgan,cyclegan (default: all)",
    )
    run.add_argument(
        "--preset", default="default", help="config preset: default or tiny (default: default)"
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. d_steps=3 or train.steps=500 (repeatable)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    _add_common(run)

    bench = sub.add_parser(
        "bench",
        help="training throughput, FLOPs and MFU: paper MLP, DCGAN, CycleGAN in fp32 and bf16",
    )
    bench.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where to run (default: cpu); MFU is against this device's measured matmul peak",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes and iterations (DCGAN 32 px, CycleGAN 64 px): a CPU smoke run",
    )
    bench.add_argument(
        "--compile",
        choices=["auto", "off", "on", "both"],
        default="auto",
        help="torch.compile rows (default auto: both on cuda, off on cpu)",
    )
    bench.add_argument(
        "--suite",
        choices=["paper", "families"],
        default="paper",
        help="paper: the configs above, per precision and compile (default); "
        "families: each family's default architecture in fp32",
    )
    bench.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed iterations per config (default: 20, 3 with --quick, 30 for families)",
    )
    bench.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (default: torch's choice; use 1 on a shared machine)",
    )
    _add_common(bench)
    for module in PLUGINS:
        importlib.import_module(module).add_commands(sub, _add_common)
    return parser


def cmd_local(args: argparse.Namespace) -> dict:
    from flows.train.local import run_all

    configs = [apply_overrides(preset(f, args.preset), args.overrides) for f in args.families]
    results = run_all(configs, progress=not args.quiet)
    if not args.json:
        print(f"{'family':10} {'steps':>6} {'time':>7}  metrics")
        for r in results:
            shown = ", ".join(f"{k}={v:.3g}" for k, v in r.metrics.items())
            print(f"{r.family:10} {r.steps:6d} {r.seconds:6.1f}s  {shown}")
            print(f"{'':10} samples: {r.out_dir}/samples.png  losses: {r.out_dir}/losses.png")
    return {"results": [r.__dict__ for r in results]}


def cmd_bench(args: argparse.Namespace) -> dict:
    from gan_core.bench import format_precision_table, format_table, run_precision_suite, run_suite

    def progress(r: dict) -> None:
        if not args.json:
            label = r.get("name", f"{r['family']}/{r['arch']}")
            extra = f" {r['precision']} compile={r['compile']}" if "precision" in r else ""
            print(
                f"[bench] {label} m={r['batch_size']}{extra} {r['steps_per_s']:.1f} steps/s",
                file=sys.stderr,
                flush=True,
            )

    threads = args.threads or None
    if args.suite == "families":
        rows = run_suite(
            iters=args.iters or 30, device=args.device, progress=progress, num_threads=threads
        )
        table = format_table(rows)
    else:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda, but CUDA is not available on this machine")
        modes = {"auto": None, "off": (False,), "on": (True,), "both": (False, True)}
        rows = run_precision_suite(
            args.device,
            quick=args.quick,
            compile_modes=modes[args.compile],
            iters=args.iters,
            num_threads=threads,
            progress=progress,
        )
        table = format_precision_table(rows)
    if not args.json:
        print(table)
    return {"results": rows}


COMMANDS = {"local": cmd_local, "bench": cmd_bench}

# Modules that add subcommands: each has add_commands(subparsers, add_common) and registers
# its parsers with set_defaults(func=...), where func(args) -> dict is the JSON result.
# Their imports must stay cheap (Ray, MLflow and Prefect are imported inside the commands).
PLUGINS: list[str] = [
    "flows.cli.models",
    "flows.cli.ingest",
    "flows.cli.run",
    "flows.cli.tune",
    "flows.cli.train",
    "flows.cli.tracking",
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from flows import console
    from flows.preflight import check_local_stores

    log_file = None
    try:
        # Before any work (the log file is the first write): an unwritable home or store is
        # one line naming it, not a traceback from wherever it is first used.
        check_local_stores(args.command, args)
        log_file = console.route_library_logs(args.command, args.verbose)
        func = getattr(args, "func", None) or COMMANDS[args.command]
        result = func(args)
    except (UserError, ConfigError, FileNotFoundError, ValueError) as exc:
        if args.debug:
            raise
        print(f"ganflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ganflow {args.command}: interrupted", file=sys.stderr)
        return 130
    # After a success only: an error stays one line (--verbose shows the libraries' output).
    console.report(log_file)
    if args.json:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
