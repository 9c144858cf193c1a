"""Benchmarks: each writes ``results/<name>.json`` (summary, rows, command, machine) and PNG plots.

The shared ones live here (the layer core, conversion, the upcycling methods side by side); each method's benchmark
lives in its home (``upcycle.methods.<method>.bench``). Only the CLI imports benchmark code.
"""

BENCHMARKS = {  # name -> module with run(out, quick, progress)
    "layers": "upcycle.bench.layers",
    "convert": "upcycle.bench.convert",
    "jetpack": "upcycle.methods.jetpack.bench",
    "d2dmoe": "upcycle.methods.d2dmoe.bench",
    "bam": "upcycle.methods.bam.bench",
    "upcycling": "upcycle.bench.upcycling",
    "decode": "upcycle.bench.decode",
}
