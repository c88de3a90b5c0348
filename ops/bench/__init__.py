"""KOA-Serve's benchmarks, one command: ``python -m ops.bench SUBCOMMAND [options]``.

The benchmarks are `SUBCOMMANDS` below; docs/BENCHMARKS.md lists them with what each measures.

Each writes its result as JSON; the figures in docs/BENCHMARKS.md are rendered from the committed
results (`ops.render_docs`). The load itself comes from `ops.load`.
"""

SUBCOMMANDS = {
    "serve": "ops.bench.serve",
    "sweep": "ops.bench.sweep",
    "tail": "ops.bench.tail",
    "logging": "ops.bench.logsetting",
    "malloc": "ops.bench.malloc",
    "explain": "ops.bench.explain",
    "gpu": "ops.bench.gpu",
    "precision": "ops.bench.precision",
    "door": "ops.bench.door",
    "metrics": "ops.bench.metrics",
    "formats": "ops.bench.formats",
}
