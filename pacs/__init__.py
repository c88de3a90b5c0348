"""The PACS side of KOA-Serve for development and tests: a local Orthanc, the gateway beside it, a test modality.

``make pacs`` / ``pacs-stop`` / ``pacs-credentials`` / ``pacs-demo`` run ``python -m pacs``; the tests call
the same functions with free ports and a temporary folder. docs/PACS.md describes the working folder
and what an operator must add. This module only re-exports.
"""

from __future__ import annotations

from ops.procs import free_ports
from pacs.gateway_process import DoorCerts, GatewayProcess, start_gateway, stop_gateway
from pacs.modality import MODALITY_AE, radiograph, read_image, send
from pacs.orthanc import (
    Orthanc,
    credentials,
    find_orthanc,
    render_config,
    resubmit_failed_routing,
    start_orthanc,
    stop_orthanc,
)
from pacs.tls import PacsTLS, pacs_tls
from pacs.workdir import DEFAULT_WORKDIR, ROOT, PacsError

__all__ = [
    "ROOT",
    "DEFAULT_WORKDIR",
    "PacsError",
    "Orthanc",
    "GatewayProcess",
    "DoorCerts",
    "credentials",
    "PacsTLS",
    "pacs_tls",
    "render_config",
    "start_orthanc",
    "stop_orthanc",
    "start_gateway",
    "stop_gateway",
    "resubmit_failed_routing",
    "send",
    "find_orthanc",
    "free_ports",
    "radiograph",
    "read_image",
    "MODALITY_AE",
]
