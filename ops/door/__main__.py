"""The secure front door: HAProxy terminating mutual TLS in front of TorchServe, one identity per calling system.

``python -m ops.door start|stop|status|reload|client-add|client-revoke|reload-crl|config [options]``
(``make serve TLS=1``, ``make cluster N=2 TLS=1``, ``make client-add NAME=x``, ``make client-revoke NAME=x``).
What the door does to every request, and how revocation works without a restart: docs/SECURITY.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ops import pki
from ops import server as ts
from ops.cluster.cli import add_front_args, print_states
from ops.cluster.config import Replica
from ops.cluster.haproxy import ClusterError
from ops.door.clients import client_add, client_revoke
from ops.door.config import (
    DEFAULT_WORKDIR,
    DoorError,
    DoorFiles,
    DoorFront,
    door_config,
)
from ops.door.lifecycle import reload, running, start, stop
from ops.door.policy import DEFAULT_PER_MINUTE, ENDPOINTS, ClientPolicy, read_policy
from ops.door.runtime import dropped_logs, reload_crl
from ops.procs import is_alive, read_pid


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ops.door", description=__doc__.split("\n")[0])
    p.add_argument(
        "command", choices=("start", "stop", "status", "reload", "client-add", "client-revoke", "reload-crl", "config")
    )
    p.add_argument("name", nargs="?", help="client-add / client-revoke: the calling system's name (its CN)")
    add_front_args(p, replicas=1, workdir=DEFAULT_WORKDIR, front=DoorFront())
    p.add_argument("--certs", type=Path, default=pki.DEFAULT_DIR, help="the development CA (client-add/-revoke)")
    p.add_argument("--cert", default=DoorFiles.cert, help="the door's certificate, chain and key (PEM)")
    p.add_argument("--ca", default=DoorFiles.ca, help="the CA(s) that sign client certificates (PEM)")
    p.add_argument("--crl", default=DoorFiles.crl, help="the revocation list (PEM)")
    p.add_argument("--policy", default=DoorFiles.policy, help="who may call what (JSON)")
    p.add_argument("--endpoints", default=",".join(ENDPOINTS), help="client-add: the endpoints it may call")
    p.add_argument("--per-minute", type=int, default=DEFAULT_PER_MINUTE, help="client-add: its rate limit")
    p.add_argument("--no-issue", action="store_true", help="client-add: only allow NAME (its certificate exists)")
    return p


def main(args: argparse.Namespace) -> int:
    files = DoorFiles(args.cert, args.ca, args.crl, args.policy)
    front = DoorFront(args.rest_port, args.grpc_port, args.health_port)
    try:
        if args.command == "start":
            t0 = time.monotonic()
            a = args
            state = start(a.replicas, a.workdir, front, files, a.model_store, a.timeout, a.threads)
            up = f"{len(state['replicas'])} TorchServe replica(s) behind TLS"
            print(f"the door is up: {up} ({time.monotonic() - t0:.0f} s)")
            print(f"  REST   https://127.0.0.1:{front.rest_port}/predictions/{ts.MODEL_NAME}  (client certificate)")
            print(f"  gRPC   grpcs://127.0.0.1:{front.grpc_port}")
            print(f"  health http://127.0.0.1:{front.health_port}/ready")
            print(f"  audit  {Path(args.workdir) / 'audit.jsonl'} (python -m ops.audit verify)")
            if not read_policy(files.policy):
                print(f"  no client is allowed yet: make client-add NAME=<system> (policy {files.policy})")
        elif args.command == "stop":
            print("stopped" if stop(args.workdir) else "not running")
        elif args.command == "status":
            if print_states(args.workdir, running(args.workdir)):
                return 1
            print(
                f"audit receiver: {'alive' if is_alive(read_pid(args.workdir / 'audit-receiver.pid')) else 'DEAD'};"
                f" log lines dropped: {dropped_logs(args.workdir)}"
            )
        elif args.command == "config":
            print(door_config([Replica("r0", "", 8080, 7070)], front, files, args.workdir), end="")
        elif args.command == "reload":
            print(f"the door reloaded (HAProxy pid {reload(args.workdir)})")
        elif args.command == "reload-crl":
            print(reload_crl(args.workdir))
        else:
            if not args.name:
                raise ValueError(f"{args.command} needs the client's name (make {args.command} NAME=<system>)")
            if args.command == "client-add":
                pol = ClientPolicy([e for e in args.endpoints.split(",") if e], args.per_minute)
                c = client_add(args.name, files, args.certs, args.workdir, pol, issue=not args.no_issue)
                if c is not None:
                    print(f"issued {c.cert} and {c.key} (CN={c.name}; development CA)")
                print(f"{args.name} may call {pol.endpoints}, {pol.per_minute}/min (policy {files.policy})")
            else:
                client_revoke(args.name, files, args.certs, args.workdir)
                print(f"revoked {args.name}: new CRL {files.crl}; out of the policy")
    except (DoorError, ClusterError, ts.ServeError, pki.PKIError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
