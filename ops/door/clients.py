"""Admit or revoke a calling system: its development certificate and its entry in the door's policy,
applied to a running door at once without dropping other clients."""

from __future__ import annotations

from pathlib import Path

from ops import pki
from ops.door.config import DoorFiles
from ops.door.lifecycle import running
from ops.door.policy import ClientPolicy, read_policy, write_policy
from ops.door.runtime import apply_policy, reload_crl


def client_add(
    name: str,
    files: DoorFiles,
    certs: Path = pki.DEFAULT_DIR,
    workdir: Path | None = None,
    policy: ClientPolicy | None = None,
    issue: bool = True,
) -> pki.ClientCert | None:
    """Issue ``name`` a certificate from the development CA (unless ``issue`` is False: the hospital's PKI
    issued it) and allow it in the policy; a running door from ``workdir`` admits it at once."""
    cert = pki.add_client(name, certs) if issue else None
    pol = read_policy(files.policy)
    pol[name] = policy or ClientPolicy()
    write_policy(files.policy, pol)
    if workdir is not None and running(workdir):
        apply_policy(workdir, pol)
    return cert


def client_revoke(name: str, files: DoorFiles, certs: Path = pki.DEFAULT_DIR, workdir: Path | None = None) -> None:
    """Revoke ``name``'s certificate, renew the CRL and take the name out of the policy; a running door from
    ``workdir`` loads both at once, without dropping other clients' connections."""
    pki.revoke_client(name, certs)
    pol = read_policy(files.policy)
    pol.pop(name, None)
    write_policy(files.policy, pol)
    if workdir is not None and running(workdir):
        reload_crl(workdir)
        apply_policy(workdir, pol)

