"""KOA-Serve in a real TorchServe (Java), started on free ports with the real archive.

The archive is built by ``make archive`` from the committed weights, exactly as a user would.
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from client import KOAClientError
from client.grpc_client import GrpcClient
from client.rest import RestClient
from model.checkpoint import load_torchscript
from train.data import scan
from train.evaluate import evaluate_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import tsctl  # noqa: E402

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17+ (see README)"),
]


@pytest.fixture(scope="module")
def archive() -> Path:
    subprocess.run(["make", "-s", "archive"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return ROOT / "model_store"


def start_server(archive: Path, workdir: Path) -> tsctl.Server:
    return tsctl.start_on_free_ports(archive, workdir)


@pytest.fixture(scope="module")
def server(archive: Path, tmp_path_factory) -> tsctl.Server:
    workdir = tmp_path_factory.mktemp("ts")
    srv = start_server(archive, workdir)
    yield srv
    tsctl.stop(workdir)


@pytest.fixture(scope="module")
def rest(server) -> RestClient:
    return RestClient(server.inference_url, token=server.keys()["inference"], timeout=120)


@pytest.fixture(scope="module")
def grpc_client(server) -> GrpcClient:
    return GrpcClient(f"127.0.0.1:{server.grpc_port}", token=server.keys()["inference"], timeout=120)


def check_answer(body: dict) -> None:
    p = np.array(body["probabilities"])
    assert p.shape == (5,) and abs(p.sum() - 1) < 1e-4
    assert body["kl_grade"] == int(p.argmax()) and 0 <= body["oa_probability"] <= 1
    assert body["model"]["name"] and body["model"]["version"]


def test_rest_predict(rest, knee_png):
    body = rest.predict(knee_png)
    check_answer(body)
    assert "explanation" not in body


def test_rest_explain(rest, knee_png):
    body = rest.predict(knee_png, explain=True, target=3)
    check_answer(body)
    assert body["explanation"]["target"] == 3 and len(body["explanation"]["grid"]) == 16
    overlay = cv2.imdecode(
        np.frombuffer(__import__("base64").b64decode(body["explanation"]["overlay_png"]), np.uint8), 1
    )
    assert overlay is not None and overlay.shape[:2] == (224, 224)


def test_grpc_predict_and_explain(grpc_client, rest, knee_png):
    plain = grpc_client.predict(knee_png)
    check_answer(plain)
    np.testing.assert_allclose(plain["probabilities"], rest.predict(knee_png)["probabilities"], atol=1e-6)
    explained = grpc_client.predict(knee_png, explain=True, method="gradcam")
    assert explained["explanation"]["target"] == explained["kl_grade"]


def test_grpc_bad_image_is_an_error(grpc_client):
    with pytest.raises(KOAClientError) as err:
        grpc_client.predict(b"definitely not an image")
    assert err.value.status == 400 and "accepted" in err.value.message


def test_requests_without_a_token_are_refused(server, knee_png):
    r = requests.post(f"{server.inference_url}/predictions/oamen", data=knee_png, headers={"Content-Type": "image/png"})
    assert r.status_code in (400, 401, 403)
    assert "key" in r.text.lower() or "token" in r.text.lower()
    with pytest.raises(KOAClientError):
        GrpcClient(f"127.0.0.1:{server.grpc_port}", token="wrong").predict(knee_png)


def test_model_registration_api_is_off(server):
    r = requests.post(
        f"{server.management_url}/models?url=x.mar", headers={"Authorization": f"Bearer {server.keys()['management']}"}
    )
    assert r.status_code == 405


def test_a_batch_with_one_bad_image_answers_the_others(rest, knee_png):
    bodies = [knee_png, b"\x89PNG\r\n\x1a\n truncated", knee_png, knee_png]

    def call(b: bytes):
        try:
            return 200, rest.predict(b)
        except KOAClientError as exc:
            return exc.status, exc.message

    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(call, bodies))
    assert [s for s, _ in results] == [200, 400, 200, 200]
    assert results[0][1]["probabilities"] == results[2][1]["probabilities"]


def test_served_predictions_equal_in_process_evaluation(rest, knee_png, tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    (root / "2").mkdir(parents=True)
    (root / "2" / "knee.png").write_bytes(knee_png)
    wide = cv2.resize(cv2.imdecode(np.frombuffer(knee_png, np.uint8), 0), (300, 200))
    cv2.imwrite(str(root / "2" / "wide.png"), wide)
    cv2.imwrite(str(root / "2" / "noise.png"), rng.integers(0, 255, (150, 180), dtype=np.uint8))
    samples = scan(root)
    net, contract = load_torchscript(ROOT / "build" / "oamen.pt")
    _, expected = evaluate_model(net, contract, samples, cache_dir=None)
    served = np.array([rest.predict(s.path.read_bytes())["probabilities"] for s in samples])
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_nothing_is_left_running_after_stop(archive, tmp_path):
    srv = start_server(archive, tmp_path)
    pid = tsctl._pid(tmp_path)
    family = [pid, *tsctl._descendants(pid)]
    assert len(family) >= 2, "expected the Java frontend and at least one Python worker"
    assert tsctl.stop(tmp_path)
    assert not any(tsctl._alive(p) for p in family)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{srv.inference_url}/ping", timeout=2)
    assert not tsctl.stop(tmp_path)  # a second stop finds nothing to do


def test_a_model_that_cannot_load_fails_start_with_the_reason(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "oamen.mar").write_bytes(b"this is not an archive")
    t0 = time.monotonic()
    with pytest.raises(tsctl.ServeError) as err:
        start_server(store, tmp_path / "ts")
    assert time.monotonic() - t0 < 200
    assert "oamen" in str(err.value)
