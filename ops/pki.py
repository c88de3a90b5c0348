"""A local certificate authority for the front door, for development and tests ONLY.

``python -m ops.pki init|client-add|client-revoke|list [--dir certs]`` (``make certs``,
``make client-add NAME=x``, ``make client-revoke NAME=x``): a stand-in for a hospital's PKI made with the
``openssl`` command line, so that development, the tests and ``make serve TLS=1`` use real certificates, a
real revocation list and the door's real checks. The files it writes: docs/SECURITY.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from model.paths import ROOT

DEFAULT_DIR = ROOT / "certs"
WARNING = "# DEVELOPMENT AND TESTS ONLY: made by KOA-Serve's `make certs` (ops/pki.py); never use it in production."
ORG = "KOA-Serve development PKI - NOT FOR PRODUCTION"
# The CN a client's certificate carries is its identity at the door: letters, digits, '-', '_', '.'.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CA_DAYS, SERVER_DAYS, CLIENT_DAYS, CRL_DAYS = 3650, 825, 365, 30

log = logging.getLogger(__name__)


class PKIError(RuntimeError):
    """openssl failed, or the request does not fit the authority's state; the message says what to do."""


@dataclass(frozen=True)
class ClientCert:
    """One calling system's certificate: its name (the CN), the certificate and key files."""

    name: str
    cert: Path
    key: Path


CA_CONFIG = """{warning}
[ ca ]
default_ca = koa

[ koa ]
dir = {dir}
database = $dir/ca/index.txt
serial = $dir/ca/serial
crlnumber = $dir/ca/crlnumber
new_certs_dir = $dir/ca/newcerts
certificate = $dir/ca.crt
private_key = $dir/ca/ca.key
default_md = sha256
default_days = {client_days}
default_crl_days = {crl_days}
policy = policy_any
unique_subject = no
copy_extensions = none
preserve = yes

[ policy_any ]
organizationName = supplied
commonName = supplied

[ client_ext ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[ server_ext ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}

[ crl_ext ]
authorityKeyIdentifier = keyid
"""


def _openssl(*args: str | Path, stdin: str | None = None) -> str:
    exe = shutil.which("openssl")
    if exe is None:
        raise PKIError("the openssl command is needed: sudo apt-get install -y openssl")
    done = subprocess.run([exe, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise PKIError(f"openssl {args[0]} failed: {(done.stderr or done.stdout).strip()[-1500:]}")
    return done.stdout


def _private(path: Path) -> None:
    os.chmod(path, 0o600)


def _mark(path: Path) -> None:
    """Put the development-only warning on the first line of a PEM file (openssl skips text before a block)."""
    text = path.read_text()
    if not text.startswith(WARNING):
        path.write_text(f"{WARNING}\n{text}")


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    _private(path)
    _mark(path)


def _asn1_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y%m%d%H%M%SZ")


def _config(d: Path) -> Path:
    return d / "ca" / "ca.cnf"


def is_initialised(d: Path = DEFAULT_DIR) -> bool:
    d = Path(d)
    return all((d / f).is_file() for f in ("ca.crt", "server.pem", "crl.pem", "ca/ca.cnf", "ca/ca.key"))


def init(d: Path = DEFAULT_DIR, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), force: bool = False) -> Path:
    """Make the authority, the door's certificate for ``hosts`` and an empty revocation list in ``d``.

    An existing authority is kept (clients issued from it stay valid) unless ``force``. Returns ``d``.
    """
    d = Path(d).resolve()
    if is_initialised(d) and not force:
        log.info("%s already holds a development CA; kept (force=True makes a new one)", d)
        return d
    if force and d.exists():
        shutil.rmtree(d)
    (d / "ca" / "newcerts").mkdir(parents=True, exist_ok=True)
    (d / "clients").mkdir(exist_ok=True)
    os.chmod(d / "ca", 0o700)
    (d / "ca" / "index.txt").write_text("")
    (d / "ca" / "serial").write_text(os.urandom(8).hex().upper() + "\n")
    (d / "ca" / "crlnumber").write_text("1000\n")
    san = _san(hosts)
    cfg = CA_CONFIG.format(warning=WARNING, dir=d, client_days=CLIENT_DAYS, crl_days=CRL_DAYS, san=san)
    _config(d).write_text(cfg)
    (d / "README").write_text(
        f"{WARNING}\nA local certificate authority for KOA-Serve's front door (docs/SECURITY.md).\n"
        "A hospital deployment names its own PKI's files instead (DOOR_CERT, DOOR_CA, DOOR_CRL).\n"
    )
    # The authority: self-signed, allowed to sign certificates and revocation lists only.
    _new_key(d / "ca" / "ca.key")
    _openssl(
        "req", "-x509", "-new", "-key", d / "ca" / "ca.key", "-out", d / "ca.crt", "-days", str(CA_DAYS),
        "-subj", f"/O={ORG}/CN=KOA-Serve development CA ({d.name})",
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    _mark(d / "ca.crt")
    # The door's certificate, signed like any other, for the hosts clients connect to.
    _new_key(d / "server.key")
    csr = d / "ca" / "server.csr"
    _openssl("req", "-new", "-key", d / "server.key", "-out", csr, "-subj", f"/O={ORG}/CN={hosts[0]}")
    _sign(d, csr, d / "server.crt", "server_ext", days=SERVER_DAYS)
    server_pem = d / "server.pem"
    server_pem.write_text(_pem_only(d / "server.crt") + _pem_only(d / "server.key"))
    _private(server_pem)
    _mark(server_pem)
    gen_crl(d)
    log.info("development CA in %s (ca.crt, server.pem, crl.pem)", d)
    return d


def _pem_only(path: Path) -> str:
    text = path.read_text()
    return text[text.index("-----BEGIN") :]


def _sign(
    d: Path,
    csr: Path,
    out: Path,
    extensions: str,
    days: int | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> None:
    args: list[str | Path] = ["ca", "-batch", "-notext", "-config", _config(d), "-extensions", extensions]
    args += ["-in", csr, "-out", out]
    if not_before is not None or not_after is not None:
        start = not_before or datetime.now(UTC) - timedelta(minutes=5)
        end = not_after or start + timedelta(days=days or CLIENT_DAYS)
        args += ["-startdate", _asn1_time(start), "-enddate", _asn1_time(end)]
    else:
        args += ["-days", str(days or CLIENT_DAYS)]
    _openssl(*args)
    _mark(out)


def gen_crl(d: Path = DEFAULT_DIR) -> Path:
    """Write ``<d>/crl.pem``, the authority's current revocation list (valid ``CRL_DAYS``)."""
    d = Path(d).resolve()
    out = d / "crl.pem"
    tmp = d / "crl.pem.tmp"
    _openssl("ca", "-batch", "-gencrl", "-config", _config(d), "-crlexts", "crl_ext", "-out", tmp)
    _mark(tmp)
    os.replace(tmp, out)
    return out


def _check(d: Path, name: str) -> Path:
    d = Path(d).resolve()
    if not is_initialised(d):
        raise PKIError(f"no development CA in {d}: run `make certs` first")
    if not NAME_RE.match(name):
        raise ValueError(
            f"client name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return d


def add_client(
    name: str,
    d: Path = DEFAULT_DIR,
    days: int = CLIENT_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    force: bool = False,
) -> ClientCert:
    """Issue ``<d>/clients/<name>.crt`` and ``.key`` (CN = ``name``); ``not_before``/``not_after`` set its
    validity explicitly (the tests make an expired one). An existing certificate is kept unless ``force``."""
    d = _check(d, name)
    cert, key = d / "clients" / f"{name}.crt", d / "clients" / f"{name}.key"
    if cert.is_file() and key.is_file() and not force:
        raise PKIError(f"{cert} exists: revoke it first (`make client-revoke NAME={name}`) or pass --force")
    _new_key(key)
    csr = d / "ca" / f"{name}.csr"
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/O={ORG}/CN={name}")
    _sign(d, csr, cert, "client_ext", days=days, not_before=not_before, not_after=not_after)
    csr.unlink()
    return ClientCert(name, cert, key)


def add_peer(name: str, d: Path = DEFAULT_DIR, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> ClientCert:
    """A certificate for a DICOM peer (Orthanc, the gateway): it both accepts TLS (serverAuth, for ``hosts``)
    and opens it (clientAuth), as each side of DICOM TLS does both. Written as ``<d>/peers/<name>.crt``/``.key``
    (reissued when called again)."""
    d = _check(d, name)
    (d / "peers").mkdir(exist_ok=True)
    cert, key = d / "peers" / f"{name}.crt", d / "peers" / f"{name}.key"
    _new_key(key)
    csr = d / "ca" / f"peer-{name}.csr"
    _openssl("req", "-new", "-key", key, "-out", csr, "-subj", f"/O={ORG}/CN={name}")
    ext = d / "ca" / f"peer-{name}.ext"
    ext.write_text(
        "[ peer_ext ]\nbasicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage = serverAuth,clientAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
        f"subjectAltName = {_san(hosts)}\n"
    )
    _openssl(
        "ca", "-batch", "-notext", "-config", _config(d), "-extfile", ext, "-extensions", "peer_ext",
        "-days", str(CLIENT_DAYS), "-in", csr, "-out", cert,
    )  # fmt: skip
    _mark(cert)
    csr.unlink()
    ext.unlink()
    return ClientCert(name, cert, key)


def _san(hosts: tuple[str, ...]) -> str:
    return ",".join(f"IP:{h}" if re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+:[0-9a-fA-F:]*", h) else f"DNS:{h}" for h in hosts)


def revoke_client(name: str, d: Path = DEFAULT_DIR) -> Path:
    """Revoke ``name``'s certificate and write the new revocation list; returns ``crl.pem``.

    The certificate and key files are renamed ``<name>.revoked-<serial>.*`` so that the name can be issued again.
    """
    d = _check(d, name)
    cert = d / "clients" / f"{name}.crt"
    if not cert.is_file():
        raise PKIError(f"no certificate for {name!r} in {d / 'clients'} (`python -m ops.pki list`)")
    _openssl("ca", "-batch", "-config", _config(d), "-revoke", cert, "-crl_reason", "cessationOfOperation")
    crl = gen_crl(d)
    serial = serial_of(cert)
    for suffix in (".crt", ".key"):
        f = d / "clients" / f"{name}{suffix}"
        if f.is_file():
            f.rename(d / "clients" / f"{name}.revoked-{serial}{suffix}")
    return crl


def serial_of(cert: Path) -> str:
    return _openssl("x509", "-noout", "-serial", "-in", cert).strip().split("=", 1)[1]


def issued(d: Path = DEFAULT_DIR) -> list[dict[str, str]]:
    """Every certificate the authority issued: {status (V valid, R revoked, E expired), serial, name, expires}."""
    index = Path(d) / "ca" / "index.txt"
    rows = []
    for line in index.read_text().splitlines() if index.is_file() else []:
        status, expires, _revoked, serial, _file, subject = line.split("\t")
        cn = re.search(r"CN=([^/]+)", subject)
        rows.append({"status": status, "serial": serial, "name": cn.group(1) if cn else subject, "expires": expires})
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("init", "client-add", "client-revoke", "list"))
    p.add_argument("name", nargs="?", help="the calling system's name (client-add, client-revoke)")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the certificates go (default certs/)")
    p.add_argument("--days", type=int, default=CLIENT_DAYS, help="validity of a client certificate")
    p.add_argument("--force", action="store_true", help="init: a new CA (every client must be issued again)")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        if args.command == "init":
            d = init(args.dir, force=args.force)
            print(f"development CA in {d}: ca.crt, server.pem (localhost, 127.0.0.1), crl.pem -- NOT for production")
        elif args.command == "list":
            for row in issued(args.dir):
                print(f"{row['status']}  {row['serial']}  {row['name']:<24} expires {row['expires']}")
        else:
            if not args.name:
                raise ValueError(f"{args.command} needs the client's name (make {args.command} NAME=<system>)")
            if args.command == "client-add":
                c = add_client(args.name, args.dir, days=args.days, force=args.force)
                print(f"issued {c.cert} and {c.key} (CN={c.name}); the door admits it once its policy lists it")
            else:
                print(f"revoked {args.name}; revocation list {revoke_client(args.name, args.dir)}")
    except (PKIError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main(get_args_parser().parse_args()))
