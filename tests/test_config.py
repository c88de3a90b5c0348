"""config.properties stays secure by default: loopback only, tokens on, no registration API, bounded."""

from __future__ import annotations

import json
import re

from model.paths import ROOT


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


def test_log_config_is_valid_and_keeps_the_access_log():
    """A log4j2.xml that does not parse leaves TorchServe with no log files at all, silently."""
    import xml.etree.ElementTree as ET

    root = ET.parse(ROOT / "log4j2.xml").getroot()
    appenders = {a.get("name") for a in root.find("Appenders")}
    loggers = {lg.get("name"): lg for lg in root.find("Loggers") if lg.tag == "Logger"}
    for lg in root.find("Loggers"):
        assert lg.get("level") in {"off", "fatal", "error", "warn", "info", "debug", "trace", "all"}
        assert {r.get("ref") for r in lg.findall("AppenderRef")} <= appenders
    assert loggers["ACCESS_LOG"].get("level") == "info"
    assert loggers["org.pytorch.serve"].get("level") == "info"  # worker deaths and restarts are INFO
    for name, lg in loggers.items():  # a logger that writes to a file must not also pass it to the root
        if lg.findall("AppenderRef"):
            assert lg.get("additivity") == "false", name
