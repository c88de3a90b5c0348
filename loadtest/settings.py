"""What our processes tell the Locust processes, through their environment: one declaration each.

loadtest.run writes these for loadtest/locustfile.py, ops.drills.replicas for
ops/drills/replicas_locustfile.py; all are internal (set them through those commands' options).
The record is `koa_client.settings.Setting`, as loadtest/ stands on the client, never on model/.
"""

from __future__ import annotations

from koa_client.settings import Setting

IMAGES = Setting("KOA_IMAGES", "", str, "folder of request images; unset: tests/fixtures", internal=True)
KEY_FILE = Setting(
    "KOA_KEY_FILE", "", str, "the server's key_file.json; unset: logs/serve/key_file.json", internal=True
)
CA_FILE = Setting("KOA_CA_FILE", "", str, "CA bundle that signed the front door's certificate", internal=True)
CERT_FILE = Setting("KOA_CERT_FILE", "", str, "client certificate for the front door (mutual TLS)", internal=True)
CERT_KEY_FILE = Setting("KOA_CERT_KEY_FILE", "", str, "the client certificate's private key", internal=True)
EXPLAIN_SHARE = Setting(
    "KOA_EXPLAIN_SHARE", "0", float, "share of requests that also ask for an explanation, in [0, 1]", internal=True
)
GRPC_TARGET = Setting("KOA_GRPC_TARGET", "127.0.0.1:7070", str, "gRPC inference host:port", internal=True)
USERS = Setting(
    "KOA_USERS", "", str, "rest, grpc or rest,grpc; unset: Locust's choice (the replicas drill: both)", internal=True
)
MODEL = Setting("KOA_MODEL", "oamen", str, "model name in the request path", internal=True)
TIMEOUT = Setting("KOA_TIMEOUT", "120", float, "seconds per request (per attempt in the replicas drill)", internal=True)
USER_RATE = Setting(
    "KOA_USER_RATE", "0", float, "requests/s per user for an open-loop load; 0: closed loop", internal=True
)
LATENCY_FILE = Setting(
    "KOA_LATENCY_FILE", "", str, "where every request's time (ms, one a line) is written at exit", internal=True
)
RETRY_S = Setting("KOA_RETRY_S", "60", float, "the replicas drill's clients' retry window, seconds", internal=True)
DRILL_GRPC_TARGET = Setting(
    "KOA_DRILL_GRPC_TARGET", "127.0.0.1:7170", str, "gRPC host:port of the replicas drill's balancer", internal=True
)
DRILL_REFERENCE = Setting(
    "KOA_DRILL_REFERENCE", "", str, "JSON of the answers the replicas drill compares with; unset: none", internal=True
)
DRILL_RECORDS = Setting(
    "KOA_DRILL_RECORDS", "", str, "where the replicas drill writes every request's record (JSON lines)", internal=True
)

SETTINGS = (
    IMAGES,
    KEY_FILE,
    CA_FILE,
    CERT_FILE,
    CERT_KEY_FILE,
    EXPLAIN_SHARE,
    GRPC_TARGET,
    USERS,
    MODEL,
    TIMEOUT,
    USER_RATE,
    LATENCY_FILE,
    RETRY_S,
    DRILL_GRPC_TARGET,
    DRILL_REFERENCE,
    DRILL_RECORDS,
)
