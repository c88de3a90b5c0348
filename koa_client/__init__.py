"""KOA-Serve client: grade knee radiographs on a running KOA-Serve over REST or gRPC, without torch.

    from koa_client import RestClient, load_token
    answer = RestClient(token=load_token(key_file="logs/serve/key_file.json")).predict(png_bytes)

Installed alone by ``pip install .`` (the koa-client distribution); docs/API.md ("Clients") covers
tokens, retries and TLS. This module only re-exports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from koa_client.errors import KEY_HINT, TLS_KINDS, TLS_STATUS, KOAClientError, error_from_answer
from koa_client.keys import TOKEN_ENV, is_key_error, load_token, new_key, read_key_file
from koa_client.retry import call_with_retry, is_retryable
from koa_client.tls import check_tls_files, diagnose_closed, probe_tls, tls_error

if TYPE_CHECKING:
    from koa_client.grpc_client import GrpcClient
    from koa_client.rest import RestClient

__all__ = [
    "KOAClientError",
    "load_token",
    "read_key_file",
    "call_with_retry",
    "RestClient",
    "GrpcClient",
    "TOKEN_ENV",
    "TLS_STATUS",
    "TLS_KINDS",
    "KEY_HINT",
    "error_from_answer",
    "is_key_error",
    "is_retryable",
    "new_key",
    "check_tls_files",
    "diagnose_closed",
    "probe_tls",
    "tls_error",
]


def __getattr__(name: str) -> Any:
    # Lazy exports: `import koa_client` must not pull in requests or grpc before they are used (gRPC users
    # under Locust call grpc.experimental.gevent.init_gevent() first).
    if name == "RestClient":
        from koa_client.rest import RestClient  # lazy: loads requests

        return RestClient
    if name == "GrpcClient":
        from koa_client.grpc_client import GrpcClient  # lazy: loads grpc and the stubs

        return GrpcClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
