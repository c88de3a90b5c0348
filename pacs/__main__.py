"""Command line behind ``make pacs``, ``make pacs-stop``, ``make pacs-credentials`` and ``make pacs-demo``.

python -m pacs start [--workdir pacs/data] [--ts-url URL] [--key-file logs/serve/key_file.json]
python -m pacs stop | credentials | status
python -m pacs demo IMAGE [--laterality R|L] [--timeout 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pacs
from gateway.audit import read_audit
from gateway.report import content_tree, result_uid
from ops.procs import is_alive, read_pid
from pacs.workdir import state

# where make monitor's Prometheus scrapes the gateway (deploy/monitoring/prometheus.yml)
GATEWAY_METRICS_PORT = 9464

__all__ = ["get_args_parser", "main"]

DOOR_CLIENT = "koaserve-gateway"  # the gateway's identity at the front door (make pacs TLS=1)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pacs", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("start", "stop", "credentials", "status", "demo"))
    p.add_argument("image", nargs="?", type=Path, help="demo: a DICOM, PNG or JPEG knee radiograph")
    p.add_argument("--workdir", type=Path, default=pacs.DEFAULT_WORKDIR)
    p.add_argument("--http-port", type=int, default=8042)
    p.add_argument("--dicom-port", type=int, default=4242)
    p.add_argument("--gateway-port", type=int, default=11112)
    p.add_argument("--ts-url", default="http://127.0.0.1:8080", help="KOA-Serve's REST address (make serve)")
    p.add_argument("--key-file", type=Path, default=pacs.ROOT / "logs" / "serve" / "key_file.json")
    p.add_argument("--laterality", choices=("R", "L"), default=None, help="demo: the knee's side, for a PNG/JPEG")
    p.add_argument("--timeout", type=float, default=300.0, help="demo: seconds to wait for the report")
    p.add_argument("--tls", action="store_true", help="DICOM over TLS both ways (start; demo sends over TLS too)")
    p.add_argument("--certs", type=Path, default=pacs.ROOT / "certs", help="--tls: the CA of `make certs`")
    return p


def _orthanc(workdir: Path) -> pacs.Orthanc:
    found = state(workdir)
    if "http_port" not in found:
        raise pacs.PacsError(f"no PACS started from {workdir}: `make pacs` first")
    return pacs.Orthanc(workdir.resolve(), f"http://127.0.0.1:{found['http_port']}", found["dicom_port"])


def start(args: argparse.Namespace) -> None:
    tls = pacs.pacs_tls(args.certs) if args.tls else None
    door, key_file = None, args.key_file
    if args.ts_url.startswith("https://"):  # grading through the front door: the gateway's own certificate
        clients = args.certs / "clients"
        door = pacs.DoorCerts(args.certs / "ca.crt", clients / f"{DOOR_CLIENT}.crt", clients / f"{DOOR_CLIENT}.key")
        if not all(f.is_file() for f in (door.ca, door.cert, door.key)):
            raise pacs.PacsError(f"no door certificate for the gateway: make client-add NAME={DOOR_CLIENT}")
        key_file = None
    orthanc = pacs.start_orthanc(args.workdir, args.http_port, args.dicom_port, args.gateway_port, tls=tls)
    try:
        pacs.start_gateway(
            args.workdir, args.gateway_port, args.ts_url, key_file, args.dicom_port, max_backoff_s=30.0, tls=tls,
            door=door, metrics_port=GATEWAY_METRICS_PORT,
        )  # fmt: skip
    except pacs.PacsError:
        pacs.stop_orthanc(args.workdir)
        raise
    resent = pacs.resubmit_failed_routing(orthanc)
    user = pacs.credentials(args.workdir)[0]
    print(f"Orthanc   DICOM ORTHANC@127.0.0.1:{args.dicom_port}   REST {orthanc.http_url} (user {user}; ", end="")
    print("`make pacs-credentials` prints user:password)")
    print(f"gateway   DICOM KOASERVE@127.0.0.1:{args.gateway_port} -> KOA-Serve {args.ts_url}")
    if tls is not None:
        print(f"DICOM TLS both ways; certificates in {args.certs}/peers (development only), CA {tls.ca}")
    print(f"data      {args.workdir} (storage, spool, audit.jsonl, logs)")
    if resent:
        print(f"resubmitted {resent} routing job(s) that failed while the gateway was down")


def demo(args: argparse.Namespace) -> int:
    if args.image is None:
        raise pacs.PacsError("demo needs an image: make pacs-demo IMAGE=tests/fixtures/knee_kl2.png")
    orthanc = _orthanc(args.workdir)
    ds = pacs.read_image(args.image)
    if args.laterality:
        ds.ImageLaterality = args.laterality
    uid = str(ds.SOPInstanceUID)
    try:
        tls_args = pacs.pacs_tls(args.certs).modality_args() if args.tls else None
        status = pacs.send([ds], orthanc.dicom_port, tls_args=tls_args)[0]
    except pacs.PacsError as exc:
        raise pacs.PacsError(f"{exc}: is the PACS running? (`make pacs`)") from None
    if status != 0:
        raise pacs.PacsError(f"Orthanc answered the C-STORE with status 0x{status:04X}")
    print(f"sent {args.image} as SOP Instance {uid} (study {ds.StudyInstanceUID}); waiting for the report...")
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        # The gateway writes its audit line once the SR and every heatmap are stored: wait for that,
        # not for the SR alone, or a heatmap stored a moment after it would be reported missing.
        record = next(
            (r for r in read_audit(args.workdir / "audit.jsonl") if r.get("sop_instance_uid") == uid
             and r["event"] in ("result", "refused", "skipped", "failed")),
            None,
        )  # fmt: skip
        if record is not None and record["event"] in ("skipped", "failed"):
            print(f"no report: {record['event']}: {record.get('reason')}")
            return 1
        if record is not None:
            sr = orthanc.instance(result_uid("sr", uid))
            if sr is None:
                print(f"the gateway reported {record['event']}, but Orthanc has no SR for it: see audit.jsonl")
                return 1
            print(content_tree(sr))
            wanted = record.get("sc_sop_instance_uids") or []
            stored = sum(1 for sc in wanted if orthanc.lookup(sc))
            print(f"heatmaps (secondary capture): {stored} of {len(wanted)} stored in the study" if wanted
                  else "heatmap (secondary capture): none (nothing was graded)")  # fmt: skip
            return 0 if stored == len(wanted) else 1
        time.sleep(0.5)
    print(f"no report within {args.timeout:.0f} s: see {args.workdir / 'gateway.log'} and audit.jsonl")
    return 1


def main(args: argparse.Namespace) -> int:
    try:
        if args.command == "start":
            start(args)
        elif args.command == "stop":
            gateway = pacs.stop_gateway(args.workdir)
            orthanc = pacs.stop_orthanc(args.workdir)
            said = {True: "stopped", False: "was not running"}
            print(f"gateway {said[gateway]}; Orthanc {said[orthanc]}")
        elif args.command == "credentials":
            print(":".join(pacs.credentials(args.workdir)))
        elif args.command == "status":
            running = {name: is_alive(read_pid(args.workdir / f"{name}.pid")) for name in ("orthanc", "gateway")}
            print(", ".join(f"{k} {'running' if v else 'stopped'}" for k, v in running.items()))
            return 0 if all(running.values()) else 1
        else:
            return demo(args)
    except pacs.PacsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
