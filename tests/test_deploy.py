"""deploy/: the serving image and the Kubernetes manifests, checked offline.

Every manifest is validated against the Kubernetes API schemas with ``kubernetes-validate`` (strict:
an unknown or misspelt field fails), for the oldest and the newest release we claim. Then what a
schema cannot see: the pieces refer to each other correctly (labels, ports, volumes, the HPA's
container and metric), the pods keep the hardening they promise, the pod's configuration differs
from config.properties only where a pod must, the ConfigMap is current with its sources, and the
image installs only pinned packages. No cluster, registry or Docker is needed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops import cluster
from ops import server as ts
from tests.conftest import ROOT, skip_or_fail

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# autoscaling/v2 ContainerResource metrics are GA from 1.30; the newest schemas the pinned package has.
K8S_VERSIONS = ("1.30.0", "1.37.0")
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
# What a pod's TorchServe configuration may change against the repository's config.properties.
POD_KEYS = {
    "inference_address",
    "management_address",
    "metrics_address",
    "grpc_inference_port",
    "grpc_management_port",
    "disable_token_authorization",
    "metrics_config",  # an absolute path inside the image (deploy/Dockerfile) instead of the repository's
}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all() -> dict[tuple[str, str], dict[str, Any]]:
    """{(kind, name): manifest} of the kustomization's resources."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = {}
    for name in kust["resources"]:
        for doc in _docs(K8S / name):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _pod() -> dict[str, Any]:
    return _all()[("Deployment", "koa-serve")]["spec"]["template"]


def _container(name: str) -> dict[str, Any]:
    return next(c for c in _pod()["spec"]["containers"] if c["name"] == name)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    docs = _docs(path)
    assert docs, f"{path} holds no manifest"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} is not valid for {version}: {exc}")


def test_the_validator_catches_a_misspelt_field() -> None:
    bad = yaml.safe_load((K8S / "pdb.yaml").read_text())
    bad["spec"]["maxUnavailabel"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def test_the_kustomization_lists_every_manifest_of_its_folder() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    kinds = {kind for kind, _ in _all()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    assert {"ConfigMap", "Namespace"} <= kinds


def test_selectors_match_the_pods() -> None:
    everything = _all()
    labels = _pod()["metadata"]["labels"]
    deployment = everything[("Deployment", "koa-serve")]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for (kind, name), doc in everything.items():
        if kind == "Service":
            assert doc["spec"]["selector"].items() <= labels.items(), name
        if kind in ("PodDisruptionBudget",):
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        if kind == "NetworkPolicy":
            assert doc["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    hpa = everything[("HorizontalPodAutoscaler", "koa-serve")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "koa-serve"}
    pdb = everything[("PodDisruptionBudget", "koa-serve")]["spec"]
    assert hpa["minReplicas"] > pdb["maxUnavailable"]  # a voluntary disruption always leaves a pod serving


def test_pods_are_hardened() -> None:
    spec = _pod()["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]
        assert c.get("livenessProbe") and (c.get("readinessProbe") or c.get("startupProbe")), c["name"]
    # TorchServe writes only under /tmp (the image's TMPDIR, LOG_LOCATION, KOA_STATE_DIR): a volume.
    volumes = {v["name"]: v for v in spec["volumes"]}
    serve = _container("torchserve")
    assert any(m["mountPath"] == "/tmp" and "emptyDir" in volumes[m["name"]] for m in serve["volumeMounts"])
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for var in ("TMPDIR", "LOG_LOCATION", "METRICS_LOCATION", "KOA_STATE_DIR"):
        assert re.search(rf"{var}=/tmp\b", dockerfile), var
    assert re.search(r"^USER 1000", dockerfile, re.M) and spec["securityContext"]["runAsUser"] == 1000


def test_mounts_ports_and_probes_refer_to_what_exists() -> None:
    spec = _pod()["spec"]
    cm = _all()[("ConfigMap", "koa-serve")]["data"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, (c["name"], m["name"])
    for v in volumes.values():
        if "configMap" in v and v["configMap"]["name"] == "koa-serve-sites":  # site profiles, every key mounted
            assert ("ConfigMap", "koa-serve-sites") in _all() and "items" not in v["configMap"]
        elif "configMap" in v:
            assert v["configMap"]["name"] == "koa-serve"
            assert {i["key"] for i in v["configMap"]["items"]} <= set(cm)
    ports = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
    assert ports == {"metrics": 8082, "rest": 8080, "grpc": 7070, "health": 8090}
    sidecar = cluster.k8s_sidecar_config()
    for name in ("rest", "grpc", "health"):
        assert f"bind 0.0.0.0:{ports[name]}" in sidecar
    proxy = _container("auth-proxy")
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/live", "port": "health"}
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    assert mounts[cluster.K8S_HAPROXY_DIR] == "haproxy"
    assert mounts[str(Path(cluster.K8S_TOKEN_FILE).parent)] == "tokens"
    assert volumes["tokens"]["secret"]["items"] == [{"key": "tokens.lst", "path": Path(cluster.K8S_TOKEN_FILE).name}]
    # TorchServe reads the mounted configuration; its probes call its own loopback inference port.
    serve = _container("torchserve")
    env = {e["name"]: e["value"] for e in serve["env"]}
    config_mount = next(m["mountPath"] for m in serve["volumeMounts"] if m["name"] == "config")
    assert env["KOA_CONFIG"] == f"{config_mount}/config.properties"
    props = ts.parse_properties((DEPLOY / "config.properties").read_text())
    for probe in ("startupProbe", "livenessProbe"):
        assert props["inference_address"] + "/ping" in " ".join(serve[probe]["exec"]["command"])
    assert ports["metrics"] == int(props["metrics_address"].rsplit(":", 1)[1])
    annotations = _pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    for svc in (d for (k, _), d in _all().items() if k == "Service"):
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, p


def test_the_network_policy_opens_only_the_sidecar_and_the_metrics() -> None:
    np = _all()[("NetworkPolicy", "koa-serve")]["spec"]
    assert set(np["policyTypes"]) == {"Ingress", "Egress"} and np["egress"] == []
    opened = {p["port"] for rule in np["ingress"] for p in rule["ports"]}
    assert opened == {8080, 7070, 8082}
    props = ts.parse_properties((DEPLOY / "config.properties").read_text())
    for key in ("inference_address", "management_address"):  # TorchServe itself: pod loopback only
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"


def test_the_autoscaler_reads_the_adapters_queue_metric() -> None:
    hpa = _all()[("HorizontalPodAutoscaler", "koa-serve")]["spec"]
    by_type = {m["type"]: m for m in hpa["metrics"]}
    assert by_type["ContainerResource"]["containerResource"]["container"] == "torchserve"
    metric = by_type["Pods"]["pods"]["metric"]["name"]
    adapter = yaml.safe_load(_docs(K8S / "prometheus-adapter" / "rules.yaml")[0]["data"]["config.yaml"])
    rule = adapter["rules"][0]
    assert rule["name"]["as"] == metric
    series = re.match(r"\w+", rule["seriesQuery"]).group(0)
    assert rule["name"]["matches"] == f"^{series}$"
    import ts

    # The series is one TorchServe publishes, as a counter (rate() of anything else is meaningless).
    metrics = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())
    assert series in {m["name"] for m in metrics["ts_metrics"]["counter"]}
    assert "rate(" in rule["metricsQuery"] and "/ 1e6" in rule["metricsQuery"]


def test_the_pods_configuration_differs_from_config_properties_only_where_a_pod_must() -> None:
    repo = ts.parse_properties((ROOT / "config.properties").read_text())
    pod = ts.parse_properties((DEPLOY / "config.properties").read_text())
    changed = {k for k in repo.keys() | pod.keys() if repo.get(k) != pod.get(k)}
    assert changed <= POD_KEYS, f"deploy/config.properties changes {sorted(changed - POD_KEYS)}: set them in both"
    assert pod["disable_token_authorization"] == "true"  # the sidecar checks the token (docs/DEPLOY.md)
    assert pod["models"] == repo["models"]  # batching is set once, in config.properties


def test_the_configmap_is_current_with_its_sources() -> None:
    assert (K8S / "configmap.yaml").read_text() == cluster.k8s_configmap(), (
        "deploy/k8s/configmap.yaml is stale: python -m ops.cluster k8s-configmap"
    )
    data = _all()[("ConfigMap", "koa-serve")]["data"]
    assert data["config.properties"] == (DEPLOY / "config.properties").read_text()
    assert data["502.http"] == cluster.ERROR_502_AS_503


def test_haproxy_accepts_the_sidecars_configuration(tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None)
    if haproxy is None:
        skip_or_fail("HAProxy is not installed (sudo apt-get install -y haproxy; .ci/run installs it)")
    cfg = cluster.k8s_sidecar_config()
    (tmp_path / "tokens.lst").write_text("t\n")
    (tmp_path / "502.http").write_text(cluster.ERROR_502_AS_503)
    cfg = cfg.replace(cluster.K8S_TOKEN_FILE, str(tmp_path / "tokens.lst"))
    cfg = cfg.replace(f"{cluster.K8S_HAPROXY_DIR}/502.http", str(tmp_path / "502.http"))
    (tmp_path / "haproxy.cfg").write_text(cfg)
    proc = subprocess.run([haproxy, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_the_image_installs_only_pinned_packages_and_copies_what_the_context_sends() -> None:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    pins = _pins()
    installs = [ln for ln in text.splitlines() if "pip install" in ln]
    assert installs
    for line in installs:
        for cmd in line.split("&&"):
            if "pip install" not in cmd:
                continue
            assert "-c /tmp/build/requirements.txt" in cmd, cmd
            words = cmd.split("pip install", 1)[1].split()
            packages = [w for w in words if not w.startswith("-") and "/" not in w and ":" not in w]
            for pkg in packages:
                assert pkg.lower() in pins, f"{pkg} is installed in the image but not pinned in requirements.txt"
    for pkg in ("torch", "torchserve", "opencv-python-headless", "pydicom", "pylibjpeg-libjpeg"):
        assert re.search(rf"\s{re.escape(pkg)}\s", text), pkg
    allowed = [ln[1:] for ln in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if ln.startswith("!")]
    for src in re.findall(r"^COPY (?:--\S+ )*(\S+) \S+$", text, re.M):
        assert src in allowed, f"{src} is copied but Dockerfile.dockerignore does not send it"
        assert src == "model_store/oamen.mar" or (ROOT / src).is_file(), src
    serve = DEPLOY / "serve.sh"
    assert serve.stat().st_mode & 0o111
    assert subprocess.run(["sh", "-n", str(serve)]).returncode == 0
    assert '--ts-config "$KOA_CONFIG"' in serve.read_text() and "--foreground" in serve.read_text()


def test_kubernetes_validate_is_pinned_as_a_dev_dependency() -> None:
    assert "kubernetes-validate" in _pins()


def test_deploy_md_quotes_the_drill_and_the_sizing_from_their_results() -> None:
    # tests/test_docs.py checks that every generated block equals what its result renders to.
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    for name in ("replicas", "sizing"):
        assert f"<!-- generated: {name} -->" in text, name
