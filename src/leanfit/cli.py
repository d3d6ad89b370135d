"""The ``leanfit`` command line: a thin argparse layer over the registry and the runner.

Errors caused by input or environment (:class:`leanfit.core.errors.LeanfitError`, argparse usage errors) print
one line and exit with code 2. Heavy imports (torch, transformers) happen only inside the subcommands.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Literal

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2) instead of usage text + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_run_options(p: argparse.ArgumentParser, *, default_out: str, resumable: bool) -> None:
    p.add_argument("name", metavar="NAME", help="registered name (see `leanfit list`)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, dotted for nested fields (train.steps=100); see --help-config")
    p.add_argument("--preset", help="preset: quick (minutes) or full (what results quote); default: the preset of "
                                    "a run record given as --config, else quick")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file of config values, or a run folder's config.yaml (applied after the preset)")
    p.add_argument("--out", default=default_out, metavar="DIR", help=f"output root (default: {default_out})")
    p.add_argument("--seed", type=int, help="random seed (default: the seed of a run record given as --config, else 0)")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key with its type, the value --preset runs, the default and help")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (preset, --config, overrides) as YAML, in the form of a run's "
                        "config.yaml, and exit without running")
    if resumable:
        p.add_argument("--resume", action="store_true",
                       help="continue the run folder of this command from its newest checkpoint")
        p.add_argument("--run-id", metavar="ID",
                       help="run folder name (default: <preset>-seed<seed>-<config hash>)")


def build_parser() -> argparse.ArgumentParser:
    from leanfit import __version__

    parser = _Parser(prog="leanfit", description="Five recent methods in PyTorch, reproduced on offline data.")
    parser.add_argument("--version", action="version", version=f"leanfit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("list", help="registered experiments and benchmarks")
    p = sub.add_parser("run", help="run an experiment; writes OUT/<name>/<run-id>/ with a report")
    _add_run_options(p, default_out=os.environ.get("LEANFIT_OUT", "runs"), resumable=True)
    p = sub.add_parser("bench", help="run a micro-benchmark; writes CSV/JSON + plot with machine info")
    _add_run_options(p, default_out="benchmarks/results", resumable=False)
    p = sub.add_parser("report", help="(re)render a run's report.md from its records")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `leanfit run`")
    p = sub.add_parser("demo", help="quick preset of every registered experiment, then an index report")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output root (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--fresh", action="store_true", help="rerun experiments whose quick run already completed")
    p = sub.add_parser("data", help="offline data assets")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION", parser_class=_Parser)
    dsub.add_parser("status", help="which offline assets are present, and how to install the missing ones")
    pp = dsub.add_parser("prepare", help="build caches (tokenizers, converted models)")
    pp.add_argument("assets", nargs="*", metavar="ASSET", help="asset names (default: every present asset)")
    return parser


def _cmd_list(args: argparse.Namespace) -> int:
    from leanfit.core import registry

    for kind, command in (("experiment", "run"), ("benchmark", "bench")):
        print(f"{kind}s (leanfit {command} NAME):")
        for e in registry.entries(kind):
            print(f"  {e.name:<22} {e.description}")
    return 0


def _print_config_help(kind: Literal["experiment", "benchmark"], name: str, preset: str | None) -> int:
    from leanfit.core import registry
    from leanfit.core.config import config_help, flat_values

    entry = registry.get(kind, name)
    preset = preset or "quick"
    runs = flat_values(entry.preset_config(preset))
    print(f"config keys of {name}, values of preset {preset} (presets: {', '.join(entry.presets)}):")
    for key, tp, default, help_text in config_help(entry.config_cls):
        value = repr(runs[key])
        print(f"  {key}: {tp} = {value}" + ("" if value == default else f"  (default: {default})")
              + f"\n      {help_text}")
    if kind == "experiment":
        from leanfit.core.runner import RUN_KEYS

        print("keys of every experiment:")
        for key, help_text in RUN_KEYS.items():
            print(f"  {key}: str = 'none'\n      {help_text}")
    return 0


def _print_config(kind: Literal["experiment", "benchmark"], args: argparse.Namespace) -> int:
    import yaml

    from leanfit.core.runner import resolved_record

    record = resolved_record(kind, args.name, preset=args.preset, config_file=args.config, overrides=args.overrides,
                             seed=args.seed)
    print(yaml.safe_dump(record, sort_keys=False), end="")
    return 0


def _config_request(kind: Literal["experiment", "benchmark"], args: argparse.Namespace) -> int | None:
    """The exit code of ``--help-config`` or ``--print-config`` when one was asked for (nothing runs then)."""
    if args.help_config:
        return _print_config_help(kind, args.name, args.preset)
    if args.print_config:
        return _print_config(kind, args)
    return None


def _cmd_run(args: argparse.Namespace) -> int:
    if (code := _config_request("experiment", args)) is not None:
        return code
    from leanfit.core.runner import run_experiment

    path, results = run_experiment(
        args.name, preset=args.preset, config_file=args.config, overrides=args.overrides, out=args.out,
        seed=args.seed, resume=args.resume, run_id=args.run_id,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {path}/report.md")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if (code := _config_request("benchmark", args)) is not None:
        return code
    from leanfit.core.runner import run_benchmark

    path = run_benchmark(args.name, preset=args.preset, config_file=args.config, overrides=args.overrides,
                         out=args.out, seed=args.seed)
    print(f"done: {path}/results.csv, {path}/report.md")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from leanfit.core.report import render_run

    print(render_run(args.run_dir))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from leanfit.core.runner import run_demo

    print(f"done: {run_demo(out=args.out, seed=args.seed, fresh=args.fresh)}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from leanfit.studies.data import assets

    if args.data_command == "prepare":
        for message in assets.prepare(args.assets or None):
            print(message)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="leanfit offline assets")
    for col in ("asset", "kind", "status", "description", "install"):
        table.add_column(col)
    rows = assets.status()
    for r in rows:
        status = "[green]present[/green]" if r["present"] else "[red]missing[/red]"
        table.add_row(r["asset"], r["kind"], status, r["description"], "" if r["present"] else r["install"])
    Console(width=160).print(table)
    missing = [r for r in rows if not r["present"]]
    print(f"{len(rows) - len(missing)} of {len(rows)} assets present" + (
        "; install the missing ones with the commands above" if missing else ""))
    return 0


_COMMANDS = {"list": _cmd_list, "run": _cmd_run, "bench": _cmd_bench, "report": _cmd_report,
             "demo": _cmd_demo, "data": _cmd_data}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, accepting ``key=value`` overrides anywhere after NAME (also after options such as --out)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    from leanfit.core.errors import LeanfitError

    try:
        return _COMMANDS[args.command](args)
    except LeanfitError as exc:
        print(f"leanfit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leanfit {args.command}: interrupted; continue a run with the same command and --resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
