"""The DICOM gateway's own Prometheus metrics (prometheus-client), served on a loopback port.

Counters of instances received, duplicates, results and refusals stored into the PACS and instances
parked in ``failed/``; the spool's queue length at each scrape; the seconds from receipt to the SR
stored in the PACS. No label carries a patient, study or instance: those stay in the audit log.
Each gateway has its own registry, so two in one process (tests) do not collide. docs/MONITORING.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# receipt -> SR stored: seconds when the server answers at once, minutes when it is down or the queue is long
RECEIPT_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class GatewayMetrics:
    """The gateway's metrics; ``queued`` is called at each scrape for the spool's queue length."""

    def __init__(self, queued: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("koa_gateway_received", "DICOM instances received and spooled", registry=r)
        self.duplicates = Counter("koa_gateway_duplicates", "instances received again, already spooled", registry=r)
        self.stored = Counter(
            "koa_gateway_stored", "SRs stored into the PACS, by kind (result or refusal)", ["kind"], registry=r
        )
        self.skipped = Counter("koa_gateway_skipped", "instances not for the grader (screened out)", registry=r)
        self.failed = Counter("koa_gateway_failed", "instances parked in failed/ (see the audit log)", registry=r)
        self.spooled = Gauge("koa_gateway_spooled", "instances waiting in the spool", registry=r)
        self.spooled.set_function(lambda: float(queued()))
        self.receipt_to_sr = Histogram(
            "koa_gateway_receipt_to_sr_seconds",
            "seconds from receipt of an instance to its SR stored in the PACS",
            buckets=RECEIPT_BUCKETS,
            registry=r,
        )
        for kind in ("result", "refusal"):
            self.stored.labels(kind)  # present at 0 from the start: rate() needs a first sample
        self._server: Any = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` in a background thread; returns the port (0 picks a free one)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
