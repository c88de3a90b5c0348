"""Fault drills and the soak: what KOA-Serve does when a worker dies, the server restarts, a replica is
killed, or the load goes on for hours (docs/RELIABILITY.md, docs/DEPLOY.md).

- ``python -m ops.drills.kill_worker``: SIGKILL the TorchServe worker under load.
- ``python -m ops.drills.restart``: ``make restart`` under load; no request lost.
- ``python -m ops.drills.replicas`` (``make drill-replicas``): throughput of 1 and N replicas behind
  HAProxy, and one replica killed under load.
- ``python -m ops.drills.soak``: hours of load; memory, latency and failures over time.

The load comes from `ops.load`, the servers from `ops.server` and `ops.cluster`; what the drills share
(options, writing and publishing a result, the worker's processes) from `ops.drills.common`.
"""
