"""Site profiles through a real TorchServe: the profile named by ``$KOA_SITE_PROFILES`` answers the requests
that name its site (REST header, gRPC input), and the others get the default (docs/SITES.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from handler.sites import ENV
from koa_client.grpc_client import GrpcClient
from koa_client.rest import RestClient
from model.checkpoint import load_checkpoint
from model.profile import SiteProfile
from tests.conftest import private_server

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.server]


def test_a_served_profile_answers_its_site(archive: Path, tmp_path: Path, monkeypatch, knee_png: bytes) -> None:
    contract = load_checkpoint(ROOT / "weights" / "oamen.ckpt")["contract"]
    # cut-points below any expected grade: this profile answers KL4 whatever the knee, so it cannot pass unseen
    profile = SiteProfile(
        name="north", version="3", model_name=contract.model_name, model_version=contract.model_version,
        postprocess={"decision": "cutpoints", "cutpoints": [-4.0, -3.0, -2.0, -1.0]},
    )  # fmt: skip
    path = tmp_path / "north.json"
    path.write_text(profile.to_json())
    monkeypatch.setenv(ENV, str(path))  # the server's processes inherit it (ops.server)
    with private_server(archive, tmp_path / "ts") as srv:
        key = srv.keys()["inference"]
        rest = RestClient(srv.inference_url, token=key, timeout=120)
        north = rest.predict(knee_png, site="north")
        default = rest.predict(knee_png)
        unknown = rest.predict(knee_png, site="south")
        with GrpcClient(f"127.0.0.1:{srv.grpc_port}", token=key, timeout=120) as grpc:
            by_grpc = grpc.predict(knee_png, site="north")
    assert north["model"]["profile"] == {"name": "north", "version": "3"} == by_grpc["model"]["profile"]
    assert north["kl_grade"] == 4 == by_grpc["kl_grade"]
    assert default["model"]["profile"] == {"name": "default"} and default["kl_grade"] == 2
    assert unknown["model"]["profile"]["requested"] == "south" and unknown["kl_grade"] == default["kl_grade"]
