"""N TorchServe replicas on one machine behind HAProxy, with one bearer token checked at the front.

``python -m ops.cluster start|stop|status|token|rotate|reload|k8s-configmap [--replicas N] [--workdir DIR]``
(``make cluster N=2``, ``make cluster-stop``). What each command does, the ports and the token: docs/DEPLOY.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ops import server as ts
from ops.cluster.cli import add_front_args, print_states
from ops.cluster.config import Front
from ops.cluster.haproxy import ClusterError
from ops.cluster.k8s import K8S_DIR, k8s_configmap
from ops.cluster.lifecycle import DEFAULT_WORKDIR, reload_balancer, rotate, running, start, stop
from ops.cluster.tokens import KEY_FILE, read_tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops.cluster", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("start", "stop", "status", "token", "rotate", "reload", "k8s-configmap"))
    add_front_args(p, replicas=2, workdir=DEFAULT_WORKDIR, front=Front())
    args = p.parse_args(argv)
    try:
        if args.command == "start":
            front = Front(args.rest_port, args.grpc_port, args.health_port)
            t0 = time.monotonic()
            state = start(args.replicas, args.workdir, front, args.model_store, args.timeout, args.threads)
            print(f"{len(state['replicas'])} TorchServe replicas behind HAProxy ({time.monotonic() - t0:.0f} s)")
            print(f"  REST    http://127.0.0.1:{front.rest_port}/predictions/{ts.MODEL_NAME}")
            print(f"  gRPC    127.0.0.1:{front.grpc_port}")
            print(f"  health  http://127.0.0.1:{front.health_port}/ready (no token)")
            print(f"  token   {Path(args.workdir) / KEY_FILE} (--key-file), or: python -m ops.cluster token")
        elif args.command == "stop":
            t0 = time.monotonic()
            print("stopped" if stop(args.workdir) else "not running", f"({time.monotonic() - t0:.1f} s)")
        elif args.command == "status":
            return print_states(args.workdir, running(args.workdir))
        elif args.command == "token":
            tokens = read_tokens(args.workdir)
            if not tokens:
                raise ClusterError(f"no token in {args.workdir}: `make cluster` makes one")
            print(tokens[-1])
        elif args.command == "rotate":
            print(rotate(args.workdir))
        elif args.command == "reload":
            print(f"HAProxy reloaded (pid {reload_balancer(args.workdir)})")
        else:
            path = K8S_DIR / "configmap.yaml"
            path.write_text(k8s_configmap())
            print(f"wrote {path}")
    except (ClusterError, ts.ServeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
