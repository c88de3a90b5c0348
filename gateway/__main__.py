"""Command line of the DICOM gateway.

    python -m gateway serve --spool DIR [--port 11112] [--ts-url URL] [--key-file FILE] [--pacs AE@HOST:PORT]
    python -m gateway tree FILE.dcm         # print a Structured Report's content tree
    python -m gateway requeue --spool DIR   # put the instances of failed/ back into the queue (gateway stopped)

``serve`` runs until SIGTERM or SIGINT; what is queued then stays in the spool for the next start.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from gateway.report import content_tree
from gateway.service import DEFAULT_AE, DEFAULT_PORT, Gateway, GatewayConfig
from gateway.spool import Spool
from gateway.tls import DicomTLS

__all__ = ["DicomNode", "get_args_parser", "main", "parse_address"]


@dataclass(frozen=True)
class DicomNode:
    """A DICOM peer: its AE title, host and port."""

    ae: str
    host: str
    port: int


def parse_address(text: str) -> DicomNode:
    """``AE@HOST:PORT`` -> its `DicomNode`.

    Raises:
        ValueError: another shape, or a port that is not a number.
    """
    try:
        ae, rest = text.split("@", 1)
        host, port = rest.rsplit(":", 1)
        if not ae or not host or len(ae) > 16:
            raise ValueError
        return DicomNode(ae, host, int(port))
    except ValueError:
        msg = f"expected AE@HOST:PORT (AE at most 16 characters), e.g. ORTHANC@127.0.0.1:4242, got {text!r}"
        raise ValueError(msg) from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="receive, grade and store back until stopped")
    serve.add_argument("--spool", type=Path, required=True, help="spool folder (received, not yet finished)")
    serve.add_argument("--audit", type=Path, default=None, help="audit log (default: audit.jsonl beside the spool)")
    serve.add_argument("--ae-title", default=DEFAULT_AE)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument(
        "--allow", action="append", default=None, metavar="AE", help="calling AE allowed to send (repeat; ORTHANC)"
    )
    serve.add_argument("--allow-any", action="store_true", help="accept any calling AE (not advised)")
    serve.add_argument("--ts-url", default="http://127.0.0.1:8080", help="KOA-Serve REST inference address")
    serve.add_argument("--model", default="oamen")
    serve.add_argument("--key-file", type=Path, default=None, help="TorchServe's key_file.json (re-read on refusal)")
    serve.add_argument("--pacs", default="ORTHANC@127.0.0.1:4242", help="where results go: AE@HOST:PORT")
    serve.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer")
    serve.add_argument("--max-backoff", type=float, default=30.0, help="longest pause between retries (s)")
    serve.add_argument(
        "--site", action="append", default=[], metavar="SENDER=NAME",
        help="images from this sending AE title or InstitutionName are answered by site profile NAME (docs/SITES.md)",
    )  # fmt: skip
    serve.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on --host:PORT (docs/MONITORING.md)"
    )
    serve.add_argument("--log-level", default="INFO")
    door = serve.add_argument_group("KOA-Serve behind its front door (--ts-url https://...)")
    door.add_argument("--ts-ca", type=Path, default=None, help="the CA of the door's certificate")
    door.add_argument("--ts-cert", type=Path, default=None, help="the gateway's client certificate for the door")
    door.add_argument("--ts-key", type=Path, default=None, help="its key")
    tls = serve.add_argument_group("DICOM over TLS, both ways (all three, or none for plain DICOM)")
    tls.add_argument("--dicom-tls-cert", type=Path, default=None, help="the gateway's certificate (PEM)")
    tls.add_argument("--dicom-tls-key", type=Path, default=None, help="its key (PEM)")
    tls.add_argument("--dicom-tls-ca", type=Path, default=None, help="the CA that signs the PACS's certificate")
    tree = sub.add_parser("tree", help="print the content tree of an SR file")
    tree.add_argument("file", type=Path)
    requeue = sub.add_parser("requeue", help="move failed/ instances back into the queue")
    requeue.add_argument("--spool", type=Path, required=True)
    return p


def main(args: argparse.Namespace) -> int:
    if args.command == "tree":
        print(content_tree(dcmread(args.file)))
        return 0
    if args.command == "requeue":
        print(f"{Spool(args.spool).requeue_failed()} instance(s) queued again")
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pynetdicom", "highdicom"):  # one line per association / per copied module otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    pacs = parse_address(args.pacs)
    tls_files = (args.dicom_tls_cert, args.dicom_tls_key, args.dicom_tls_ca)
    if any(tls_files) and not all(tls_files):
        print("error: DICOM TLS needs --dicom-tls-cert, --dicom-tls-key and --dicom-tls-ca together", file=sys.stderr)
        return 2
    dicom_tls = DicomTLS(*map(str, tls_files)) if all(tls_files) else None
    allowed = () if args.allow_any else tuple(args.allow or ["ORTHANC"])
    gateway = Gateway(
        GatewayConfig(
            spool=args.spool,
            audit=args.audit,
            ae_title=args.ae_title,
            host=args.host,
            port=args.port,
            allowed_aets=allowed,
            ts_url=args.ts_url,
            model=args.model,
            key_file=args.key_file,
            pacs_ae=pacs.ae,
            pacs_host=pacs.host,
            pacs_port=pacs.port,
            timeout=args.timeout,
            max_backoff_s=args.max_backoff,
            dicom_tls=dicom_tls,
            ts_ca_file=args.ts_ca,
            ts_cert_file=args.ts_cert,
            ts_cert_key_file=args.ts_key,
            sites=dict(pair.split("=", 1) for pair in args.site if "=" in pair),
            metrics_port=args.metrics_port,
        )
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: gateway.stopping.set())
    return gateway.serve_forever()


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
