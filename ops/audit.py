"""The audit trail: one JSON line per request, append-only, rotated, each line chained to the one before.

``python -m ops.audit verify [PATH]``  checks a trail (its rotated files too); exit 0 when intact, 1 otherwise.
``python -m ops.audit serve --socket S --out PATH``  the front door's receiver (ops/door/ starts it).
``python -m ops.audit show [PATH]``  prints the records, oldest first.

One process writes, so the chain has one order. How the chain, the head file and rotation work, where the
door's lines come from and what a record never holds: docs/SECURITY.md ("The audit trail").
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
MAX_BYTES = 16 * 1024 * 1024
KEEP = 20  # rotated files kept; older ones are deleted (the chain then starts at the oldest kept)
# Fields a door record may carry; anything else in a datagram is dropped (a log format edited by mistake
# cannot smuggle a new field, e.g. a header with a patient identifier, into the trail).
DOOR_FIELDS = (
    "client",
    "endpoint",
    "protocol",
    "request_id",
    "status",
    "grade",
    "refusal",
    "latency_ms",
    "tls",
    "model",
)

log = logging.getLogger(__name__)


def line_hash(line: bytes) -> str:
    """SHA-256 (hex) of one line's bytes, newline excluded."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def trail_files(path: Path) -> list[Path]:
    """The trail's files, oldest first: the rotated ``<path>.<first seq>`` by number, then ``path`` itself."""
    path = Path(path)
    rotated = []
    for p in path.parent.glob(f"{path.name}.*"):
        suffix = p.name[len(path.name) + 1 :]
        if suffix.isdigit():
            rotated.append((int(suffix), p))
    files = [p for _, p in sorted(rotated)]
    if path.is_file():
        files.append(path)
    return files


def _last_line(path: Path) -> bytes | None:
    """The last complete line of a file (a torn line after a crash is ignored), or None."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        lines = [ln for ln in f.read().split(b"\n")]
    complete = lines[:-1]  # the piece after the last newline is torn (or empty)
    return complete[-1] if complete else None


class ChainWriter:
    """Appends chained JSON lines to ``path`` (thread-safe), rotating at ``max_bytes``, syncing each line."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = MAX_BYTES, keep: int = KEEP, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.keep, self.fsync = max_bytes, keep, fsync
        self._lock = threading.Lock()
        self.seq, self.prev = 0, GENESIS
        self._set_aside_unchained()
        for f in reversed(trail_files(self.path)):
            last = _last_line(f)
            if last is not None:
                self.seq, self.prev = json.loads(last)["seq"] + 1, line_hash(last)
                break
        self._repair_torn_tail()

    def _set_aside_unchained(self) -> None:
        """A log written before it was chained (the gateway's, from an older version) is renamed
        ``<name>.unchained-<UTC time>`` and kept; the chain starts in a new file."""
        if not self.path.is_file():
            return
        last = _last_line(self.path)
        try:
            chained = last is None or "seq" in json.loads(last)
        except ValueError:
            chained = True  # a torn line: repaired below, reported by verify
        if not chained:
            aside = self.path.with_name(f"{self.path.name}.unchained-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
            os.replace(self.path, aside)
            log.warning("%s was not a chained trail: kept as %s; a new chain starts", self.path, aside)

    def _repair_torn_tail(self) -> None:
        """A crash in the middle of a write leaves a line without its newline: end it, so that the next
        line starts cleanly (verify reports the torn line; it is never silently dropped)."""
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write ``record`` with its ``seq`` and ``prev``; returns the record as written."""
        with self._lock:
            if self.path.is_file() and self.path.stat().st_size >= self.max_bytes:
                self._rotate()
            full = {"seq": self.seq, **{k: v for k, v in record.items() if k not in ("seq", "prev")}, "prev": self.prev}
            line = json.dumps(full, ensure_ascii=True, separators=(",", ":"), default=str).encode()
            with open(self.path, "ab") as f:
                f.write(line + b"\n")
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            self.seq, self.prev = self.seq + 1, line_hash(line)
            self._write_head()
            return full

    def _write_head(self) -> None:
        head = self.path.with_name(self.path.name + ".head")
        tmp = head.with_name(head.name + ".tmp")
        tmp.write_text(json.dumps({"seq": self.seq - 1, "hash": self.prev}) + "\n")
        os.replace(tmp, head)

    def _rotate(self) -> None:
        first = json.loads(self.path.open("rb").readline())["seq"]
        os.replace(self.path, self.path.with_name(f"{self.path.name}.{first}"))
        rotated = trail_files(self.path)
        for old in rotated[: max(0, len(rotated) - self.keep)]:
            old.unlink()


@dataclass
class Verdict:
    """What `verify` found: ``ok``, how many lines and files it checked, and the first problem (file, line)."""

    ok: bool
    lines: int = 0
    files: list[str] = field(default_factory=list)
    problem: str = ""
    anchor: str = GENESIS  # ``prev`` of the oldest line kept: GENESIS when the trail is whole


def verify(path: str | os.PathLike[str]) -> Verdict:
    """Check every line of the trail at ``path`` (rotated files included) and its head."""
    path = Path(path)
    files = trail_files(path)
    v = Verdict(ok=True, files=[str(f) for f in files])
    if not files:
        return Verdict(ok=False, problem=f"no audit trail at {path}")
    seq, prev = None, None
    head = path.with_name(path.name + ".head")
    h = json.loads(head.read_text()) if head.is_file() else None
    at_head = None  # the hash of the line the head names, met on the way
    for f in files:
        for n, raw in enumerate(f.read_bytes().split(b"\n")[:-1], 1):
            where = f"{f.name} line {n}"
            try:
                rec = json.loads(raw)
            except ValueError:
                return Verdict(False, v.lines, v.files, f"{where}: not JSON (a torn or edited line)", v.anchor)
            if not isinstance(rec, dict) or "seq" not in rec or "prev" not in rec:
                return Verdict(False, v.lines, v.files, f"{where}: no seq/prev: not a chained line", v.anchor)
            if seq is None:
                v.anchor = rec["prev"]
                if rec["seq"] != 0 and rec["prev"] == GENESIS:
                    return Verdict(
                        False, v.lines, v.files, f"{where}: seq {rec['seq']} claims to be the first", v.anchor
                    )
            else:
                if rec["seq"] != seq + 1:
                    return Verdict(False, v.lines, v.files, f"{where}: seq {rec['seq']} after {seq}", v.anchor)
                if rec["prev"] != prev:
                    return Verdict(
                        False, v.lines, v.files, f"{where} (seq {rec['seq']}): the line before it was changed", v.anchor
                    )
            seq, prev = rec["seq"], line_hash(raw)
            if h is not None and seq == h["seq"]:
                at_head = prev
            v.lines += 1
        tail = f.read_bytes()
        if tail and not tail.endswith(b"\n"):
            return Verdict(False, v.lines, v.files, f"{f.name}: its last line is torn (no newline)", v.anchor)
    if h is not None:
        # The head may lag the file by the line being written (a live writer appends, then updates the
        # head): it must name a line that is there, with that line's hash; a head past the end means
        # lines were removed from the end.
        if seq is None or h["seq"] > seq or (at_head is not None and at_head != h["hash"]):
            return Verdict(
                False,
                v.lines,
                v.files,
                f"the trail ends at seq {seq} but its head names seq {h['seq']}: lines removed or rewritten",
                v.anchor,
            )
    return v


def read_trail(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of the trail, oldest first."""
    out = []
    for f in trail_files(Path(path)):
        for raw in f.read_bytes().split(b"\n"):
            with contextlib.suppress(ValueError):
                if raw:
                    out.append(json.loads(raw))
    return out


# --------------------------------------------------------------------------- the door's receiver
_DASH = re.compile(r'"(-)"')


def door_record(datagram: bytes) -> dict[str, Any] | None:
    """One audit record from HAProxy's log datagram (the JSON of ops/door/config.py's ``LOG_FORMAT``), or None.

    HAProxy writes ``-`` for a value it does not have (no certificate, no grade): that becomes null.
    """
    text = datagram.decode("utf-8", errors="replace").strip()
    start = text.find("{")  # a syslog header, if HAProxy ever sends one, is skipped
    if start < 0:
        return None
    try:
        raw = json.loads(text[start:])
    except ValueError:
        log.warning("an audit datagram that is not JSON: %r", text[:200])
        return None
    rec: dict[str, Any] = {}
    accept = raw.get("accept")
    try:
        rec["time"] = datetime.fromtimestamp(float(accept), UTC).isoformat(timespec="milliseconds")
    except (TypeError, ValueError):
        rec["time"] = datetime.now(UTC).isoformat(timespec="milliseconds")
    for k in DOOR_FIELDS:
        val = raw.get(k)
        rec[k] = None if val in ("-", "", None) else val
    for k in ("status", "latency_ms", "grade"):
        with contextlib.suppress(TypeError, ValueError):
            rec[k] = int(rec[k]) if rec[k] is not None else None
    rec["source"] = "door"
    return rec


def serve(sock_path: Path, out: Path, max_bytes: int = MAX_BYTES, stop: threading.Event | None = None) -> None:
    """Receive the door's datagrams on ``sock_path`` and append them to the trail ``out`` until ``stop``
    (or SIGTERM when run as a command)."""
    sock_path = Path(sock_path)
    sock_path.unlink(missing_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)  # bursts wait here, not dropped
    s.bind(str(sock_path))
    os.chmod(sock_path, 0o600)
    s.settimeout(0.2)
    writer = ChainWriter(out, max_bytes=max_bytes)
    log.info("audit receiver on %s -> %s (next seq %d)", sock_path, out, writer.seq)
    stop = stop or threading.Event()
    try:
        while not stop.is_set():
            try:
                data = s.recv(65536)
            except TimeoutError:
                continue
            rec = door_record(data)
            if rec is not None:
                writer.append(rec)
    finally:
        s.close()
        sock_path.unlink(missing_ok=True)


def iter_lines(path: Path) -> Iterator[str]:
    for rec in read_trail(path):
        yield json.dumps(rec)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("verify", "serve", "show"))
    p.add_argument("path", nargs="?", type=Path, default=Path("logs/door/audit.jsonl"), help="the trail")
    p.add_argument("--socket", type=Path, help="serve: the Unix datagram socket HAProxy logs to")
    p.add_argument("--out", type=Path, help="serve: the trail to append to (default: PATH)")
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES, help="serve: rotate past this size")
    return p


def main(args: argparse.Namespace) -> int:
    if args.command == "verify":
        v = verify(args.path)
        if v.ok:
            start = "from the first line ever written" if v.anchor == GENESIS else f"from kept anchor {v.anchor[:12]}"
            print(f"intact: {v.lines} lines in {len(v.files)} file(s), chained {start}")
            return 0
        print(f"BROKEN after {v.lines} good lines: {v.problem}", file=sys.stderr)
        return 1
    if args.command == "show":
        for line in iter_lines(args.path):
            print(line)
        return 0
    if args.socket is None:
        print("error: serve needs --socket", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve(args.socket, args.out or args.path, args.max_bytes, stop)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
