"""``python -m upcycle.data.fetch [NAME ...]``: fetch every dataset that can be fetched automatically (see
``upcycle.data.fetching``), print one status line each, and exit 1 if any is still missing."""

from __future__ import annotations

import argparse
import sys
import time

from .fetching import FETCHERS, fetch_all
from .paths import data_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m upcycle.data.fetch", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"datasets (default: all): {', '.join(FETCHERS)}, text_mixture")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = fetch_all(args.names or None)
    for name, status in results.items():
        print(f"{name:14s} {status}")
    print(f"data root: {data_root()}  ({time.perf_counter() - start:.1f} s)")
    return 1 if any(status.startswith("missing") for status in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
