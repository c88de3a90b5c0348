"""N TorchServe replicas on one machine behind HAProxy, one bearer token checked at the front
(``python -m ops.cluster``, ``make cluster``; docs/DEPLOY.md).

- `ops.cluster.config`: the balancer's HAProxy configuration (and the records it is made of);
- `ops.cluster.k8s`: the same configuration as the Kubernetes sidecar's, and the pod's ConfigMap;
- `ops.cluster.tokens`: the bearer tokens the balancer accepts and the clients' key file;
- `ops.cluster.haproxy`: the HAProxy process (start, reload, stop, stats), shared with `ops.door`;
- `ops.cluster.replicas`: the TorchServe replicas; `ops.cluster.state`: the state file;
- `ops.cluster.lifecycle`: the cluster as a whole (start, stop, status, token rotation).
"""

from ops.cluster.config import (
    ERROR_502_AS_503,
    GRPC_PORT,
    GRPC_SERVICE,
    HEALTH_PORT,
    REST_PORT,
    REST_PREFIXES,
    SERVER_TIMEOUT_S,
    UNAUTHORIZED,
    Front,
    Replica,
    haproxy_config,
)
from ops.cluster.haproxy import (
    ClusterError,
    answered,
    check_config,
    haproxy_binary,
    server_states,
    server_stats,
    wait_for_states,
)
from ops.cluster.k8s import K8S_DIR, K8S_HAPROXY_DIR, K8S_TOKEN_FILE, k8s_configmap, k8s_sidecar_config
from ops.cluster.lifecycle import (
    DEFAULT_WORKDIR,
    probe,
    reload_balancer,
    replicas_of,
    rotate,
    running,
    start,
    start_balancer,
    stop,
    stop_balancer,
)
from ops.cluster.replicas import (
    kill_replica,
    launch_replica,
    replica_keys,
    restart_replica,
    start_replica,
    threads_per_replica,
)
from ops.cluster.state import STATE_FILE, load_state
from ops.cluster.tokens import KEY_FILE, TOKENS_FILE, ensure_token, new_token, read_tokens, write_private, write_tokens

__all__ = [
    "ERROR_502_AS_503", "GRPC_PORT", "GRPC_SERVICE", "HEALTH_PORT", "REST_PORT", "REST_PREFIXES", "SERVER_TIMEOUT_S",
    "UNAUTHORIZED", "Front", "Replica", "haproxy_config",
    "ClusterError", "answered", "check_config", "haproxy_binary", "server_stats", "server_states", "wait_for_states",
    "K8S_DIR", "K8S_HAPROXY_DIR", "K8S_TOKEN_FILE", "k8s_configmap", "k8s_sidecar_config",
    "DEFAULT_WORKDIR", "probe", "reload_balancer", "replicas_of", "rotate", "running", "start", "start_balancer",
    "stop", "stop_balancer",
    "kill_replica", "launch_replica", "replica_keys", "restart_replica", "start_replica", "threads_per_replica",
    "STATE_FILE", "load_state",
    "KEY_FILE", "TOKENS_FILE", "ensure_token", "new_token", "read_tokens", "write_private", "write_tokens",
]  # fmt: skip
