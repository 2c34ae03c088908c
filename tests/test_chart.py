"""The Helm chart (helm/labelq) and the sidecar example (helm/examples/sidecar-job.yaml).

Without a helm binary: scripts/chart.py renders and lints through helm-python-sdk (Helm v4's Go
engine). Every render (chart defaults and each ci/*.yaml) is linted strictly, validated against
the Kubernetes 1.30 schemas (kubernetes-validate --strict), scanned by checkov and checked by the
assertions below. checkov lives in its own venv under .cache/ (created on first use, ~1 minute).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "labelq"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
SIDECAR = ROOT / "helm" / "examples" / "sidecar-job.yaml"
CHECKOV_VERSION = "3.3.30"
CHECKOV_VENV = ROOT / ".cache" / "checkov-venv"
KUBE_VERSION = "1.30.0"
IMAGE_UID = 10001  # the Dockerfile's USER; tests/test_dockerfile.py checks that side
RELEASE, NAMESPACE = "labelq", "labelq"
SETTINGS_ENV = {PREFIX + name.upper() for name in Settings.model_fields}

# checkov checks skipped for every scanned file, each with its reason:
CHECKOV_SKIPS = {
    # "Image should use digest": the chart supports `image.digest` (ci/all-on-values.yaml renders
    # it) but cannot default to one: the digest exists only once the image is published, and the
    # example's stand-in images are placeholders. Release pipelines set image.digest.
    "CKV_K8S_43": "digest only known after publishing; image.digest supports it",
    # "Image Pull Policy should be Always": tags are exact versions and the chart pulls by digest
    # when given; Always would make every pod start (and HPA scale-up) depend on the registry
    # being reachable. `image.pullPolicy` can be set to Always where the cluster policy wants it.
    "CKV_K8S_15": "exact tags/digests; IfNotPresent keeps scale-ups independent of the registry",
}
# Skipped only for renders without a NetworkPolicy: "Minimize the admission of pods which lack an
# associated NetworkPolicy". The NetworkPolicy is opt-in (`networkPolicy.enabled`) because its
# allowed peers (clients, Prometheus) depend on the cluster; the render that enables it
# (ci/all-on-values.yaml) is scanned without this skip.
CHECKOV_SKIP_WITHOUT_NETPOL = "CKV2_K8S_6"
# The chart test pod carries two inline skips as annotations (CKV_K8S_8/9: no probes on a pod that
# makes one request and exits); checkov reports them as skipped, not failed.


def _load_chart_script() -> Any:
    spec = importlib.util.spec_from_file_location("labelq_chart_script", ROOT / "scripts" / "chart.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chartpy = _load_chart_script()


def _docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


class Render:
    """One rendered variant: values used, the YAML stream written to disk, the objects."""

    def __init__(self, name: str, values: dict[str, Any], path: Path):
        self.name = name
        self.values = values
        self.merged = _merged_values(values)
        self.path = path
        path.write_text(chartpy.to_stream(chartpy.render(CHART, values, name=RELEASE, namespace=NAMESPACE)))
        self.objects = _docs(path.read_text())

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        assert len(found) == 1, f"{self.name}: expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod_spec(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = [c for c in self.pod_spec["containers"] if c["name"] == "labelq"]
        return container

    @property
    def test_pod(self) -> dict[str, Any]:
        (pod,) = [o for o in self.of_kind("Pod") if o["metadata"]["annotations"].get("helm.sh/hook") == "test"]
        return pod


def _merged_values(values: dict[str, Any]) -> dict[str, Any]:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    return chartpy.merge(defaults, values)


@pytest.fixture(scope="session")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Render]:
    out = tmp_path_factory.mktemp("rendered")
    variants: dict[str, dict[str, Any]] = {"chart-defaults": {}}
    variants |= {path.stem: chartpy.load_values([path]) for path in CI_VALUES}
    return {name: Render(name, values, out / f"{name}.yaml") for name, values in variants.items()}


VARIANTS = ["chart-defaults", *(p.stem for p in CI_VALUES)]


def test_ci_values_cover_the_optional_parts() -> None:
    names = {p.name for p in CI_VALUES}
    assert {"default-values.yaml", "all-on-values.yaml", "hpa-off-values.yaml"} <= names


# --- lint and schema ---------------------------------------------------------------------------


def test_lint_strict_with_defaults_and_every_ci_values_file() -> None:
    assert chartpy.lint(CHART, CI_VALUES) == []


@pytest.mark.parametrize(
    "values, where",
    [
        ({"replicaCont": 3}, "replicaCont"),  # top-level typo
        ({"image": {"tag": "latest"}}, "/image/tag"),
        ({"image": {"repository": "labelq", "digest": "sha256:abc"}}, "/image/digest"),
        ({"config": {"port": 9000}}, "port"),  # not a chart setting (containerPort is)
        ({"config": {"logLevel": "verbose"}}, "/config/logLevel"),
        ({"extraEnv": [{"name": "LABELQ_FOO", "value": "1"}]}, "/extraEnv/0/name"),  # labelq would refuse it
        ({"resources": {"limits": {"cpu": None}}}, "cpu"),  # NUMBA_NUM_THREADS needs limits.cpu
        ({"startupProbe": {"httpGet": {"path": "", "port": "http"}}}, "/startupProbe/httpGet/path"),
        ({"serviceMonitor": {"enabeld": True}}, "enabeld"),
        ({"podDisruptionBudget": {"maxUnavalable": 1}}, "maxUnavalable"),
        ({"config": {"graceSeconds": 0}}, "/config/graceSeconds"),
        ({"config": {"requestTimeoutSeconds": 0}}, "/config/requestTimeoutSeconds"),
        ({"config": {"maxInflightBytes": -1}}, "/config/maxInflightBytes"),
        ({"config": {"datasetTags": ["other"]}}, "/config/datasetTags/0"),  # labelq reserves it
        ({"config": {"datasetTags": ["has space"]}}, "/config/datasetTags/0"),
        ({"auth": {"keys": ["too-short"]}}, "/auth/keys/0"),  # labelq would refuse to start
        ({"auth": {"keys": ["a key with spaces in it"]}}, "/auth/keys/0"),
        ({"auth": {"existingSecret": "Not_A_Name"}}, "/auth/existingSecret"),
        ({"auth": {"enabled": True}}, "enabled"),
    ],
)
def test_schema_rejects(values: dict[str, Any], where: str) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmValuesError, match=re.escape(where)):
        chartpy.render(CHART, values)


def test_lint_reports_a_bad_values_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("autoscaling:\n  enable: false\n")
    problems = chartpy.lint(CHART, [bad])
    assert problems and all(p.startswith(f"[{bad}]") for p in problems)
    assert any("enable" in p for p in problems)


def test_chart_script_cli(tmp_path: Path) -> None:
    script = [sys.executable, str(ROOT / "scripts" / "chart.py")]
    lint = subprocess.run(
        [*script, "lint", "-f", str(CI_VALUES[0])], check=False, capture_output=True, text=True, timeout=120
    )
    assert lint.returncode == 0, lint.stderr
    out = tmp_path / "out.yaml"
    template = subprocess.run(
        [*script, "template", "--name", "demo", "--namespace", "ml", "-f", str(CHART / "ci" / "hpa-off-values.yaml"),
         "--set", "replicaCount=5", "--show-only", "templates/deployment.yaml", "-o", str(out)],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert template.returncode == 0, template.stderr
    text = out.read_text()
    assert text.startswith("---\n# Source: labelq/templates/deployment.yaml\n")
    (deployment,) = _docs(text)
    assert deployment["metadata"]["namespace"] == "ml"
    assert deployment["spec"]["replicas"] == 5  # --set wins over -f
    bad = subprocess.run(
        [*script, "template", "--set", "replicaCont=1"], check=False, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and "replicaCont" in bad.stderr


# --- schema validation (kubernetes-validate) and security scan (checkov) -----------------------


def _kubernetes_validate(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBE_VERSION, *map(str, paths)],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_kubernetes_validate_strict(renders: dict[str, Render]) -> None:
    paths = [r.path for r in renders.values()] + [SIDECAR]
    result = _kubernetes_validate(*paths)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # every object was checked; only the CRD (ServiceMonitor) may be skipped
    passed = len(re.findall(r"^INFO .* passed for resource", output, re.MULTILINE))
    expected = sum(len(r.objects) for r in renders.values()) + len(_docs(SIDECAR.read_text()))
    crds = sum(len(r.of_kind("ServiceMonitor")) for r in renders.values())
    assert passed == expected - crds, output
    warnings = [line for line in output.splitlines() if line.startswith("WARN")]
    assert len(warnings) == crds and all("ServiceMonitor" in w for w in warnings), output


def test_kubernetes_validate_catches_mistakes(tmp_path: Path) -> None:
    """The validator is strict: an unknown field or a wrong type fails (so the test above means
    something)."""
    deployment = _docs(SIDECAR.read_text())[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    assert _kubernetes_validate(bad).returncode != 0


@pytest.fixture(scope="session")
def checkov() -> Path:
    """checkov in its own venv (its dependency pins clash with the project's), made once."""
    exe = CHECKOV_VENV / "bin" / "checkov"
    marker = CHECKOV_VENV / f".checkov-{CHECKOV_VERSION}"
    if not marker.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(CHECKOV_VENV)
        subprocess.run(
            [str(CHECKOV_VENV / "bin" / "python"), "-m", "pip", "install", "-q", f"checkov=={CHECKOV_VERSION}"],
            check=True, timeout=1200,
        )  # fmt: skip
        marker.touch()
    assert exe.exists()
    return exe


def _checkov_targets(renders: dict[str, Render]) -> list[tuple[str, Path, list[str]]]:
    targets = []
    for r in renders.values():
        skips = list(CHECKOV_SKIPS)
        if not r.of_kind("NetworkPolicy"):
            skips.append(CHECKOV_SKIP_WITHOUT_NETPOL)
        targets.append((r.name, r.path, skips))
    # the example has no NetworkPolicy of its own: it is a pattern, not a deployable release
    targets.append(("sidecar-example", SIDECAR, [*CHECKOV_SKIPS, CHECKOV_SKIP_WITHOUT_NETPOL]))
    return targets


def test_checkov_finds_nothing(renders: dict[str, Render], checkov: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "CKV_", "PRISMA_"))}
    env |= {"LOG_LEVEL": "WARNING", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false", "HOME": str(tmp_path)}
    procs = {}
    for name, path, skips in _checkov_targets(renders):
        cmd = [str(checkov), "-f", str(path), "--framework", "kubernetes", "--compact", "--quiet",
               "--skip-download", "--skip-check", ",".join(skips), "-o", "json"]  # fmt: skip
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    failures, summaries = {}, {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode in (0, 1), f"{name}: checkov crashed: {stderr[-2000:]}"
        report = json.loads(stdout)
        reports = report if isinstance(report, list) else [report]
        failed = [c for rep in reports for c in rep["results"]["failed_checks"]]
        summaries[name] = {k: sum(rep["summary"][k] for rep in reports) for k in ("passed", "failed", "skipped")}
        failures[name] = [f"{c['check_id']} {c['check_name']} ({c['resource']})" for c in failed]
    assert all(not f for f in failures.values()), json.dumps(failures, indent=1)
    for name, summary in summaries.items():
        assert summary["passed"] >= 40, f"{name}: checkov ran suspiciously few checks: {summary}"


# --- what the manifests say ----------------------------------------------------------------------


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _assert_secure_container(container: dict[str, Any], pod_security: dict[str, Any]) -> None:
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == IMAGE_UID
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    assert sc.get("privileged") in (None, False)
    assert (sc.get("seccompProfile") or pod_security["seccompProfile"])["type"] == "RuntimeDefault"
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] == IMAGE_UID
    assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["resources"]["limits"] and container["resources"]["requests"]
    image = container["image"]
    assert re.search(r"(:[\w][\w.-]*|@sha256:[0-9a-f]{64})$", image) and not image.endswith(":latest"), image


def _assert_labelq_env(container: dict[str, Any]) -> None:
    env = _env(container)
    unknown = {n for n in env if n.startswith(PREFIX)} - SETTINGS_ENV
    assert not unknown, f"labelq refuses to start with {unknown}"
    threads = env["NUMBA_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert threads["resource"] == "limits.cpu" and str(threads["divisor"]) == "1"
    assert threads.get("containerName", container["name"]) == container["name"]
    assert "cpu" in container["resources"]["limits"]
    cache = env["NUMBA_CACHE_DIR"]["value"]
    assert cache in {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_security_context(renders: dict[str, Render], variant: str) -> None:
    r = renders[variant]
    pod = r.pod_spec
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # else LABELQ_SERVICE_HOST & co. stop labelq
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key)
    _assert_secure_container(r.container, pod["securityContext"])
    assert pod["securityContext"]["runAsUser"] == r.merged["podSecurityContext"]["runAsUser"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes(renders: dict[str, Render], variant: str) -> None:
    c = renders[variant].container
    assert c["startupProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    startup = c["startupProbe"]
    # an empty numba cache compiles for about 230 s on 2 cores (benchmarks/cold_start.py --no-cache)
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 460, "too little time for the numba warm-up"


@pytest.mark.parametrize("variant", VARIANTS)
def test_environment_and_volumes(renders: dict[str, Render], variant: str) -> None:
    r = renders[variant]
    c = r.container
    env = _env(c)
    _assert_labelq_env(c)
    assert env["LABELQ_HOST"]["value"] == "0.0.0.0"
    assert env["LABELQ_PORT"]["value"] == str(r.merged["containerPort"])
    assert env["LABELQ_MAX_BODY_BYTES"]["value"] == str(r.merged["config"]["maxBodyBytes"])  # not 1.073741824e+09
    assert env["LABELQ_WARMUP"]["value"] == "true"
    assert env["HOME"]["value"] == env["TMPDIR"]["value"] == "/tmp"
    assert env["NUMBA_CACHE_DIR"]["value"] == r.merged["cache"]["path"] == "/var/cache/labelq"
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    for mount in c["volumeMounts"]:
        if "secret" in volumes[mount["name"]]:  # the API keys (test_api_keys_secret)
            assert mount["readOnly"] is True
            continue
        assert "emptyDir" in volumes[mount["name"]], mount
        assert volumes[mount["name"]]["emptyDir"].get("sizeLimit")
    for extra in r.merged["extraEnv"]:
        assert env[extra["name"]] == extra
    config = r.merged["config"]
    assert env["LABELQ_GRACE_SECONDS"]["value"] == str(config["graceSeconds"])
    assert float(env["LABELQ_REQUEST_TIMEOUT_SECONDS"]["value"]) == config["requestTimeoutSeconds"]
    assert env["LABELQ_MAX_INFLIGHT_BYTES"]["value"] == str(config["maxInflightBytes"])
    assert env["LABELQ_DATASET_TAG_LIMIT"]["value"] == str(config["datasetTagLimit"])
    if config["datasetTags"]:
        assert env["LABELQ_DATASET_TAGS"]["value"] == ",".join(config["datasetTags"])
    else:
        assert "LABELQ_DATASET_TAGS" not in env


@pytest.mark.parametrize("variant", VARIANTS)
def test_labelq_accepts_the_rendered_settings(renders: dict[str, Render], variant: str, tmp_path: Path) -> None:
    """Every LABELQ_* value the chart renders is one labelq starts with (its own validation)."""
    env = {name: e["value"] for name, e in _env(renders[variant].container).items() if name.startswith(PREFIX)}
    if "LABELQ_API_KEYS_FILE" in env:  # stands for the mounted Secret
        keys = tmp_path / "api-keys"
        keys.write_text("\n".join(renders[variant].merged["auth"]["keys"] or ["k" * 32]) + "\n")
        env["LABELQ_API_KEYS_FILE"] = str(keys)
    settings = Settings.from_env(env)
    assert settings.grace_seconds == renders[variant].merged["config"]["graceSeconds"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_keys_secret(renders: dict[str, Render], variant: str) -> None:
    import base64

    r = renders[variant]
    auth = r.merged["auth"]
    env = _env(r.container)
    secrets = r.of_kind("Secret")
    annotations = r.deployment["spec"]["template"]["metadata"].get("annotations") or {}
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    if not (auth["existingSecret"] or auth["keys"]):
        assert "LABELQ_API_KEYS_FILE" not in env and "api-keys" not in volumes and not secrets
        assert "checksum/api-keys" not in annotations
        return
    (mount,) = [m for m in r.container["volumeMounts"] if m["name"] == "api-keys"]
    assert mount["readOnly"] is True
    assert env["LABELQ_API_KEYS_FILE"]["value"] == mount["mountPath"] + "/api-keys"
    secret_volume = volumes["api-keys"]["secret"]
    assert secret_volume["items"] == [{"key": auth["secretKey"], "path": "api-keys"}]
    assert not any(e.get("valueFrom", {}).get("secretKeyRef") for e in env.values())  # a file, not env vars
    if auth["existingSecret"]:
        assert secret_volume["secretName"] == auth["existingSecret"] and not secrets
        assert "checksum/api-keys" not in annotations
    else:
        (secret,) = secrets
        assert secret_volume["secretName"] == secret["metadata"]["name"]
        assert secret["type"] == "Opaque"
        text = base64.b64decode(secret["data"][auth["secretKey"]]).decode()
        assert text.splitlines() == auth["keys"]
        assert len(annotations["checksum/api-keys"]) == 64
        # other keys roll the pods
        other = chartpy.render(CHART, chartpy.merge(r.values, {"auth": {"keys": ["z" * 32]}}), name=RELEASE,
                               namespace=NAMESPACE)  # fmt: skip
        (deployment,) = [d for d in _docs(chartpy.to_stream(other)) if d["kind"] == "Deployment"]
        assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/api-keys"] != annotations[
            "checksum/api-keys"]  # fmt: skip


@pytest.mark.parametrize("variant", VARIANTS)
def test_replicas_and_autoscaling(renders: dict[str, Render], variant: str) -> None:
    r = renders[variant]
    spec = r.deployment["spec"]
    hpas = r.of_kind("HorizontalPodAutoscaler")
    if r.merged["autoscaling"]["enabled"]:
        assert "replicas" not in spec, "the HPA owns the replica count"
        (hpa,) = hpas
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"], target["name"]) == (
            "apps/v1",
            "Deployment",
            r.deployment["metadata"]["name"],
        )
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} >= {"cpu"}
    else:
        assert not hpas
        assert spec["replicas"] == r.merged["replicaCount"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_selectors_and_service(renders: dict[str, Render], variant: str) -> None:
    r = renders[variant]
    deployment = r.deployment
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}
    assert selector["app.kubernetes.io/instance"] == RELEASE
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    for obj in r.objects:
        meta = obj["metadata"]
        assert len(meta["name"]) <= 63 and not meta["name"].endswith("-")
        assert meta["namespace"] == NAMESPACE
        labels = meta["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "labelq-" + chartpy._helm().Chart.load(str(CHART)).version
        assert labels["app.kubernetes.io/instance"] == RELEASE

    service = r.one("Service")
    assert service["spec"]["selector"] == selector
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["targetPort"] == "http"
    assert port["port"] == r.merged["service"]["port"]
    container_ports = {p["name"]: p["containerPort"] for p in r.container["ports"]}
    assert container_ports == {"http": r.merged["containerPort"]}
    if variant == "hpa-off-values":
        assert port["port"] != container_ports["http"]  # decoupled

    pdbs = r.of_kind("PodDisruptionBudget")
    if r.merged["podDisruptionBudget"]["enabled"]:
        (pdb,) = pdbs
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["spec"]["selector"]["matchLabels"] == selector
        assert ("minAvailable" in pdb["spec"]) != ("maxUnavailable" in pdb["spec"])
    else:
        assert not pdbs

    spread = r.pod_spec["topologySpreadConstraints"]
    if not r.merged["topologySpreadConstraints"]:
        assert spread[0]["labelSelector"]["matchLabels"] == selector

    accounts = r.of_kind("ServiceAccount")
    if r.merged["serviceAccount"]["create"]:
        (account,) = accounts
        assert account["automountServiceAccountToken"] is False
        assert r.pod_spec["serviceAccountName"] == account["metadata"]["name"]
    else:
        assert not accounts and r.pod_spec["serviceAccountName"] == "default"


@pytest.mark.parametrize("variant", VARIANTS)
def test_optional_resources(renders: dict[str, Render], variant: str) -> None:
    r = renders[variant]
    selector = r.deployment["spec"]["selector"]["matchLabels"]
    monitors = r.of_kind("ServiceMonitor")
    if r.merged["serviceMonitor"]["enabled"]:
        (monitor,) = monitors
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= r.one("Service")["metadata"]["labels"].items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
        assert monitor["metadata"]["labels"].items() >= r.merged["serviceMonitor"]["labels"].items()
    else:
        assert not monitors
    policies = r.of_kind("NetworkPolicy")
    if r.merged["networkPolicy"]["enabled"]:
        (policy,) = policies
        assert policy["spec"]["podSelector"]["matchLabels"] == selector
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        (ingress,) = policy["spec"]["ingress"]
        assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
        assert ingress.get("from", []) == r.merged["networkPolicy"]["ingressFrom"]
        assert policy["spec"]["egress"] == r.merged["networkPolicy"]["egress"]
    else:
        assert not policies


@pytest.mark.parametrize("variant", VARIANTS)
def test_shutdown(renders: dict[str, Render], variant: str) -> None:
    r = renders[variant]
    grace = r.pod_spec["terminationGracePeriodSeconds"]
    sleep = r.merged["preStopSleepSeconds"]
    drain = r.merged["config"]["graceSeconds"]
    assert _env(r.container)["LABELQ_GRACE_SECONDS"]["value"] == str(drain)
    assert grace >= sleep + drain, "labelq drains for LABELQ_GRACE_SECONDS after the preStop sleep"
    hook = r.container.get("lifecycle", {}).get("preStop")
    if sleep:
        assert hook == {"exec": {"command": ["sleep", str(sleep)]}}
    else:
        assert hook is None


def test_grace_period_shorter_than_the_drain_is_refused() -> None:
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match="terminationGracePeriodSeconds"):
        chartpy.render(CHART, {"terminationGracePeriodSeconds": 40, "config": {"graceSeconds": 36}})
    rendered = chartpy.render(CHART, {"terminationGracePeriodSeconds": 41, "config": {"graceSeconds": 36}})
    assert "LABELQ_GRACE_SECONDS" in chartpy.to_stream(rendered)


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_reference(renders: dict[str, Render], variant: str) -> None:
    r = renders[variant]
    image = r.merged["image"]
    app_version = chartpy._helm().Chart.load(str(CHART)).metadata["appVersion"]
    expected = (
        f"{image['repository']}@{image['digest']}"
        if image["digest"]
        else f"{image['repository']}:{image['tag'] or app_version}"
    )
    assert r.container["image"] == expected
    assert r.test_pod["spec"]["containers"][0]["image"] == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_test_pod(renders: dict[str, Render], variant: str) -> None:
    r = renders[variant]
    pod = r.test_pod
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    _assert_secure_container(container, spec["securityContext"])
    script = container["command"][-1]
    service = r.one("Service")
    assert f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/health/ready" in script
    # the Service must not route to the test pod
    assert not service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_test_pod_script_checks_readiness(renders: dict[str, Render], tmp_path: Path) -> None:
    """Run the test pod's script against a local stand-in: it passes on 200 and fails on 503."""
    import http.server
    import threading

    status = {"code": 503}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"] if self.path == "/health/ready" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = renders["chart-defaults"]
        service = r.one("Service")
        url = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
        script = r.test_pod["spec"]["containers"][0]["command"][-1].replace(
            url, f"http://127.0.0.1:{server.server_port}"
        )
        run = lambda: subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, timeout=30)
        assert run().returncode != 0
        status["code"] = 200
        assert run().returncode == 0
    finally:
        server.shutdown()


def test_long_release_names_are_truncated() -> None:
    name = "a-very-long-release-name-that-is-53-characters-long-x"
    assert len(name) == 53
    objects = _docs(chartpy.to_stream(chartpy.render(CHART, {}, name=name, namespace=NAMESPACE)))
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 63 and not obj["metadata"]["name"].endswith("-")
    objects = _docs(chartpy.to_stream(chartpy.render(CHART, {}, name="labelq-prod", namespace=NAMESPACE)))
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"} == {"labelq-prod"}


def test_notes() -> None:
    notes = chartpy.render(CHART, {}, name=RELEASE, namespace=NAMESPACE, include_notes=True)[
        "labelq/templates/NOTES.txt"
    ]
    assert "port-forward service/labelq 8000:80" in notes
    assert "/health/ready" in notes and "helm test labelq" in notes


def _documented_values() -> set[str]:
    """Dotted paths of the keys in values.yaml that have a `# --` comment block right above."""
    documented: set[str] = set()
    stack: list[str] = []
    in_doc = False
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            in_doc = True
            continue
        if stripped.startswith("#"):
            continue
        m = re.match(r"^(\s*)([A-Za-z]\w*):", line)
        if m:
            stack = stack[: len(m.group(1)) // 2] + [m.group(2)]
            if in_doc:
                documented.add(".".join(stack))
        in_doc = False
    return documented


def test_every_value_is_documented() -> None:
    """Each value has a `# --` comment (or sits under a documented map), the README's table lists
    every documented value, and the schema knows every top-level key."""
    documented = _documented_values()
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def undocumented(node: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            path = prefix + key
            if path in documented:
                continue
            if isinstance(value, dict) and value:
                out += undocumented(value, path + ".")
            else:
                out.append(path)
        return out

    assert not undocumented(values, ""), "values without a '# --' comment"
    readme = (ROOT / "helm" / "README.md").read_text()
    missing = sorted(path for path in documented if f"| `{path}` |" not in readme)
    assert not missing, f"helm/README.md does not list {missing}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(values) <= set(schema["properties"])


# --- the sidecar example -------------------------------------------------------------------------


def test_sidecar_example() -> None:
    (job,) = _docs(SIDECAR.read_text())
    assert job["kind"] == "Job"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    (labelq,) = pod["initContainers"]
    assert labelq["restartPolicy"] == "Always"  # native sidecar: stopped when the trainer is done
    assert labelq["startupProbe"]["httpGet"]["path"] == "/health/ready"  # gates the trainer's start
    assert labelq["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert labelq["livenessProbe"]["httpGet"]["path"] == "/health/live"
    _assert_labelq_env(labelq)
    env = _env(labelq)
    assert env["LABELQ_HOST"]["value"] == "127.0.0.1"  # reachable from the pod only
    port = env["LABELQ_PORT"]["value"]
    assert [p["containerPort"] for p in labelq["ports"]] == [int(port)]
    (trainer,) = pod["containers"]
    assert _env(trainer)["LABEL_ISSUES_URL"]["value"] == f"http://127.0.0.1:{port}"
    assert "/find-issues" in trainer["command"][-1]
    for container in (labelq, trainer):
        _assert_secure_container(container, pod["securityContext"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in (labelq, trainer):
        for mount in container["volumeMounts"]:
            assert "emptyDir" in volumes[mount["name"]]
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_sidecar_example_trainer_script_runs(tmp_path: Path) -> None:
    """The trainer's script is valid Python that posts to LABEL_ISSUES_URL and reads the answer (run
    against a stand-in server answering what labelq answers for that request)."""
    import http.server
    import threading

    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen["path"], seen["body"] = self.path, body
            payload = json.dumps({"ranked_issue_indices": [1, 5]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (job,) = _docs(SIDECAR.read_text())
        (trainer,) = job["spec"]["template"]["spec"]["containers"]
        env = dict(os.environ, LABEL_ISSUES_URL=f"http://127.0.0.1:{server.server_port}")
        run = subprocess.run(trainer["command"], env=env, check=False, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert "label issues: [1, 5]" in run.stdout
        assert seen["path"] == "/find-issues" and len(seen["body"]["labels"]) == len(seen["body"]["pred_probs"])
    finally:
        server.shutdown()
