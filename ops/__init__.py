"""Operations: running KOA-Serve's TorchServe and putting load on it.

- `ops.server`: start, stop, drain, restart a local TorchServe; its keys (``make serve``, ``make stop``).
- `ops.load`: load generation shared by Locust (loadtest/), the benchmarks, the drills and the soak:
  request images, the drivers, every answer checked against `koa_client.schema`.
- `ops.bench`: the benchmarks, one command (``python -m ops.bench SUBCOMMAND``; the list: docs/BENCHMARKS.md).
- `ops.cluster`: N replicas behind HAProxy on one machine (``make cluster``).
- `ops.door`: the secure front door, mutual TLS with one identity per calling system (``make serve TLS=1``);
  `ops.pki` its development certificates (``make certs``), `ops.audit` its hash-chained audit trail.
- `ops.drills`: fault drills (a worker killed, a restart, a replica killed) and the soak.
- `ops.results`: where results go (docs/results/ holds the committed ones); `ops.render_docs` renders every
  generated page and block of the docs from what is committed (one registry), `ops.model_card` the card's.
- `ops.procs`: process ids and free ports, shared with the PACS side (`pacs`).
- `ops.stage_gpu_data`: the lossy training-data copy for a GPU machine (scripts/gpu_run.sh).
- `ops.explain_eval`: explanation methods measured on val knees (docs/EXPLAIN.md), with the pure measures
  in `ops.explain_metrics`, the doc tables in `ops.explain_report`; `ops.explain_examples` its pictures.

Run everything from the repository root (``python -m ops.<module>``): the packages are imported from
there, with no edit of the import path.
"""
