"""Monitoring: the grader's metrics (handler.metrics) in process and on a real TorchServe, the gateway's,
the alert rules under promtool, and a real Prometheus scraping the server (ops.monitor)."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from handler.metrics import (
    ANSWERS,
    DRIFT_KNEES,
    DRIFT_SCORE,
    MODEL_INFO,
    REFUSALS,
    STEP_SECONDS,
    UNCERTAIN,
    MemorySink,
    ObservedPredictor,
    Telemetry,
    TorchServeSink,
    count_answers,
)
from handler.service import Predictor
from model import create_model
from model.checkpoint import load_torchscript
from model.drift import FEATURES, OVERALL, REFUSED, KneeRecord, build_reference
from model.paths import ROOT
from ops import monitor
from ops.procs import free_ports
from tests.conftest import in_ci, private_server, skip_or_fail

MONITORING = ROOT / "deploy" / "monitoring"


@pytest.fixture(scope="module")
def models(exported):
    scripted, contract = load_torchscript(exported)
    eager = create_model(contract.model_name)
    eager.load_state_dict(scripted.state_dict())
    return scripted, eager.eval(), contract


def observed(models, reference=None, drift_every_s: float = 0.0) -> tuple[ObservedPredictor, MemorySink]:
    scripted, eager, contract = models
    sink = MemorySink()
    telemetry = Telemetry(sink, contract, reference, drift_every_s=drift_every_s)
    return ObservedPredictor(scripted, eager, contract, torch.device("cpu"), telemetry=telemetry), sink


def run_batch(pred: ObservedPredictor, rows: list[dict]) -> list:
    pred.telemetry.begin_batch()
    answers = pred.handle(rows, [{}] * len(rows))
    pred.telemetry.end_batch(dict(enumerate(answers)))
    return answers


def test_metrics_count_grades_refusals_and_steps_without_changing_answers(models, knee_png) -> None:
    pred, sink = observed(models)
    rows = [{"body": knee_png}, {"body": b"not an image"}, {"body": knee_png}]
    answers = run_batch(pred, rows)
    plain = Predictor(*models[:2], models[2], torch.device("cpu")).handle(rows, [{}] * 3)
    assert [s for s, _ in answers] == [s for s, _ in plain] == [200, 400, 200]
    assert answers[0][1]["probabilities"] == plain[0][1]["probabilities"]
    grade = str(answers[0][1]["kl_grade"])
    assert sink.total(ANSWERS) == 2 and sink.total(ANSWERS, grade=grade) == 2
    assert sink.total(REFUSALS, reason="invalid_image") == 1
    assert sink.total(UNCERTAIN) == sum(b.get("uncertain", False) for _, b in answers)
    steps = {lab["step"] for n, _, lab in sink.sent if n == STEP_SECONDS}
    assert steps == {"decode", "finder", "preprocess", "grader"}
    assert all(0 <= v < 60 for n, v, _ in sink.sent if n == STEP_SECONDS)
    info = next(lab for n, _, lab in sink.sent if n == MODEL_INFO)
    assert info["model_version"] == models[2].model_version and info["drift_reference"] == "none"


def test_labels_never_carry_request_content(models, knee_png) -> None:
    pred, sink = observed(models)
    run_batch(pred, [{"body": knee_png, "explain": b"maybe"}, {"nope": b"x" * 50}])
    values = {v for _, _, lab in sink.sent for k, v in lab.items() if k not in ("model", "model_version")}
    assert values <= {"bad_request", "none", *map(str, range(5))} | {"decode", "finder", "preprocess", "grader"}


def test_drift_scores_appear_once_the_window_is_full(models, knee_png) -> None:
    records = [KneeRecord(False, None, {f: float(i % 7) for f in FEATURES}) for i in range(100)]
    ref = build_reference(records, "m", "1", "0" * 64, "val", window=3, threshold=0.5)
    pred, sink = observed(models, ref)
    run_batch(pred, [{"body": knee_png}, {"body": knee_png}])
    assert sink.last(DRIFT_KNEES) == 2 and sink.last(DRIFT_SCORE) is None
    run_batch(pred, [{"body": knee_png}])
    scores = {lab["feature"]: v for n, v, lab in sink.sent if n == DRIFT_SCORE}
    assert set(scores) >= {OVERALL, REFUSED, "expected_grade", "confidence", "brightness"}
    assert scores[OVERALL] == max(scores.values())
    throttled, sink = observed(models, ref, drift_every_s=3600.0)
    for _ in range(3):
        run_batch(throttled, [{"body": knee_png}])
    assert sink.last(DRIFT_KNEES) == 1  # sent with the first batch only; the window still took all three
    assert len(throttled.telemetry.window.records) == 3


def test_a_film_counts_each_knee() -> None:
    film = {"knees": [{"kl_grade": 3, "uncertain": True}, {"refused": {"type": "unsupported_view"}}]}
    grades, reasons, uncertain = count_answers([(200, film), (422, {"error": {"type": "weird"}})])
    assert grades == {3: 1} and reasons == {"unsupported_view": 1, "other": 1} and uncertain == 1


class FakeMetric:
    dimension_names = ["ModelName", "Level", "grade"]

    def __init__(self) -> None:
        self.calls: list = []

    def add_or_update(self, value, dimension_values) -> None:
        self.calls.append((value, dimension_values))


class FakeCache:
    def __init__(self) -> None:
        self.metric = FakeMetric()

    def get_metric(self, name, kind):
        if name == ANSWERS and kind.value == "counter":
            return self.metric
        raise KeyError(name)


def test_torchserve_sink_fills_dimensions_and_drops_undeclared_metrics(caplog) -> None:
    cache = FakeCache()
    sink = TorchServeSink(cache, "oamen")
    sink.emit(ANSWERS, 2, {"grade": "1"})
    assert cache.metric.calls == [(2, ["oamen", "Model", "1"])]
    for _ in range(3):
        sink.emit("koa_not_declared", 1, {})  # dropped, warned once, never raised
    assert sum("koa_not_declared" in r.message for r in caplog.records) == 1


def test_every_metric_the_handler_sends_is_declared_for_torchserve() -> None:
    import yaml

    from handler import metrics

    cfg = yaml.safe_load((MONITORING / "ts_metrics.yaml").read_text())
    declared = {m["name"] for kind in cfg["model_metrics"].values() for m in kind}
    sent = {getattr(metrics, n) for n in dir(metrics) if n.isupper() and str(getattr(metrics, n)).startswith("koa_")}
    assert sent <= declared, sent - declared
    ours = {m["name"]: m for kind in cfg["model_metrics"].values() for m in kind if m["name"].startswith("koa_")}
    assert ours[STEP_SECONDS]["unit"] == "s" and STEP_SECONDS in {m["name"] for m in cfg["model_metrics"]["histogram"]}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        skip_or_fail("promtool is missing (Debian package prometheus)")
    return path


def test_alert_rules_are_valid() -> None:
    out = subprocess.run([promtool(), "check", "rules", "alerts.yml"], cwd=MONITORING, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_rules_pass_their_unit_tests() -> None:
    out = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_configuration_is_valid(tmp_path: Path) -> None:
    rules = tmp_path / "alerts.yml"
    shutil.copyfile(MONITORING / "alerts.yml", rules)
    (tmp_path / "prometheus.yml").write_text(monitor.render_prometheus(monitor.DEFAULT_TARGETS, 9093, rules))
    out = subprocess.run(
        [promtool(), "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    amtool = shutil.which("amtool") or shutil.which("prometheus-alertmanager")
    assert amtool is not None or not in_ci()


def test_the_webhook_logs_each_alert(tmp_path: Path) -> None:
    import json
    import threading

    (port,) = free_ports(1)
    server = monitor.serve_webhook(port, tmp_path / "alerts.jsonl")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        payload = {"alerts": [{"status": "firing", "labels": {"alertname": "KneeInputDrift"}, "annotations": {}}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/alerts", data=json.dumps(payload).encode())
        assert urllib.request.urlopen(req, timeout=5).status == 200
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/alerts", data=b"{not json")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(bad, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    (line,) = (tmp_path / "alerts.jsonl").read_text().splitlines()
    assert json.loads(line)["alertname"] == "KneeInputDrift" and json.loads(line)["status"] == "firing"
    assert f"http://127.0.0.1:{port}/alerts" in monitor.render_alertmanager(port)


def test_gateway_metrics_are_served_on_loopback() -> None:
    from gateway.metrics import GatewayMetrics

    queue = [1, 2, 3]
    m = GatewayMetrics(lambda: len(queue))
    port = m.serve(0)
    try:
        m.received.inc()
        m.stored.labels("result").inc()
        m.receipt_to_sr.observe(3.0)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.close()
    assert "koa_gateway_received_total 1.0" in text and "koa_gateway_spooled 3.0" in text
    assert 'koa_gateway_stored_total{kind="result"} 1.0' in text
    assert 'koa_gateway_receipt_to_sr_seconds_bucket{le="5.0"} 1.0' in text


# --- a real TorchServe and a real Prometheus ------------------------------------------------------


@pytest.fixture(scope="module")
def served(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    with private_server(archive, tmp_path_factory.mktemp("ts")) as srv:
        yield srv


def scrape(url: str) -> str:
    return urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()


def post(srv, body: bytes, ctype: str = "image/png") -> int:
    req = urllib.request.Request(
        f"{srv.inference_url}/predictions/oamen",
        data=body,
        headers={"Authorization": f"Bearer {srv.keys()['inference']}", "Content-Type": ctype},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.server
def test_the_server_reports_the_graders_metrics(served, knee_png) -> None:
    assert "koa_model_info{" in scrape(served.metrics_url)  # announced at start-up, before any request
    assert post(served, knee_png) == 200
    assert post(served, b"\x89PNG broken") == 400
    text = scrape(served.metrics_url)
    assert "koa_answers_total{" in text and 'reason="invalid_image"' in text
    assert "koa_step_seconds_bucket{" in text and 'step="grader"' in text
    assert "koa_model_info{" in text and 'drift_reference="val@' in text
    assert "koa_drift_window_knees{" in text
    # TorchServe's own counters are still there
    assert "ts_inference_requests_total" in text


@pytest.mark.server
def test_prometheus_scrapes_the_server_and_a_down_prometheus_changes_nothing(served, knee_png, tmp_path) -> None:
    prom, am, hook = free_ports(3)
    target = served.metrics_url.removeprefix("http://")
    try:
        mon = monitor.start(tmp_path / "mon", prom, am, hook, {"koa-serve": target})
    except monitor.MonitorError as exc:
        if "not installed" in str(exc):
            skip_or_fail(str(exc))
        raise
    try:
        assert post(served, knee_png) == 200
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not monitor.query(mon.prometheus_url, "koa_answers_total"):
            time.sleep(1)
        assert monitor.query(mon.prometheus_url, "koa_answers_total"), "Prometheus never scraped the grader's metrics"
        assert not [a for a in monitor.alerts(mon.prometheus_url) if a["labels"]["alertname"] == "KoaModelNotReady"]
    finally:
        monitor.stop(tmp_path / "mon")
    t0 = time.monotonic()
    assert post(served, knee_png) == 200  # metrics are pulled: nothing waits for a Prometheus that is gone
    assert time.monotonic() - t0 < 30


def test_haproxy_serves_its_exporter_on_the_health_port(tmp_path: Path) -> None:
    from ops import cluster

    try:
        haproxy = cluster.haproxy_binary()
    except cluster.ClusterError as exc:  # not installed
        skip_or_fail(f"HAProxy is missing: {exc}")
    rest, grpc, health, replica = free_ports(4)
    (tmp_path / "tokens.lst").write_text("t\n")
    (tmp_path / "502.http").write_text(cluster.ERROR_502_AS_503)
    cfg = cluster.haproxy_config(
        [cluster.Replica("r1", "", rest_port=replica, grpc_port=replica)],
        cluster.Front(rest, grpc, health),
        str(tmp_path / "tokens.lst"),
        str(tmp_path / "502.http"),
    )
    (tmp_path / "haproxy.cfg").write_text(cfg)
    proc = subprocess.Popen([haproxy, "-f", str(tmp_path / "haproxy.cfg")], stdout=subprocess.DEVNULL)
    try:
        deadline, text = time.monotonic() + 20, ""
        while time.monotonic() < deadline and not text:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{health}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(10)
    assert 'haproxy_server_status{proxy="replicas_rest",server="r1"' in text
