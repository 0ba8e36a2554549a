"""The Kubernetes manifests (deploy/kubernetes/) are valid for the API server and agree with the service they run.

Offline: every object is validated against the Kubernetes schemas that kubernetes-validate ships (strict: an
unknown or misspelt field fails), then tied to what the service and BentoML's image really do: the port, the
probe paths, the user BentoML's Dockerfile template creates, the documented settings, the token's Secret, the
GPU, the autoscalers' target and metric. No cluster is needed.
"""
import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version, major_minor

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
NAME = "cifar100-serve"
# Validated against 1.33, a release managed clusters still run, and the newest schema the package ships.
KUBERNETES_VERSIONS = ("1.33", major_minor(latest_version()))
# YAML files of the folder that are not Kubernetes objects, each checked by a test of its own below.
NOT_OBJECTS = {"kustomization.yaml", "prometheus-adapter-values.yaml"}
CUSTOM_KINDS = {"PodMonitor"}   # the Prometheus Operator's kind: no schema in kubernetes-validate; checked below


def load(name):
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert len(docs) == 1, f"{name}: one object per file, found {len(docs)}"
    return docs[0]


OBJECT_FILES = sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name not in NOT_OBJECTS)
SCHEMA_FILES = [name for name in OBJECT_FILES if load(name)["kind"] not in CUSTOM_KINDS]
DEPLOYMENT = load("deployment.yaml")
POD = DEPLOYMENT["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
ENV = {e["name"]: e for e in CONTAINER["env"]}


def env_value(name):
    assert "value" in ENV[name], f"{name} should be a plain value"
    return ENV[name]["value"]


def container_port(port):
    """A probe's or Service's port (a number or a container port's name) -> the container port number."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in CONTAINER["ports"] if p["name"] == port]
    return number


def mounts():
    """mountPath -> (the volume, the mount)."""
    volumes = {v["name"]: v for v in POD["volumes"]}
    return {m["mountPath"].rstrip("/"): (volumes[m["name"]], m) for m in CONTAINER["volumeMounts"]}


def mount_holding(path):
    """The (volume, mount) whose mountPath holds PATH (the deepest one)."""
    best = None
    for where, found in mounts().items():
        if path == where or path.startswith(where + "/"):
            if best is None or len(where) > len(best[0]):
                best = (where, found)
    assert best, f"no volume is mounted at {path}: the root filesystem may be read-only"
    return best[1]


def package_file(package, relative):
    """A file of an installed package, found without importing it."""
    import importlib.util
    (folder,) = importlib.util.find_spec(package).submodule_search_locations
    return Path(folder) / relative


def bentoml_image_defaults():
    """What BentoML 1.4's Dockerfile template fills in: uid/gid, user, BENTOML_HOME, the Bento's path."""
    from bentoml._internal.container.generate import DEFAULT_BENTO_ENVS
    return DEFAULT_BENTO_ENVS


def bentoml_template():
    """The Dockerfile template `bentoml containerize` renders for a 1.4-style Bento (_bentoml_impl/docker.py)."""
    assert 'get_template("base_v2.j2")' in package_file("_bentoml_impl", "docker.py").read_text(), \
        "BentoML renders another template now: look again"
    return package_file("bentoml", "_internal/container/frontend/dockerfile/templates/base_v2.j2").read_text()


def documented_settings():
    """The variable names of docs/serving.md's settings table."""
    text = (ROOT / "docs" / "serving.md").read_text()
    table = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            names.update(re.findall(r"`([A-Z0-9_]+)`", row.split("|")[1]))
    assert len(names) > 10, "the settings table was not found in docs/serving.md"
    return names


def quantity(value):
    """A Kubernetes quantity as a float (cpu in cores, memory in bytes): enough for comparisons."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


# ---- the folder, the schemas -----------------------------------------------------------------------------

def test_the_folder_holds_the_expected_files():
    files = {p.name for p in DEPLOY.iterdir()}
    assert {"deployment.yaml", "service.yaml", "secret.example.yaml", "hpa.yaml", "hpa-cpu.yaml", "pdb.yaml",
            "kustomization.yaml", "podmonitor.yaml", "prometheus-adapter-values.yaml", "ingress.example.yaml"} <= files
    assert all(name.endswith(".yaml") for name in files), f"only .yaml files, all checked here: {sorted(files)}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_every_object_is_valid_for_the_api_server(name, version):
    kubernetes_validate.validate(load(name), version, strict=True)


def test_only_known_custom_resources_escape_the_schemas():
    assert set(SCHEMA_FILES) >= {"deployment.yaml", "service.yaml", "secret.example.yaml", "hpa.yaml", "hpa-cpu.yaml"}
    assert set(OBJECT_FILES) - set(SCHEMA_FILES) == {"podmonitor.yaml"}   # test_podmonitor_scrapes_metrics_with_the_token


def test_strict_validation_catches_a_misspelt_field():
    broken = copy.deepcopy(DEPLOYMENT)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="runAsNonroot"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_labels_and_selectors_agree():
    pod_labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    for name in OBJECT_FILES:
        obj = load(name)
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == NAME, name
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cifar100", name
        assert "namespace" not in obj["metadata"], f"{name}: the namespace is chosen at apply time"
    selectors = {"deployment.yaml": DEPLOYMENT["spec"]["selector"]["matchLabels"],
                 "service.yaml": load("service.yaml")["spec"]["selector"],
                 "pdb.yaml": load("pdb.yaml")["spec"]["selector"]["matchLabels"],
                 "podmonitor.yaml": load("podmonitor.yaml")["spec"]["selector"]["matchLabels"]}
    for name, selector in selectors.items():
        assert selector and selector.items() <= pod_labels.items(), f"{name} selects other pods: {selector}"
    assert pod_labels["app.kubernetes.io/name"] == NAME


# ---- the container: port, probes, settings ---------------------------------------------------------------

def test_the_container_serves_on_port_3000():
    (port,) = CONTAINER["ports"]
    assert port == {"name": "http", "containerPort": 3000, "protocol": "TCP"}
    assert env_value("BENTOML_PORT") == "3000"           # what `bentoml serve` in the image listens on
    assert "EXPOSE 3000" in bentoml_template()           # and the port BentoML's image declares


def test_probes_hit_readyz_and_livez_on_the_service_port():
    from serving.access import open_path

    probes = {kind: CONTAINER[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["startupProbe"]["path"] == "/readyz"   # 200 only once the model is loaded and warmed up
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/livez"
    for kind, probe in probes.items():
        assert container_port(probe["port"]) == 3000, kind
        assert open_path(probe["path"]), f"{kind}: {probe['path']} needs the token, the kubelet has none"
    startup = CONTAINER["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, \
        "the torch backend compiles CUDA graphs at start-up: give it minutes before liveness applies"


def test_settings_are_documented_and_consistent():
    ours = {name for name in ENV if name.startswith("CIFAR100_")}
    assert {"CIFAR100_BACKEND", "CIFAR100_MAX_BATCH_SIZE", "CIFAR100_MAX_LATENCY_MS", "CIFAR100_MAX_INFLIGHT_MB",
            "CIFAR100_MAX_BODY_MB", "CIFAR100_API_TOKEN_FILE", "CIFAR100_TORCH_COMPILE",
            "CIFAR100_MODEL_WORKERS"} <= ours
    undocumented = ours - documented_settings()
    assert not undocumented, f"not in docs/serving.md's settings table: {sorted(undocumented)}"

    # The service's own check of each value and of them together (serving/settings.py); the token's file is
    # mounted in the pod only.
    from serving.settings import Settings
    got = Settings(**{name.removeprefix("CIFAR100_").lower(): env_value(name) for name in ours
                      if name != "CIFAR100_API_TOKEN_FILE"})
    assert env_value("CIFAR100_TORCH_COMPILE") in ("0", "1") and got.max_inflight_mb >= got.max_body_mb
    # bodies in flight are copied while parsed, next to the runtimes: they must be a small part of the request
    assert quantity(CONTAINER["resources"]["requests"]["memory"]) > 4 * got.max_inflight_bytes


def test_the_gpu_is_requested_with_one_model_worker_per_gpu():
    limits = CONTAINER["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    assert CONTAINER["resources"].get("requests", {}).get("nvidia.com/gpu", 1) == 1   # requests = limits if given
    assert int(env_value("CIFAR100_MODEL_WORKERS")) == limits["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in POD["tolerations"])


def test_cpu_and_memory_have_requests_and_limits():
    resources = CONTAINER["resources"]
    for what in ("cpu", "memory"):
        request, limit = resources["requests"][what], resources["limits"][what]
        assert 0 < quantity(request) <= quantity(limit), (what, request, limit)


# ---- security: the user, the root filesystem, the token ---------------------------------------------------

def test_runs_as_the_user_bentoml_creates_in_its_image():
    template, defaults = bentoml_template(), bentoml_image_defaults()
    # The template creates the user from bento__uid_gid and runs as it; the number is BentoML's default.
    assert "ARG BENTO_USER_UID={{ bento__uid_gid }}" in template
    assert "ARG BENTO_USER_GID={{ bento__uid_gid }}" in template
    assert "useradd -m -u $BENTO_USER_UID -g $BENTO_USER_GID" in template
    assert "USER {{ bento__user }}" in template
    uid = defaults["uid_gid"]
    assert isinstance(uid, int) and uid > 0
    pod_security = POD["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == uid
    assert pod_security["runAsGroup"] == uid
    assert pod_security["fsGroup"] == uid
    security = CONTAINER["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"]
    assert not security.get("privileged", False)
    assert "runAsUser" not in security, "the pod's user applies: one place to change it"
    assert POD["automountServiceAccountToken"] is False


def test_a_read_only_root_has_emptydirs_where_bentoml_writes():
    # Checked by running the Bento read-only (docs/kubernetes.md): set it to false only with the writes it needs.
    assert CONTAINER["securityContext"]["readOnlyRootFilesystem"] is True
    defaults = bentoml_image_defaults()
    writable = {path for path, (volume, mount) in mounts().items() if "emptyDir" in volume}
    # BentoML creates bentos/, models/ and prometheus_multiproc_dir/ in BENTOML_HOME at start (EROFS otherwise),
    # its processes talk over Unix sockets in /tmp, torch.compile caches there.
    assert "/tmp" in writable
    for name in ("BENTOML_HOME", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"):
        volume, mount = mount_holding(env_value(name).rstrip("/"))
        assert "emptyDir" in volume and not mount.get("readOnly"), f"{name}={env_value(name)} is not writable"
    # ... and no mount hides the Bento (the code and the model) that the image keeps in the user's home.
    bento = defaults["path"].rstrip("/")
    for path in mounts():
        assert not (bento == path or bento.startswith(path + "/")), f"{path} would hide the Bento at {bento}"
    assert defaults["home"].rstrip("/") not in mounts()


def test_the_token_comes_from_the_secret_never_inline():
    secret = load("secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
    assert "REPLACE" in secret["stringData"]["token"]                 # a placeholder, plainly
    assert "EXAMPLE" in (DEPLOY / "secret.example.yaml").read_text().split("apiVersion")[0]
    assert "CIFAR100_API_TOKEN" not in ENV, "the token must not be in the manifest: use the _FILE variant"
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in CONTAINER["env"]), "a file, not a variable"
    token_file = env_value("CIFAR100_API_TOKEN_FILE")
    volume, mount = mount_holding(token_file)
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert Path(token_file).name in secret["stringData"], "the file is named after the Secret's key"
    assert token_file == mount["mountPath"].rstrip("/") + "/" + Path(token_file).name
    assert volume["secret"]["defaultMode"] & 0o007 == 0, "the token file is not world-readable"


# ---- Service, shutdown, rollout ----------------------------------------------------------------------

def test_the_service_targets_the_named_port():
    service = load("service.yaml")
    assert service["metadata"]["name"] == NAME
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["port"] == 80
    assert port["targetPort"] == "http" and container_port(port["targetPort"]) == 3000


def test_shutdown_and_rollout_keep_requests_answered():
    pre_stop = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # every admitted request has left the model's queue within CIFAR100_MAX_LATENCY_MS after the preStop wait
    assert POD["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + int(env_value("CIFAR100_MAX_LATENCY_MS")) / 1000
    strategy = DEPLOYMENT["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0 or strategy["rollingUpdate"]["maxSurge"] == 0
    assert DEPLOYMENT["spec"]["progressDeadlineSeconds"] >= \
        CONTAINER["startupProbe"]["periodSeconds"] * CONTAINER["startupProbe"]["failureThreshold"]
    assert load("pdb.yaml")["spec"]["maxUnavailable"] == 1


def test_the_example_ingress_ends_tls_and_lets_the_largest_requests_through():
    ingress = load("ingress.example.yaml")
    service = load("service.yaml")
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": service["metadata"]["name"],
                                          "port": {"name": service["spec"]["ports"][0]["name"]}}
    assert rule["host"] in ingress["spec"]["tls"][0]["hosts"] and ingress["spec"]["tls"][0]["secretName"]
    annotations = ingress["metadata"]["annotations"]
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", annotations["nginx.ingress.kubernetes.io/proxy-body-size"]).groups()
    body_limit = int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit.lower()]   # nginx's sizes
    assert body_limit >= float(env_value("CIFAR100_MAX_BODY_MB")) * 2**20
    from serving.settings import TRAFFIC_TIMEOUT_S as traffic_timeout   # both services' (serving/service.py)
    for which in ("read", "send"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/proxy-{which}-timeout"]) >= traffic_timeout


# ---- autoscaling and its metric ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hpa.yaml", "hpa-cpu.yaml"])
def test_each_autoscaler_targets_the_deployment(name):
    hpa = load(name)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["metadata"]["name"] == NAME, "both carry one name: applying one replaces the other"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": DEPLOYMENT["metadata"]["name"]}
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["minReplicas"] > load("pdb.yaml")["spec"]["maxUnavailable"]
    assert "replicas" not in DEPLOYMENT["spec"], "the HPA owns the replica count: an apply would reset it"


def test_the_cpu_autoscaler_scales_on_cpu():
    (metric,) = load("hpa-cpu.yaml")["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in CONTAINER["resources"]["requests"], "utilization is relative to the cpu request"


def test_the_custom_metric_is_bentomls_requests_in_progress_through_the_adapter():
    (metric,) = load("hpa.yaml")["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    (rule,) = yaml.safe_load((DEPLOY / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    # The series BentoML 1.4 exports: namespace "bentoml_service", gauge "request_in_progress", summed over the
    # processes of a pod (livesum). Read from BentoML, so that a renamed metric fails here, not in the cluster.
    assert 'namespace="bentoml_service"' in package_file("_bentoml_impl", "server/app.py").read_text()
    instruments = package_file("bentoml", "_internal/server/http/instruments.py").read_text()
    gauge = re.search(r'Gauge\(\s*namespace=self\.namespace,\s*name="request_in_progress",.*?\)', instruments, re.S)
    assert gauge and 'multiprocess_mode="livesum"' in gauge.group(0)
    series = "bentoml_service_request_in_progress"
    assert rule["seriesQuery"].startswith(series + "{") and rule["name"]["matches"] == f"^{series}$"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    # Only the HTTP front's series: runner_name is the front's class, the service bentofile.yaml serves.
    front = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["service"].split(":")[1]
    for query in (rule["seriesQuery"], rule["metricsQuery"]):
        assert f'runner_name="{front}"' in query
    assert "<<.GroupBy>>" in rule["metricsQuery"] and "avg_over_time" in rule["metricsQuery"]


def test_podmonitor_scrapes_metrics_with_the_token():
    monitor = load("podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and container_port(endpoint["port"]) == 3000
    from serving.access import open_path
    assert not open_path("/metrics"), "if /metrics became open, the scrape would need no token"
    secret = load("secret.example.yaml")
    assert endpoint["authorization"]["type"] == "Bearer"
    assert endpoint["authorization"]["credentials"] == {"name": secret["metadata"]["name"], "key": "token"}
    assert "token" in secret["stringData"]


# ---- kustomization ---------------------------------------------------------------------------------------

def test_kustomization_applies_one_autoscaler_and_never_the_example_secret():
    kustomization = load("kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert all((DEPLOY / r).is_file() for r in resources), resources
    assert {"deployment.yaml", "service.yaml", "pdb.yaml"} <= set(resources)
    assert len({"hpa.yaml", "hpa-cpu.yaml"} & set(resources)) == 1
    assert not {"secret.example.yaml", "ingress.example.yaml", "prometheus-adapter-values.yaml"} & set(resources)
    (image,) = kustomization["images"]
    repository, tag = CONTAINER["image"].rsplit(":", 1)
    assert image["name"] == repository, "kustomize replaces the image by this name"
    assert tag and image["newName"] and isinstance(image["newTag"], str) and image["newTag"]
