"""Command line of the KOA-Serve client (``koa-client``, ``python -m koa_client``): grade and explain radiographs.

    koa-client predict IMAGE... [--grpc] [--explain] [--url URL | --grpc-target HOST:PORT] [--key-file PATH] [--json]

Prints each image's grade and probabilities and writes explanation overlays; docs/API.md ("Clients")
gives the options, TLS included, and the exit statuses.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from pathlib import Path
from typing import Any

from koa_client import TLS_KINDS, TOKEN_ENV, KOAClientError, load_token

DEFAULT_CLASS_NAMES = ("KL0", "KL1", "KL2", "KL3", "KL4")


# The server's explanation methods (handler.explain.METHODS, which this client may not import: it installs
# without the model code); tests/test_explain.py checks that the two lists agree.
EXPLAIN_METHODS = ("layercam", "gradcam", "ig", "ig_blur", "smoothgrad", "occlusion")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m koa_client", description="KOA-Serve client (REST or gRPC).")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="grade knee radiographs (PNG, JPEG, DICOM)")
    pr.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    pr.add_argument("--grpc", action="store_true", help="use gRPC instead of REST")
    pr.add_argument("--explain", action="store_true", help="also explain the grade (writes an overlay PNG)")
    pr.add_argument("--target", default=None, help="grade 0-4 or class name to explain (implies --explain)")
    pr.add_argument(
        "--method",
        choices=EXPLAIN_METHODS,
        default=None,
        help="attribution (implies --explain); the server's default is layercam (docs/EXPLAIN.md)",
    )
    pr.add_argument("--url", default="http://127.0.0.1:8080", help="REST inference address (https://... for TLS)")
    pr.add_argument(
        "--grpc-target", default="127.0.0.1:7070", help="gRPC inference host:port (grpcs://host:port for TLS)"
    )
    auth = pr.add_mutually_exclusive_group()
    auth.add_argument("--token", default=None, help=f"inference key (default: ${TOKEN_ENV}, then --key-file)")
    auth.add_argument("--key-file", type=Path, default=None, help="TorchServe's key_file.json")
    pr.add_argument("--model", default="oamen")
    pr.add_argument("--site", default=None, help="the site profile to answer with (docs/SITES.md)")
    pr.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    pr.add_argument(
        "--retry-s",
        type=float,
        default=0.0,
        help="keep sending a request for this many seconds while the server is unreachable or answers 503 "
        "(e.g. during a restart); with --key-file a missing key file is waited for and a refused key is re-read "
        "from it. Default 0: fail at once",
    )
    tls = pr.add_argument_group("TLS (https:// URL or grpcs:// target)")
    tls.add_argument(
        "--ca-file", "--ca", type=Path, default=None, help="PEM CA bundle to trust instead of the system's"
    )
    tls.add_argument(
        "--cert-file", "--cert", type=Path, default=None, help="PEM client certificate, for mutual TLS (no token then)"
    )
    tls.add_argument(
        "--cert-key-file", "--key", type=Path, default=None, help="PEM key of --cert-file (default: in the same file)"
    )
    pr.add_argument("--overlay-dir", type=Path, default=Path("reports/explain"), help="where overlay PNGs go")
    pr.add_argument("--json", action="store_true", help="print the raw JSON answers")
    return p


def _target(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.strip().lstrip("-").isdigit() else value.strip()


def format_answer(name: str, answer: dict[str, Any]) -> str:
    """Human-readable lines for one answer: a crop's grade, or each knee of a whole film."""
    if isinstance(answer.get("knees"), list):
        lines = [f"{name}: whole film, {len(answer['knees'])} knee joint(s) found"]
        for n, knee in enumerate(answer["knees"]):
            x0, y0, x1, y1 = (round(v) for v in knee.get("box", (0, 0, 0, 0)))
            where = f"knee {n + 1} ({knee.get('side')} of the image"
            source = {"dicom": "DICOM header", "marker": "burned-in marker"}.get(knee.get("laterality_source") or "")
            if knee.get("laterality"):
                where += f", laterality {knee['laterality']}" + (f" from the {source}" if source else "")
            where += ")"
            where += f" box [{x0}, {y0}, {x1}, {y1}]"
            if "refused" in knee:
                lines.append(f"  {where}: not graded ({knee['refused'].get('type')}): {knee['refused'].get('message')}")
            else:
                lines.extend("  " + line for line in format_grade(where, knee).splitlines())
        return "\n".join(lines)
    return format_grade(name, answer)


def format_grade(name: str, answer: dict[str, Any]) -> str:
    """Human-readable lines for one grade (a crop's answer, or one knee of a film)."""
    names = answer.get("class_names") or DEFAULT_CLASS_NAMES
    probs = answer.get("probabilities") or []
    first = f"{name}: KL{answer.get('kl_grade')} ({answer.get('label', answer.get('class_name', ''))})"
    if "confidence" in answer:  # answer schema v2
        first += f", confidence {answer['confidence']:.3f}"
    if answer.get("uncertain"):
        first += "  [UNCERTAIN: a reader should double-check]"
    lines = [first, "  " + "  ".join(f"{n} {p:.3f}" for n, p in zip(names, probs))]
    if "oa_probability" in answer:
        lines.append(f"  P(OA, KL>=2) {answer['oa_probability']:.3f}")
    return "\n".join(lines)


def write_overlays(answer: dict[str, Any], image: Path, out_dir: Path) -> list[Path]:
    """The explanation overlays of an answer: one for a crop (at the crop's size); for a whole film, the
    film at its native size with each knee's map in its box (``<stem>_<method>_film.png``), or from a
    server that draws none, one per graded knee (``<stem>_knee<N>_<method>_KL<target>.png``)."""
    film = answer.get("explanation")
    if isinstance(answer.get("knees"), list) and isinstance(film, dict) and film.get("overlay_png"):
        return [write_overlay({"explanation": {**film, "target": "film"}}, image, out_dir)]
    if isinstance(answer.get("knees"), list):
        graded = [(n, k) for n, k in enumerate(answer["knees"]) if "kl_grade" in k]
        return [write_overlay(k, image, out_dir, f"_knee{n + 1}") for n, k in graded]
    return [write_overlay(answer, image, out_dir)]


def write_overlay(answer: dict[str, Any], image: Path, out_dir: Path, suffix: str = "") -> Path:
    """Write the explanation's overlay PNG as ``<stem><suffix>_<method>_KL<target>.png``; returns its path.

    Raises:
        ValueError: the answer has no explanation overlay, or it is not valid base64.
    """
    exp = answer.get("explanation")
    if not isinstance(exp, dict) or not exp.get("overlay_png"):
        raise ValueError("the answer has no explanation overlay")
    try:
        png = base64.b64decode(exp["overlay_png"], validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError("the explanation's overlay_png is not valid base64") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    target = exp.get("target", "x")
    grade = "film" if target == "film" else f"KL{target}"
    path = out_dir / f"{image.stem}{suffix}_{exp.get('method', 'explain')}_{grade}.png"
    path.write_bytes(png)
    return path


def make_client(args: argparse.Namespace, token: str) -> Any:
    options = {
        "token": token,
        "model": args.model,
        "timeout": args.timeout,
        "key_file": args.key_file,
        "retry_s": args.retry_s,
        "ca_file": args.ca_file,
        "cert_file": args.cert_file,
        "cert_key_file": args.cert_key_file,
    }
    if args.grpc:
        from koa_client.grpc_client import GrpcClient  # lazy: REST calls need no grpc

        return GrpcClient(args.grpc_target, **options)
    from koa_client.rest import RestClient  # lazy: gRPC calls need no requests

    return RestClient(args.url, **options)


# Where `make serve` (`ops.server`) starts TorchServe, which writes its keys there.
LOCAL_KEY_FILE = Path("logs/serve/key_file.json")


def local_key_file(args: argparse.Namespace) -> Path | None:
    """The key file of the server `make serve` started, when no token was given and it is there (or,
    with ``--retry-s``, when its folder is: a restarting server writes its new key file there)."""
    if args.token or os.environ.get(TOKEN_ENV) or args.key_file is not None or args.cert_file is not None:
        return None
    there = LOCAL_KEY_FILE.is_file() or (args.retry_s > 0 and LOCAL_KEY_FILE.parent.is_dir())
    return LOCAL_KEY_FILE if there else None


def predict(args: argparse.Namespace) -> int:
    found = local_key_file(args)
    if found is not None:
        print(
            f"no token given: using the local server's key from {found} (the server of `make serve`)", file=sys.stderr
        )
        args.key_file = found
    try:
        # Behind KOA-Serve's front door (make serve TLS=1) the client certificate is the credential: the door
        # holds TorchServe's key, so a caller with a certificate and no token sends none.
        door = args.cert_file is not None and not (args.token or os.environ.get(TOKEN_ENV) or args.key_file)
        token = "" if door else load_token(args.token, args.key_file, wait_s=args.retry_s)
        client = make_client(args, token)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    explain = args.explain or args.target is not None or args.method is not None
    target = _target(args.target)
    if isinstance(target, int) and target < 0:
        print(f"error: --target must be a grade 0-4 or a class name such as KL3, got {args.target}", file=sys.stderr)
        return 2
    failed = 0
    for i, image in enumerate(args.images):
        try:
            data = image.read_bytes()
        except OSError as exc:
            print(f"{image}: cannot read: {exc.strerror or exc}", file=sys.stderr)
            failed += 1
            continue
        try:
            site = {"site": args.site} if args.site else {}  # only when asked: fakes and older clients lack it
            answer = client.predict(data, explain=explain, target=target, method=args.method, **site)
        except KOAClientError as exc:
            if exc.kind in TLS_KINDS:  # the same for every image: say it once and stop
                print(f"error: {exc.message}", file=sys.stderr)
                failed += len(args.images) - i
                break
            refused = f"not graded ({exc.kind})" if exc.kind == "not_a_knee" else f"server answered {exc.status}"
            print(f"{image}: {refused}: {exc.message}", file=sys.stderr)
            failed += 1
            continue
        except (TypeError, ValueError) as exc:
            print(f"{image}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if args.json:
            print(json.dumps(answer))
        else:
            print(format_answer(image.name, answer))
        if explain:
            try:
                for path in write_overlays(answer, image, args.overlay_dir):
                    print(f"  overlay {path}", file=sys.stderr if args.json else sys.stdout)
            except (OSError, ValueError) as exc:
                print(f"{image}: no overlay written: {exc}", file=sys.stderr)
                failed += 1
    close = getattr(client, "close", None)
    if close is not None:
        close()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help
        return int(exc.code or 0)
    return predict(args)


if __name__ == "__main__":
    sys.exit(main())
