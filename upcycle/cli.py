"""The ``upcycle`` command line: a thin shell that parses arguments and calls the library.

Every subcommand maps onto the same function a notebook would call. Commands arrive with the issues that build
them; ``upcycle --help`` lists what exists now.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .bench import BENCHMARKS


def _cmd_list(args: argparse.Namespace) -> int:
    import upcycle

    listing = {"routers": upcycle.list_routers(), "backends": upcycle.list_backends()}
    for kind, names in listing.items():
        if args.what in (kind, "all"):
            print(f"{kind}: {', '.join(names)}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.name == "layers":
        from .bench import layers

        result = layers.run(out=args.out, quick=args.quick, rounds=args.rounds)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {result['json']} and {result['png']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upcycle",
        description="Turn dense pretrained checkpoints into Mixture-of-Experts models.",
    )
    parser.add_argument("--version", action="version", version=f"upcycle {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="list registered routers and expert compute backends")
    listing.add_argument("what", nargs="?", default="all", choices=["all", "routers", "backends"])
    listing.set_defaults(func=_cmd_list)

    bench = commands.add_parser(
        "bench",
        help="run a benchmark and write results/<name>.json and PNG plots",
        description="Run a benchmark; results are measured side by side in one process and written atomically.",
    )
    bench.add_argument("name", choices=list(BENCHMARKS), help="which benchmark")
    bench.add_argument("--quick", action="store_true", help="small sizes and few rounds (a smoke run, ~10 s)")
    bench.add_argument("--out", default="results", help="output folder (default: results)")
    bench.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 7, quick 3)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        print(f"upcycle: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
