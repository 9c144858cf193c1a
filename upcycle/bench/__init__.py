"""Benchmarks: each writes ``results/<name>.json`` (summary, rows, command, machine) and PNG plots."""

BENCHMARKS = ("layers", "convert", "jetpack", "d2dmoe", "bam")
