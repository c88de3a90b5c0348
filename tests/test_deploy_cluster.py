"""Replicas behind the balancer with real TorchServe servers (`ops.cluster`), and the replica drill.

The balancer's own decisions are tested against fake replicas in tests/test_deploy_balancer.py; here
two real replicas with the real archive start on free ports, answer REST and gRPC through HAProxy
with the cluster's token, refuse callers without it at the front, and are all gone after `stop`.
A short drill (`ops.drills.replicas`) kills one replica under load: nothing may be lost.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops import cluster
from ops import server as ts
from ops.drills import replicas as drill_replicas
from tests.conftest import skip_or_fail


# --------------------------------------------------------------------------- the drill's arithmetic
def _rec(start: float, end: float, ok: bool = True, retried: list[str] | None = None, **kw: object) -> dict:
    return {"protocol": "rest", "start": start, "end": end, "ok": ok, "retried": retried or [], "error": "", **kw}


def test_summary_counts_callers_requests_attempts_and_losses() -> None:
    records = [
        _rec(0, 1),
        _rec(0, 2, retried=["reset", "refused"]),
        _rec(1, 3, ok=False, retried=["503 ReplicaLost"], error="gave up", wrong=False),
        _rec(2, 3, ok=False, error="wrong answer", wrong=True),
    ]
    for r in records:
        r.setdefault("wrong", False)
    s = drill_replicas.summarise(records)
    assert s["requests"] == 4
    assert s["failures"] == 3 + 2  # three failed attempts that were resent, two requests given up
    assert s["resent"] == 1 and s["lost"] == 2 and s["wrong"] == 1
    assert s["failed_attempts_by_kind"] == {"reset": 1, "refused": 1, "503 ReplicaLost": 1}


def test_rate_and_longest_gap() -> None:
    records = [_rec(0, t) for t in (1.0, 2.0, 2.5, 6.0)] + [_rec(0, 3.0, ok=False)]
    assert drill_replicas.rate(records, 0.0, 4.0) == pytest.approx(3 / 4)
    assert drill_replicas.rate(records, 4.0, 4.0) is None
    assert drill_replicas.longest_gap(records, 0.0, 7.0) == pytest.approx(3.5)  # 2.5 -> 6.0; the failure ends no gap


# --------------------------------------------------------------------------- real replicas
def _require_haproxy() -> None:
    try:
        cluster.haproxy_binary()
    except cluster.ClusterError as exc:
        skip_or_fail(str(exc))


@pytest.fixture(scope="module")
def two_replicas(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    _require_haproxy()
    workdir = tmp_path_factory.mktemp("cluster")
    rest, grpc_port, health = ts.free_ports(3)
    front = cluster.Front(rest_port=rest, grpc_port=grpc_port, health_port=health)
    state = cluster.start(2, workdir, front, archive)
    try:
        yield {"workdir": workdir, "front": front, "state": state}
    finally:
        cluster.stop(workdir)


@pytest.mark.server
@pytest.mark.slow
def test_two_replicas_answer_rest_and_grpc_through_the_balancer(two_replicas: dict, knee_png: bytes) -> None:
    from koa_client import KOAClientError, is_key_error
    from koa_client.grpc_client import GrpcClient
    from koa_client.rest import RestClient

    front, workdir = two_replicas["front"], two_replicas["workdir"]
    key_file = workdir / cluster.KEY_FILE
    with RestClient(f"http://127.0.0.1:{front.rest_port}", key_file=key_file) as rest:
        answers = [rest.predict(knee_png) for _ in range(8)]
    with GrpcClient(f"127.0.0.1:{front.grpc_port}", key_file=key_file) as grpc_client:
        answers += [grpc_client.predict(knee_png) for _ in range(8)]
    assert len({a["kl_grade"] for a in answers}) == 1
    served = {r.name: cluster.answered(workdir, r.name) for r in cluster.replicas_of(two_replicas["state"])}
    assert all(n > 0 for n in served.values()), served  # both replicas answered, over REST and gRPC
    for token in (None, "wrong"):
        with pytest.raises(KOAClientError) as err:
            RestClient(f"http://127.0.0.1:{front.rest_port}", token=token).predict(knee_png)
        assert err.value.status == 401
        with pytest.raises(KOAClientError) as err, GrpcClient(f"127.0.0.1:{front.grpc_port}", token=token) as c:
            c.predict(knee_png)
        assert is_key_error(err.value)
    # The replicas listen on loopback only, with token authorization off: the balancer is their front.
    for r in cluster.replicas_of(two_replicas["state"]):
        props = ts.parse_properties((Path(r.workdir) / "config.properties").read_text())
        assert props["disable_token_authorization"] == "true"
        assert all(props[k].startswith("http://127.0.0.1:") for k in ("inference_address", "management_address"))
        assert props["grpc_inference_address"] == "127.0.0.1"


@pytest.mark.server
@pytest.mark.slow
def test_stop_returns_when_everything_is_gone(archive: Path, tmp_path: Path) -> None:
    _require_haproxy()
    rest, grpc_port, health = ts.free_ports(3)
    front = cluster.Front(rest_port=rest, grpc_port=grpc_port, health_port=health)
    state = cluster.start(1, tmp_path, front, archive)
    java = ts.server_pid(Path(state["replicas"][0]["workdir"]))
    pids = [state["haproxy_pid"], java, *ts.descendants(java)]
    assert cluster.running(tmp_path)
    assert cluster.stop(tmp_path) is True
    assert not any(ts.is_alive(p) for p in pids)
    assert not cluster.running(tmp_path) and cluster.stop(tmp_path) is False
    with pytest.raises(ValueError, match="at least 1 replica"):
        cluster.start(0, tmp_path, front, archive)


@pytest.mark.server
@pytest.mark.slow
def test_drill_kills_a_replica_under_load_and_loses_nothing(archive: Path, tmp_path: Path) -> None:
    _require_haproxy()
    out = tmp_path / "replicas.json"
    args = drill_replicas.get_args_parser().parse_args(
        ["--seconds", "35", "--kill-at", "8", "--down-s", "2", "--users", "4", "--throughput-s", "0"]
        + ["--workdir", str(tmp_path / "work"), "--json", str(out), "--model-store", str(archive), "--publish", ""]
    )
    code = drill_replicas.main(args)
    result = json.loads(out.read_text())
    assert {"requests", "failures", "lost", "recovery_s"} <= set(result)
    assert result["lost"] == 0 and result["wrong"] == 0, result["lost_errors"]
    assert result["requests"] > 50
    assert result["by_protocol"]["rest"]["requests"] > 0 and result["by_protocol"]["grpc"]["requests"] > 0
    assert result["answered_by_restarted_replica"] > 0
    assert result["recovery_s"] > 2
    assert set(result["cpu"]) == {"machine_busy_cores", "cluster_cores", "load_generator_cores", "other_cores"}
    assert code == 0
    assert not cluster.running(tmp_path / "work" / "drill")


def test_throughput_configs_parse_or_say_what_is_wrong() -> None:
    config = drill_replicas.ReplicaConfig
    assert drill_replicas.parse_configs("1x2, 1x1,2x1") == [config(1, 2), config(1, 1), config(2, 1)]
    assert drill_replicas.parse_configs("2") == [config(2, None)] and drill_replicas.parse_configs("") == []
    for bad in ("2y1", "0", "1x0", "x2"):
        with pytest.raises(ValueError, match="REPLICASxTHREADS"):
            drill_replicas.parse_configs(bad)
