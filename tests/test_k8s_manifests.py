"""deploy/k8s/ is validated against the typed API models of the official `kubernetes` client
(dev extra) and kept consistent with the Dockerfile, the server's CLI and each other.

The client's models (pydantic, kubernetes>=37) reject wrong types (strict ints and strings) and
missing required fields, but silently drop unknown keys; so each manifest is also re-serialised
and compared with its input, which catches a misspelled or unknown field anywhere in it. The
ServiceMonitor is a CRD the client does not model: it gets a structural check."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes", reason="kubernetes client not installed (dev extra)")
from kubernetes.client import ApiClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = (ROOT / "Dockerfile").read_text()

# file -> (apiVersion, kind) it must hold
TYPED = {
    "deployment.yaml": ("apps/v1", "Deployment"),
    "service.yaml": ("v1", "Service"),
    "secret.yaml": ("v1", "Secret"),
    "hpa.yaml": ("autoscaling/v2", "HorizontalPodAutoscaler"),
    "registry-pvc.yaml": ("v1", "PersistentVolumeClaim"),
}


class ManifestError(ValueError):
    pass


def _load(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((K8S / name).read_text()))
    return doc


def _diff(want, got, path="") -> list[str]:
    """Where the re-serialised manifest differs from the input: dropped (unknown) keys, coerced values."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}.{k}: unknown field (dropped by the model)" for k in want if k not in got]
        out += [f"{path}.{k}: added by the model" for k in got if k not in want]
        for k in want.keys() & got.keys():
            out += _diff(want[k], got[k], f"{path}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (w, g) in enumerate(zip(want, got, strict=True)) for d in _diff(w, g, f"{path}[{i}]")]
    if type(want) is not type(got) or want != got:
        return [f"{path}: {want!r} became {got!r}"]
    return []


def validate_typed(doc: dict) -> None:
    """Deserialise into the client's model for apiVersion/kind; raise ManifestError on any problem."""
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        raise ManifestError("not a Kubernetes object (apiVersion/kind missing)")
    version = doc["apiVersion"].split("/")[-1]
    model = version[0].upper() + version[1:] + doc["kind"]  # apps/v1 Deployment -> V1Deployment
    if not hasattr(kubernetes.client, model):
        raise ManifestError(f"no model {model} in the kubernetes client")
    api = ApiClient()
    try:
        obj = api.deserialize(json.dumps(doc), model, "application/json")
    except Exception as e:  # pydantic ValidationError: wrong type, required field missing
        raise ManifestError(f"{model}: {e}") from e
    problems = _diff(doc, api.sanitize_for_serialization(obj))
    if problems:
        raise ManifestError(f"{model}: " + "; ".join(problems))


def validate_service_monitor(doc: dict, service: dict) -> None:
    """Structural check of the Prometheus operator's ServiceMonitor against the Service."""
    def need(cond, msg):
        if not cond:
            raise ManifestError(msg)

    need(doc.get("apiVersion") == "monitoring.coreos.com/v1", "apiVersion must be monitoring.coreos.com/v1")
    need(doc.get("kind") == "ServiceMonitor", "kind must be ServiceMonitor")
    need(set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, f"unknown top-level keys {sorted(doc)}")
    need(isinstance(doc.get("metadata", {}).get("name"), str), "metadata.name missing")
    spec = doc.get("spec")
    need(isinstance(spec, dict), "spec missing")
    need(set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "podTargetLabels",
                       "targetLabels", "sampleLimit"}, f"unknown spec keys {sorted(spec)}")
    labels = spec.get("selector", {}).get("matchLabels")
    need(isinstance(labels, dict) and labels, "spec.selector.matchLabels missing")
    svc_labels = service["metadata"].get("labels", {})
    need(all(svc_labels.get(k) == v for k, v in labels.items()), "spec.selector does not select the Service")
    endpoints = spec.get("endpoints")
    need(isinstance(endpoints, list) and endpoints, "spec.endpoints missing")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    endpoint_keys = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                     "relabelings", "metricRelabelings", "tlsConfig", "bearerTokenSecret", "authorization"}
    for i, ep in enumerate(endpoints):
        need(isinstance(ep, dict) and set(ep) <= endpoint_keys, f"endpoints[{i}]: unknown keys {sorted(ep)}")
        need(ep.get("port") in port_names, f"endpoints[{i}].port {ep.get('port')!r} is not a Service port name")
        need(isinstance(ep.get("path", "/metrics"), str) and ep.get("path", "/metrics").startswith("/"),
             f"endpoints[{i}].path must be an absolute path")
        for key in ("interval", "scrapeTimeout"):
            need(key not in ep or re.fullmatch(r"\d+(ms|s|m|h)", str(ep[key])), f"endpoints[{i}].{key}: bad duration")


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return {name: _load(name) for name in [*TYPED, "servicemonitor.yaml"]}


def _container(docs) -> dict:
    (c,) = docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("name", sorted(TYPED))
def test_every_manifest_validates_against_the_api_models(docs, name):
    assert (docs[name]["apiVersion"], docs[name]["kind"]) == TYPED[name]
    validate_typed(docs[name])


def test_the_service_monitor_scrapes_the_services_metrics_port(docs):
    validate_service_monitor(docs["servicemonitor.yaml"], docs["service.yaml"])
    (ep,) = docs["servicemonitor.yaml"]["spec"]["endpoints"]
    assert ep["port"] == "metrics" and ep["path"] == "/metrics"


def test_planted_mistakes_are_caught(docs):
    dep = docs["deployment.yaml"]
    bad = copy.deepcopy(dep)  # a misspelled required field
    pod = bad["spec"]["template"]["spec"]
    pod["contianers"] = pod.pop("containers")
    with pytest.raises(ManifestError, match="containers"):
        validate_typed(bad)
    bad = copy.deepcopy(dep)  # a misspelled optional field, which the model alone would drop
    sc = bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    sc["readOnlyRootFilsystem"] = sc.pop("readOnlyRootFilesystem")
    with pytest.raises(ManifestError, match="readOnlyRootFilsystem"):
        validate_typed(bad)
    bad = copy.deepcopy(dep)  # a string where an int belongs
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    with pytest.raises(ManifestError, match="containerPort"):
        validate_typed(bad)
    bad = copy.deepcopy(docs["hpa.yaml"])  # an unknown field in another kind
    bad["spec"]["maxReplica"] = bad["spec"].pop("maxReplicas")
    with pytest.raises(ManifestError, match="maxReplica"):
        validate_typed(bad)
    bad = copy.deepcopy(docs["servicemonitor.yaml"])  # the CRD check: a port the Service lacks
    bad["spec"]["endpoints"][0]["port"] = "http-metrics"
    with pytest.raises(ManifestError, match="http-metrics"):
        validate_service_monitor(bad, docs["service.yaml"])


def _dockerfile_exec(instruction: str) -> list[str]:
    (line,) = re.findall(rf"^{instruction} (\[.*\])$", DOCKERFILE, re.M)
    return json.loads(line)


def test_the_container_runs_the_dockerfiles_command_and_it_parses(docs):
    from rmserve.service.cli import build_parser

    c = _container(docs)
    argv = c["command"] + c["args"]
    assert c["command"] == _dockerfile_exec("ENTRYPOINT") and c["args"] == _dockerfile_exec("CMD")
    assert argv[0] == "rmserve"
    ns = build_parser().parse_args(argv[1:])
    assert ns.command == "serve" and ns.host == "0.0.0.0"
    assert ns.api_keys_env == "RMSERVE_API_KEYS"
    env = {e["name"]: e for e in c["env"]}
    ref = env["RMSERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]
    secret = docs["secret.yaml"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert all(isinstance(v, list) for v in json.loads(secret["stringData"][ref["key"]]).values())
    # the pod outlives the server's grace period by a few seconds (docs/production.md#stopping)
    grace = docs["deployment.yaml"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert ns.grace + 5 <= grace
    assert env["OMP_NUM_THREADS"]["value"] == c["resources"]["limits"]["cpu"]


def test_probe_service_and_monitor_ports_agree(docs):
    from rmserve.service.cli import build_parser

    c = _container(docs)
    ns = build_parser().parse_args((c["command"] + c["args"])[1:])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": ns.port, "metrics": ns.metrics_port}
    assert re.search(rf"^EXPOSE {ns.port} {ns.metrics_port}$", DOCKERFILE, re.M)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": ns.port, "service": ""}, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # the model load (HEALTHCHECK start-period)
    svc = docs["service.yaml"]
    assert svc["spec"]["clusterIP"] == "None"  # headless: clients balance over the pods
    assert svc["spec"]["selector"].items() <= docs["deployment.yaml"]["spec"]["template"]["metadata"]["labels"].items()
    for p in svc["spec"]["ports"]:
        assert p["port"] == ports[p["name"]] and p["targetPort"] == p["name"]
    (ep,) = docs["servicemonitor.yaml"]["spec"]["endpoints"]
    assert ports[ep["port"]] == ns.metrics_port
    hpa = docs["hpa.yaml"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["deployment.yaml"]["metadata"]["name"]


def test_the_pod_runs_as_the_dockerfiles_user_and_locked_down(docs):
    (uid,) = re.findall(r"^USER (\d+)$", DOCKERFILE, re.M)
    pod = docs["deployment.yaml"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid)
    sc = _container(docs)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in _container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert mounts["/var/cache/rmserve/registry"] in volumes  # the Dockerfile's VOLUME
    assert "/var/cache/rmserve/registry" in DOCKERFILE


def test_the_hpa_documents_the_queue_depth_metric_by_its_real_name(docs):
    metrics = (ROOT / "service" / "server" / "metrics.py").read_text()
    (name,) = re.findall(r'Gauge\("(rmserve_queue_depth)"', metrics)
    text = (K8S / "hpa.yaml").read_text()
    assert f"name: {name}" in text and "type: Pods" in text and "prometheus-adapter" in text
    (metric,) = docs["hpa.yaml"]["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"


def test_the_example_secret_is_a_placeholder(docs):
    keys = json.loads(docs["secret.yaml"]["stringData"]["RMSERVE_API_KEYS"])
    assert list(keys) == ["change-me"] and "PLACEHOLDER" in (K8S / "secret.yaml").read_text()
