"""config.properties stays secure by default: loopback only, tokens on, no registration API, bounded."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def props() -> dict[str, str]:
    out = {}
    for line in (ROOT / "config.properties").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def test_every_address_is_loopback():
    p = props()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", p[key]), (key, p[key])
    assert p["grpc_inference_address"] == p["grpc_management_address"] == "127.0.0.1"
    ports = [p["inference_address"][-4:], p["management_address"][-4:], p["metrics_address"][-4:]]
    assert ports == ["8080", "8081", "8082"] and (p["grpc_inference_port"], p["grpc_management_port"]) == (
        "7070",
        "7071",
    )


def test_tokens_on_and_registration_off():
    p = props()
    assert p["disable_token_authorization"] == "false"
    assert p["enable_model_api"] == "false"
    assert int(p["token_expiration_min"]) <= 60


def test_bounded_requests_and_queue():
    p = props()
    assert 32 * 2**20 <= int(p["max_request_size"]) <= 128 * 2**20  # fits a DICOM radiograph, still bounded
    assert 0 < int(p["job_queue_size"]) <= 1000
    assert p["metrics_mode"] == "prometheus"
    model = json.loads(p["models"])["oamen"]["1.0"]
    assert model["batchSize"] >= 1 and 0 <= model["maxBatchDelay"] <= 200 and model["maxWorkers"] >= 1
