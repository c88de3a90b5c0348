"""KOA-Serve's benchmarks, one command: ``python -m ops.bench SUBCOMMAND [options]``.

=========  ==============================================================  ==================
serve      served against in-process throughput and idle latency           `ops.bench.serve`
sweep      ``make bench``: batching sweep, JIT warm-up, REST against gRPC  `ops.bench.sweep`
tail       ``make bench-tail``: Locust at 80% of saturation                `ops.bench.tail`
logging    ``make bench-logging``: TorchServe's log setting vs log4j2.xml  `ops.bench.logsetting`
malloc     ``make bench-malloc``: the worker's malloc settings vs glibc    `ops.bench.malloc`
explain    ``make bench-explain``: explanations off the hot path           `ops.bench.explain`
gpu        the request path's throughput on a GPU (scripts/gpu_run.sh)      `ops.bench.gpu`
precision  ``make bench-precision``: float32 against bfloat16 on this CPU   `ops.bench.precision`
door       ``make bench-door``: plain HTTP against the mutual-TLS door     `ops.bench.door`
metrics    ``make bench-metrics``: the request path with and without metrics `ops.bench.metrics`
=========  ==============================================================  ==================

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
}
