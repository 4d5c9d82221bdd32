"""deploy/kubernetes: every manifest against the Kubernetes schemas, and against the code.

Each overlay is rendered with ``kustomize build`` or ``kubectl kustomize`` when one of them is
on PATH (otherwise those tests skip); every rendered document and every raw resource file is
validated by kubernetes-validate in strict mode (an unknown field is an error) for the oldest
Kubernetes the manifests claim and for the newest schema the package ships. The other tests
tie the manifests to the code: commands and flags the CLI accepts, ``ALIGNLOOP_*`` names that
are settings with valid values, probe paths that are routes on the port the process listens
on, secret keys that the example documents, one controller and one trainer, non-root
containers, and the adapter store mounted where the registry's paths point.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from deploy.cli import COMMANDS
from schemas.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "kubernetes"
SECRETS_EXAMPLE = K8S / "secrets.example.env"
OVERLAYS = ("cpu", "gpu")
SOURCES = ("raw", *OVERLAYS)
"""What the manifest checks run on: the raw resource files (always), each rendered overlay."""

SECRET = "alignloop-secrets"
CONFIG = "alignloop-config"
PVC = "alignloop-adapters"
UID = 10001
"""The image's user (deploy/docker: ``USER 10001:10001``)."""
MIN_KUBERNETES = "1.29"
SCHEMA_VERSIONS = (MIN_KUBERNETES, kubernetes_validate.latest_version())
PREFIX = str(Settings.model_config.get("env_prefix", ""))
SECRET_SETTINGS = (
    "database_url",
    "kafka_bootstrap",
    "response_id_secret",
    "routing_salt",
    "admin_token",
    "kafka_sasl_username",
    "kafka_sasl_password",
)
"""Settings that must come from the Secret, never from a literal value in a manifest."""
DATABASE_KEYS = {
    "serve": "database-url-serving",
    "ingest": "database-url-ingest",
    "train": "database-url-trainer",
    "canary": "database-url-controller",
    "admin": "database-url-controller",
    "db": "database-url-owner",
}
"""The Secret key of each command's database URL: its component's least-privilege role
(schemas/db_roles.py), the owner's for the migration alone."""
KAFKA_CLIENTS = ("serve", "ingest", "train")
KAFKA_CA_SECRET = "alignloop-kafka-ca"
GPU = "nvidia.com/gpu"
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Doc = dict[str, Any]


# --- reading the manifests -----------------------------------------------------------------


def _load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@functools.cache
def _kustomizations() -> dict[Path, Doc]:
    return {path: _load(path)[0] for path in sorted(K8S.rglob("kustomization.yaml"))}


@functools.cache
def _listed() -> tuple[frozenset[Path], frozenset[Path]]:
    """The resource files and the patch files the kustomizations name."""
    resources: set[Path] = set()
    patches: set[Path] = set()
    for path, kustomization in _kustomizations().items():
        for entry in kustomization.get("resources", []):
            target = (path.parent / entry).resolve()
            assert target.exists(), f"{path}: resource {entry} does not exist"
            if target.is_file():
                resources.add(target)
        for patch in kustomization.get("patches", []):
            target = (path.parent / patch["path"]).resolve()
            assert target.is_file(), f"{path}: patch {patch['path']} does not exist"
            patches.add(target)
    return frozenset(resources), frozenset(patches)


def _generated_config(kustomization: Doc) -> dict[str, str]:
    for generator in kustomization.get("configMapGenerator", []):
        if generator["name"] == CONFIG:
            return dict(line.split("=", 1) for line in generator.get("literals", []))
    return {}


@functools.cache
def raw_docs() -> tuple[Doc, ...]:
    """Every raw resource, plus the base's generated ConfigMap (from its literals)."""
    docs = [doc for path in sorted(_listed()[0]) for doc in _load(path)]
    base = _generated_config(_kustomizations()[K8S / "base" / "kustomization.yaml"])
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CONFIG}}
    return (*docs, {**config, "data": base})


def _renderer() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@functools.cache
def _render(overlay: str) -> tuple[Doc, ...]:
    tool = _renderer()
    assert tool is not None
    done = subprocess.run(
        [*tool, str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{' '.join(tool)} overlays/{overlay}:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def rendered(overlay: str) -> tuple[Doc, ...]:
    if _renderer() is None:
        pytest.skip("neither kustomize nor kubectl is on PATH: the overlays are not rendered")
    return _render(overlay)


@pytest.fixture(params=SOURCES)
def docs(request: pytest.FixtureRequest) -> tuple[Doc, ...]:
    return raw_docs() if request.param == "raw" else rendered(request.param)


def config_of(docs: tuple[Doc, ...]) -> dict[str, str]:
    """The data of alignloop-config (named with kustomize's hash suffix once rendered)."""
    found = [
        doc
        for doc in docs
        if doc["kind"] == "ConfigMap"
        and re.fullmatch(rf"{CONFIG}(-[a-z0-9]{{10}})?", doc["metadata"]["name"])
    ]
    assert len(found) == 1, f"{len(found)} ConfigMaps named {CONFIG}"
    return {k: str(v) for k, v in found[0].get("data", {}).items()}


def pod_specs(docs: tuple[Doc, ...]) -> Iterator[tuple[Doc, Doc]]:
    for doc in docs:
        if doc["kind"] == "CronJob":
            yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def containers(docs: tuple[Doc, ...]) -> Iterator[tuple[Doc, Doc, Doc]]:
    for doc, spec in pod_specs(docs):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            yield doc, spec, container


def alignloop_argv(container: Doc) -> list[str]:
    """The ``alignloop`` arguments a container runs: its args under the image's ENTRYPOINT
    (``alignloop``), or what follows ``-m deploy.cli`` under torchrun."""
    command = container.get("command")
    args = [str(a) for a in container.get("args", [])]
    if command is None or command == ["alignloop"]:
        return args
    if command == ["torchrun"]:
        assert "-m" in args, f"{container['name']}: torchrun without -m"
        at = args.index("-m")
        assert args[at + 1] == "deploy.cli", f"{container['name']}: torchrun runs {args[at + 1]}"
        return args[at + 2 :]
    raise AssertionError(f"{container['name']} runs {command}, not alignloop")


def _flags(argv: list[str]) -> dict[str, str]:
    """``--name value`` and ``--name=value`` as a dict (flags without a value map to '')."""
    flags: dict[str, str] = {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        name, sep, value = arg.partition("=")
        if not sep and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        flags[name] = value
    return flags


def env_of(container: Doc, config: dict[str, str]) -> dict[str, str | None]:
    """The container's environment: its ConfigMap, then its own entries (None: from a ref)."""
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"{container['name']}: envFrom {source} (keys only)"
        assert source["configMapRef"]["name"].startswith(CONFIG)
        env.update(config)
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value")
    return env


def _setting_default(field: str) -> Any:
    return Settings.model_fields[field].default


def listening_port(argv: list[str], env: dict[str, str | None]) -> int | None:
    """The HTTP port the process serves to the cluster (its flag, else its setting, else the
    default): for the canary controller its metrics port, its operators' port being on the
    pod's loopback (:func:`test_the_admin_api_listens_on_the_pods_loopback_only`)."""
    flags = _flags(argv)

    def pick(flag_names: tuple[str, ...], field: str | None) -> int | None:
        for flag in flag_names:
            if flags.get(flag):
                return int(flags[flag])
        if field is None:
            return None
        value = env.get(PREFIX + field.upper())
        return int(value) if value else int(_setting_default(field))

    command = argv[0]
    if command == "serve":
        return pick(("--port",), "port")
    if command == "canary":
        return pick((), "controller_metrics_port")
    if command == "admin":
        return pick(("--port",), "admin_port")
    if command == "ingest":
        return pick(("--metrics-port",), "ingest_metrics_port")
    if command == "train":
        return pick(("--metrics-port",), None)
    return None


# --- the files -----------------------------------------------------------------------------


def test_every_yaml_file_is_a_kustomization_a_listed_resource_or_a_listed_patch() -> None:
    resources, patches = _listed()
    assert resources and patches
    assert not resources & patches, "a file is both a resource and a patch"
    files = {p.resolve() for p in [*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")]}
    unaccounted = files - resources - patches - {p.resolve() for p in _kustomizations()}
    assert not unaccounted, f"YAML files no kustomization uses: {sorted(unaccounted)}"
    assert {K8S / "base" / "kustomization.yaml"} | {
        K8S / "overlays" / o / "kustomization.yaml" for o in OVERLAYS
    } <= set(_kustomizations())


def test_the_overlays_build_on_the_base() -> None:
    for overlay in OVERLAYS:
        kustomization = _kustomizations()[K8S / "overlays" / overlay / "kustomization.yaml"]
        assert "../../base" in kustomization["resources"], overlay


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_raw_resource_validates_strictly(version: str) -> None:
    resources, _ = _listed()
    checked = 0
    for path in sorted(resources):
        for doc in _load(path):
            _validate(doc, version, f"{path.relative_to(ROOT)}")
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_document_validates_strictly(overlay: str, version: str) -> None:
    docs = rendered(overlay)
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert {"ConfigMap", "PersistentVolumeClaim"} <= kinds
    for doc in docs:
        _validate(doc, version, f"overlays/{overlay}: {doc['kind']}/{doc['metadata']['name']}")


def _validate(doc: Doc, version: str, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where} is not a valid Kubernetes {version} object: {exc}")


def test_the_manifests_commit_no_secret() -> None:
    for source in SOURCES:
        docs = raw_docs() if source == "raw" else _render_or_none(source)
        assert all(doc["kind"] != "Secret" for doc in docs or ()), source


def _render_or_none(overlay: str) -> tuple[Doc, ...] | None:
    return _render(overlay) if _renderer() is not None else None


# --- commands, flags, settings -------------------------------------------------------------


def test_every_container_runs_an_alignloop_command(docs: tuple[Doc, ...]) -> None:
    seen = set()
    for _, _, container in containers(docs):
        argv = alignloop_argv(container)
        assert argv and argv[0] in COMMANDS, f"{container['name']}: {argv[:1]} is no command"
        seen.add(argv[0])
    assert {"serve", "ingest", "canary", "train"} <= seen


def test_every_command_line_gets_past_its_parser(docs: tuple[Doc, ...]) -> None:
    for _, _, container in containers(docs):
        argv = alignloop_argv(container)
        env_names = {e["name"] for e in container.get("env", [])}
        for ref in VAR_REF.findall(" ".join([*container.get("command", []), *argv])):
            assert ref in env_names, f"{container['name']}: $({ref}) is not in its env"
        failure = _parse_failure(tuple(VAR_REF.sub("1", a) for a in argv))
        assert failure is None, f"{container['name']}: alignloop {' '.join(argv)}: {failure}"


@functools.cache
def _parse_failure(argv: tuple[str, ...]) -> str | None:
    """None when ``alignloop ARGV`` gets past its argument parser. Run with no database and
    an empty state directory, every long-running command stops right after parsing (exit 2
    with its own message); an argparse refusal prints ``usage:``."""
    if argv[0] == "bootstrap-model":  # would build the model: parse in-process instead
        from trainer.demo.cli import _parser

        try:
            _parser().parse_args(list(argv[1:]))
        except SystemExit as exc:
            return f"refused by argparse (exit {exc.code})"
        return None
    with tempfile.TemporaryDirectory() as state:
        env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
        env[PREFIX + "STATE_DIR"] = state
        done = subprocess.run(
            [sys.executable, "-m", "deploy.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=300,
        )
    if done.returncode != 2 or "usage:" in done.stderr or "Traceback" in done.stderr:
        return f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"
    return None


def _alignloop_names(docs: tuple[Doc, ...]) -> set[str]:
    config = config_of(docs)
    names = {name for name in config if name.startswith(PREFIX)}
    for _, _, container in containers(docs):
        names |= {e["name"] for e in container.get("env", []) if e["name"].startswith(PREFIX)}
    return names


def test_every_alignloop_variable_is_a_setting(docs: tuple[Doc, ...]) -> None:
    fields = {PREFIX + name.upper() for name in Settings.model_fields}
    names = _alignloop_names(docs)
    assert len(names) >= 10
    unknown = names - fields
    assert not unknown, f"not fields of schemas.settings.Settings: {sorted(unknown)}"


def test_the_configured_values_are_valid_settings(
    docs: tuple[Doc, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)
    config = config_of(docs)
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # a value of the wrong type raises here
    for name, value in config.items():
        if name.startswith(PREFIX):
            parsed = getattr(settings, name[len(PREFIX) :].lower())
            shown = str(parsed).lower() if isinstance(parsed, bool) else str(parsed)
            assert shown == value, name


def test_secrets_come_from_the_one_secret_by_documented_keys(docs: tuple[Doc, ...]) -> None:
    documented = example_keys()
    secret_names = {PREFIX + field.upper() for field in SECRET_SETTINGS}
    for _, _, container in containers(docs):
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if entry["name"] in secret_names:
                assert ref is not None, f"{container['name']}: {entry['name']} not from a Secret"
            if ref is not None:
                assert ref["name"] == SECRET, f"{container['name']}: Secret {ref['name']}"
                assert ref["key"] in documented, f"{ref['key']} is not in {SECRETS_EXAMPLE.name}"
                assert not ref.get("optional"), f"{container['name']}: optional {ref['key']}"


def test_every_documented_secret_key_is_used() -> None:
    used = {
        entry["valueFrom"]["secretKeyRef"]["key"]
        for _, _, container in containers(raw_docs())
        for entry in container.get("env", [])
        if "secretKeyRef" in entry.get("valueFrom", {})
    }
    assert used == example_keys()


def example_keys() -> set[str]:
    keys = set()
    for line in SECRETS_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, _ = line.partition("=")
            assert sep, f"{SECRETS_EXAMPLE.name}: {line!r} is not KEY=VALUE"
            keys.add(key)
    return keys


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
def test_the_example_env_file_makes_the_secret() -> None:
    done = subprocess.run(
        [
            *("kubectl", "create", "secret", "generic", SECRET, "--dry-run=client", "-o", "yaml"),
            f"--from-env-file={SECRETS_EXAMPLE}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    secret = yaml.safe_load(done.stdout)
    _validate(secret, SCHEMA_VERSIONS[-1], "the Secret from secrets.example.env")
    assert set(secret["data"]) == example_keys()


def _secret_key(container: Doc, name: str) -> str | None:
    for entry in container.get("env", []):
        if entry["name"] == name:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            return None if ref is None else str(ref["key"])
    return None


def test_each_component_connects_as_its_own_database_role(docs: tuple[Doc, ...]) -> None:
    seen = set()
    for doc, _, container in containers(docs):
        command = alignloop_argv(container)[0]
        key = _secret_key(container, PREFIX + "DATABASE_URL")
        if command not in DATABASE_KEYS:
            assert key is None, f"{container['name']} ({command}) connects to Postgres"
            continue
        assert key == DATABASE_KEYS[command], f"{doc['metadata']['name']}: {key}"
        seen.add(command)
    assert {"serve", "ingest", "train", "canary", "db"} <= seen


def test_only_the_migration_job_migrates_as_the_owner(docs: tuple[Doc, ...]) -> None:
    (job,) = _workloads_running(docs, "db", "migrate")
    assert job["kind"] == "Job" and job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0, "a later apply must be able to recreate it"
    owners = [
        doc["metadata"]["name"]
        for doc, _, container in containers(docs)
        if _secret_key(container, PREFIX + "DATABASE_URL") == "database-url-owner"
    ]
    assert owners == [job["metadata"]["name"]]


def test_every_kafka_client_talks_sasl_ssl_with_the_mounted_ca(
    docs: tuple[Doc, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    from schemas import kafka_config

    config = config_of(docs)
    cafile = config[PREFIX + "KAFKA_SSL_CAFILE"]
    checked = 0
    for doc, spec, container in containers(docs):
        if alignloop_argv(container)[0] not in KAFKA_CLIENTS:
            continue
        where = f"{doc['metadata']['name']} {container['name']}"
        for name in ("KAFKA_BOOTSTRAP", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"):
            assert _secret_key(container, PREFIX + name), f"{where}: {name} not from the Secret"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        ca_mounts = [
            m
            for m in container.get("volumeMounts", [])
            if volumes[m["name"]].get("secret", {}).get("secretName") == KAFKA_CA_SECRET
        ]
        assert len(ca_mounts) == 1, f"{where}: the CA Secret is not mounted"
        (mount,) = ca_mounts
        items = volumes[mount["name"]]["secret"].get("items", [])
        files = {f"{mount['mountPath']}/{item['path']}" for item in items}
        assert cafile in files, f"{where}: {cafile} is not a file of {KAFKA_CA_SECRET}"
        assert mount.get("readOnly") is True, where
        # The combination is one the clients accept (secret values stand in for the refs).
        env = env_of(container, config)
        for name in list(os.environ):
            if name.startswith(PREFIX):
                monkeypatch.delenv(name)
        for name, value in env.items():
            if name.startswith(PREFIX):
                monkeypatch.setenv(name, value if value is not None else "from-the-secret")
        settings = Settings()
        assert settings.kafka_security_protocol == "SASL_SSL", where
        kafka_config.check(settings)
        checked += 1
    assert checked >= 3


# --- probes, ports, scaling ----------------------------------------------------------------


@functools.cache
def serving_routes() -> frozenset[str]:
    """The GET routes serving/app.py declares (``@app.get("...")``)."""
    tree = ast.parse((ROOT / "serving" / "app.py").read_text())
    paths = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "app"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            paths.add(str(node.args[0].value))
    return frozenset(paths)


@functools.cache
def operator_routes() -> frozenset[str]:
    """The GET routes of the controller's HTTP port (admin API, console, /metrics)."""
    from deploy.console.app import create_app

    app = create_app("postgresql://unused", None)
    return frozenset(
        str(getattr(r, "path", ""))
        for r in app.routes
        if "GET" in (getattr(r, "methods", None) or ())
    )


def probe_routes(command: str) -> frozenset[str]:
    if command == "serve":
        return serving_routes()
    if command == "admin":
        return operator_routes()
    if command in ("ingest", "train", "canary"):
        return frozenset({"/metrics"})  # prometheus_client's start_http_server
    return frozenset()


def test_the_serving_health_route_exists() -> None:
    assert "/healthz" in serving_routes() and "/metrics" in serving_routes()
    assert "/metrics" in operator_routes()


def test_probes_ask_real_routes_on_the_port_the_process_listens_on(
    docs: tuple[Doc, ...],
) -> None:
    config = config_of(docs)
    probed = set()
    for doc, _, container in containers(docs):
        argv = alignloop_argv(container)
        port = listening_port(argv, env_of(container, config))
        named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            assert "httpGet" in probe, f"{container['name']} {kind}: not an HTTP probe"
            path = probe["httpGet"]["path"]
            assert path in probe_routes(argv[0]), f"{container['name']} {kind}: no route {path}"
            probe_port = named.get(probe["httpGet"]["port"], probe["httpGet"]["port"])
            assert probe_port == port, f"{container['name']} {kind}: port {probe_port} != {port}"
            probed.add(argv[0])
        if port is not None:
            assert port in [p["containerPort"] for p in container.get("ports", [])]
        annotations = _template(doc).get("metadata", {}).get("annotations", {})
        if "prometheus.io/port" in annotations:
            assert int(annotations["prometheus.io/port"]) == port, container["name"]
    assert {"serve", "canary"} <= probed


def _template(doc: Doc) -> Doc:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    return doc["spec"]["template"]


def test_the_admin_api_listens_on_the_pods_loopback_only(docs: tuple[Doc, ...]) -> None:
    """The operators' port (admin API, console) binds 127.0.0.1 in the pod, so only a
    port-forward reaches it; no Service points at it; Prometheus and the probes use the
    metrics port, which serves /metrics alone."""
    config = config_of(docs)
    (controller,) = _workloads_running(docs, "canary")
    (container,) = controller["spec"]["template"]["spec"]["containers"]
    env = env_of(container, config)
    argv = alignloop_argv(container)
    assert "--host" not in _flags(argv) and "--port" not in _flags(argv)
    host = env.get(PREFIX + "ADMIN_HOST") or _setting_default("admin_host")
    assert host == "127.0.0.1"
    admin_port = int(env.get(PREFIX + "ADMIN_PORT") or _setting_default("admin_port"))
    metrics_port = listening_port(argv, env)
    assert metrics_port and metrics_port != admin_port
    assert env.get(PREFIX + "CONTROLLER_METRICS_HOST", "0.0.0.0") == "0.0.0.0"
    declared = {p["containerPort"] for p in container.get("ports", [])}
    assert admin_port not in declared and metrics_port in declared
    labels = _template(controller)["metadata"]["labels"]
    for service in (d for d in docs if d["kind"] == "Service"):
        assert not service["spec"]["selector"].items() <= labels.items(), "a Service to it"
    # Named operators' tokens: a file on a read-only mount of an optional Secret.
    tokens = Path(str(env[PREFIX + "ADMIN_TOKENS_FILE"]))
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(tokens.parent)]
    assert mount.get("readOnly") is True
    volumes = {v["name"]: v for v in controller["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mount["name"]]["secret"]
    assert secret["optional"] is True and [i["path"] for i in secret["items"]] == [tokens.name]


def test_serving_is_ready_only_when_healthy(docs: tuple[Doc, ...]) -> None:
    servings = [c for _, _, c in containers(docs) if alignloop_argv(c)[0] == "serve"]
    assert len(servings) == 1
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert servings[0][kind]["httpGet"]["path"] == "/healthz", kind


def test_services_reach_named_ports_of_their_pods(docs: tuple[Doc, ...]) -> None:
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        pods = [
            (doc, container)
            for doc, _, container in containers(docs)
            if selector.items() <= _template(doc)["metadata"]["labels"].items()
        ]
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            names = {p.get("name") for _, c in pods for p in c.get("ports", [])}
            assert port["targetPort"] in names, service["metadata"]["name"]


def test_serving_scales_on_requests_in_flight(docs: tuple[Doc, ...]) -> None:
    from serving.metrics import IN_FLIGHT

    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert len(hpas) == 1
    hpa = hpas[0]["spec"]
    target = [
        d
        for d in docs
        if d["kind"] == hpa["scaleTargetRef"]["kind"]
        and d["metadata"]["name"] == hpa["scaleTargetRef"]["name"]
    ]
    assert len(target) == 1
    assert alignloop_argv(target[0]["spec"]["template"]["spec"]["containers"][0])[0] == "serve"
    assert "replicas" not in target[0]["spec"], "the HPA owns the replica count"
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == IN_FLIGHT._name
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdbs, "serving has no PodDisruptionBudget"
    labels = target[0]["spec"]["template"]["metadata"]["labels"]
    assert pdbs[0]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdbs[0]["spec"]["minAvailable"] < hpa["minReplicas"]


# --- one controller, one trainer, ingestors in one group -----------------------------------


def _workloads_running(docs: tuple[Doc, ...], *argv: str) -> list[Doc]:
    return [
        doc
        for doc, _, container in containers(docs)
        if alignloop_argv(container)[: len(argv)] == list(argv)
    ]


def test_one_canary_controller_replaced_not_rolled(docs: tuple[Doc, ...]) -> None:
    controllers = _workloads_running(docs, "canary")
    assert len(controllers) == 1 and not _workloads_running(docs, "admin")
    (controller,) = controllers
    assert controller["kind"] == "Deployment"
    assert controller["spec"]["replicas"] == 1
    assert controller["spec"]["strategy"]["type"] == "Recreate"
    assert not _scaled(docs, controller)


def test_one_trainer_at_a_time(docs: tuple[Doc, ...]) -> None:
    loops = _workloads_running(docs, "train", "loop")
    assert len(loops) == 1
    (loop,) = loops
    assert loop["kind"] == "Deployment"
    assert loop["spec"]["replicas"] == 1
    assert loop["spec"]["strategy"]["type"] == "Recreate"
    assert not _scaled(docs, loop)
    for other in _workloads_running(docs, "train", "ppo"):
        assert other["kind"] == "CronJob" and other["spec"]["suspend"] is True, (
            "a round runner beside the training loop must be suspended"
        )
        assert other["spec"]["concurrencyPolicy"] == "Forbid"


def _scaled(docs: tuple[Doc, ...], workload: Doc) -> bool:
    return any(
        d["kind"] == "HorizontalPodAutoscaler"
        and d["spec"]["scaleTargetRef"]["name"] == workload["metadata"]["name"]
        for d in docs
    )


def test_ingestor_replicas_share_one_consumer_group(docs: tuple[Doc, ...]) -> None:
    config = config_of(docs)
    (ingestor,) = _workloads_running(docs, "ingest")
    assert ingestor["spec"]["replicas"] >= 2
    for container in ingestor["spec"]["template"]["spec"]["containers"]:
        assert "--group-id" not in _flags(alignloop_argv(container))
        assert PREFIX + "INGEST_GROUP_ID" not in {e["name"] for e in container.get("env", [])}
    assert config[PREFIX + "INGEST_GROUP_ID"]


# --- security, storage ---------------------------------------------------------------------


def test_containers_run_as_the_image_user_not_root(docs: tuple[Doc, ...]) -> None:
    checked = 0
    for doc, spec, container in containers(docs):
        where = f"{doc['kind']}/{doc['metadata']['name']} {container['name']}"
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, where
        assert pod.get("runAsUser") == UID and pod.get("runAsGroup") == UID, where
        assert spec.get("automountServiceAccountToken") is False, where
        own = container.get("securityContext", {})
        assert own.get("runAsUser", UID) == UID and own.get("runAsNonRoot", True), where
        assert own.get("allowPrivilegeEscalation") is False, where
        assert not own.get("privileged"), where
        assert "ALL" in own.get("capabilities", {}).get("drop", []), where
        assert own.get("readOnlyRootFilesystem") is True, where
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
        checked += 1
    assert checked >= 4


def test_the_adapter_store_is_shared_at_the_state_dir(docs: tuple[Doc, ...]) -> None:
    config = config_of(docs)
    state_dir = config[PREFIX + "STATE_DIR"]
    assert config[PREFIX + "BASE_MODEL"].startswith(state_dir + "/"), "the model is on the store"
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == PVC
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    mounted = {}
    for _, spec, container in containers(docs):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec.get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        for mount in container.get("volumeMounts", []):
            if claims.get(mount["name"]) == PVC:
                assert mount["mountPath"] == state_dir, container["name"]
                mounted[alignloop_argv(container)[0], bool(mount.get("readOnly"))] = True
    assert ("serve", True) in mounted and ("serve", False) not in mounted
    assert ("train", False) in mounted and ("train", True) not in mounted


# --- the overlays --------------------------------------------------------------------------


def test_cpu_overlay_asks_for_no_gpu_and_runs_the_cpu_image() -> None:
    docs = rendered("cpu")
    images = {c["image"] for _, _, c in containers(docs)}
    assert len(images) == 1 and "alignloop-cpu:" in images.pop()
    for _, _, container in containers(docs):
        for amounts in container.get("resources", {}).values():
            assert GPU not in amounts, container["name"]


def test_gpu_overlay_puts_serving_and_the_trainer_on_gpus() -> None:
    docs = rendered("gpu")
    images = {c["image"] for _, _, c in containers(docs)}
    assert len(images) == 1 and "alignloop-cuda:" in images.pop()
    kinds = set()
    for _, spec, container in containers(docs):
        argv = alignloop_argv(container)
        if argv[0] not in ("serve", "train"):
            continue
        kinds.add(tuple(argv[:2]) if argv[0] == "train" else ("serve",))
        limits = container["resources"]["limits"]
        assert int(limits[GPU]) >= 1, container["name"]
        assert int(container["resources"]["requests"].get(GPU, limits[GPU])) == int(limits[GPU])
        assert spec.get("nodeSelector") and spec.get("tolerations"), container["name"]
        if container.get("command") == ["torchrun"]:
            nproc = _flags(container["args"])["--nproc-per-node"]
            assert int(nproc) == int(limits[GPU]), "one torchrun process per GPU"
            threads = int(_flags(argv)["--num-threads"])
            assert threads * int(nproc) <= int(limits["cpu"]), "threads per rank x ranks"
    assert kinds == {("serve",), ("train", "loop"), ("train", "ppo")}


def test_serving_reads_the_api_keys_from_their_secret(docs: tuple[Doc, ...]) -> None:
    """Serving refuses to start without a key file: the file named by
    ALIGNLOOP_API_KEYS_FILE is the alignloop-api-keys Secret, mounted read-only."""
    for _, spec, container in containers(docs):
        if container["name"] != "serving":
            continue
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        path = Path(env["ALIGNLOOP_API_KEYS_FILE"])
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
        assert mount.get("readOnly") is True
        volumes = {v["name"]: v for v in spec["volumes"]}
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "alignloop-api-keys"
        assert [i["path"] for i in secret["items"]] == [path.name]
        break
    else:
        raise AssertionError("no serving container")
