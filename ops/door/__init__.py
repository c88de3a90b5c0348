"""The secure front door: HAProxy terminating mutual TLS in front of TorchServe, one identity per calling
system (``python -m ops.door``, ``make serve TLS=1``; what it does to every request: docs/SECURITY.md).

- `ops.door.config`: the door's HAProxy configuration (TLS, identity, policy, rate limit, audit line);
- `ops.door.policy`: who may call what, and the maps HAProxy reads it from;
- `ops.door.lifecycle`: its replicas, audit receiver and HAProxy (start, stop, reload);
- `ops.door.runtime`: changes to the running door through HAProxy's runtime API (CRL, policy);
- `ops.door.clients`: admitting and revoking a calling system.
"""

from ops.door.clients import client_add, client_revoke
from ops.door.config import (
    CIPHERS_TLS12,
    CIPHERSUITES_TLS13,
    DEFAULT_WORKDIR,
    GRPC_CODES,
    GRPC_PORT,
    HEALTH_PORT,
    LOG_FORMAT,
    REST_PORT,
    STATE_FILE,
    VERIFY_REASONS,
    DoorError,
    DoorFiles,
    DoorFront,
    door_config,
)
from ops.door.lifecycle import REPLICA_KEY_MINUTES, KeyedReplica, reload, running, start, start_replica, stop
from ops.door.policy import DEFAULT_PER_MINUTE, ENDPOINTS, ClientPolicy, read_policy, write_maps, write_policy
from ops.door.runtime import apply_policy, dropped_logs, reload_crl, runtime

__all__ = [
    "client_add", "client_revoke",
    "CIPHERS_TLS12", "CIPHERSUITES_TLS13", "DEFAULT_WORKDIR", "GRPC_CODES", "GRPC_PORT", "HEALTH_PORT", "LOG_FORMAT",
    "REST_PORT", "STATE_FILE", "VERIFY_REASONS", "DoorError", "DoorFiles", "DoorFront", "door_config",
    "REPLICA_KEY_MINUTES", "KeyedReplica", "reload", "running", "start", "start_replica", "stop",
    "DEFAULT_PER_MINUTE", "ENDPOINTS", "ClientPolicy", "read_policy", "write_maps", "write_policy",
    "apply_policy", "dropped_logs", "reload_crl", "runtime",
]  # fmt: skip
