"""Static checks of infra/ and deploy/: every file parses, the Kubernetes manifests validate
against schemas, and the manifests agree with the code and with each other (console script
and subcommands, environment variable names, image names, ports, Prefect entrypoints).

Offline and fast: no docker, no network, no cluster. Kubernetes' own schemas come from the
`kubernetes-validate` package (dev dependency), which bundles them. KubeRay's CRDs ship in
no package we can install, so RayCluster/RayJob are checked in two layers: the KubeRay
fields we rely on against the small hand-written schema below (unknown fields rejected),
and every pod template inside them against Kubernetes' strict PodTemplateSpec schema.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DEPLOY = ROOT / "deploy"
COMPOSE = INFRA / "compose.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
ENV_EXAMPLE = INFRA / ".env.example"
PREFECT_YAML = DEPLOY / "prefect.yaml"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
RAYJOB = DEPLOY / "kuberay" / "rayjob.yaml"
LAUNCHER = DEPLOY / "ray" / "cluster-aws-gpu.yaml"
SERVING = DEPLOY / "serving" / "champion.yaml"
K8S_VERSION = "1.33.0"

# The command line as documented (README, issue 7); manifests may use only these.
DOCUMENTED_COMMANDS = {
    "run",
    "train",
    "tune",
    "ingest",
    "datasets",
    "generate",
    "rollback",
    "serve",
    "bench",
    "schedule",
}

# Variables the project's code reads.
DOCUMENTED_ENV = {
    "GANFLOW_HOME",
    "GANFLOW_STORAGE_ROOT",
    "GANFLOW_S3_ENDPOINT_URL",
    "GANFLOW_MLFLOW_ARTIFACT_ROOT",
    "GANFLOW_RAY_STORAGE",
    "GANFLOW_RAY_MAX_GPUS",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "RAY_ADDRESS",
    "PREFECT_API_URL",
}
# Variables of the tools themselves. PREFECT_* and MLFLOW_* are checked against the installed
# packages below, so a misspelt setting fails here rather than being silently ignored.
TOOL_ENV = {
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_USAGE_STATS_ENABLED",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "AWS_ENDPOINT_URL_S3",
}
# Read by infra/mlflow/entrypoint.sh (rendered into the basic-auth INI file).
ENTRYPOINT_ENV = {"BASIC_AUTH_DATABASE_URI", "BASIC_AUTH_DEFAULT_PERMISSION"}

IMAGE_RE = re.compile(r"^ghcr\.io/ganflow/ganflow:(?P<version>[0-9][^-]*)-(?P<variant>cpu|cuda)$")
ENV_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


# --- loading ---------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    files = sorted(
        p
        for base in (INFRA, DEPLOY)
        for p in base.rglob("*")
        if p.suffix in {".yaml", ".yml"} and p.is_file()
    )
    assert files, "no YAML under infra/ or deploy/"
    return files


@cache
def _docs(path: Path) -> tuple:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d is not None)


def _doc(path: Path) -> dict:
    (doc,) = _docs(path)
    return doc


def _k8s_docs() -> list[tuple[Path, dict]]:
    return [
        (p, d)
        for p in _yaml_files()
        if p.is_relative_to(DEPLOY / "kuberay")
        for d in _docs(p)
        if isinstance(d, dict) and "apiVersion" in d
    ]


def _walk(node, path=()):
    """Yield (path, value) for every leaf of a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, i))
    else:
        yield path, node


def _compose() -> dict:
    return _doc(COMPOSE)


def _service_command(service: dict) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def _pod_templates(kind_doc: dict) -> list[tuple[str, dict]]:
    spec = kind_doc["spec"]
    cluster = spec["rayClusterSpec"] if kind_doc["kind"] == "RayJob" else spec
    out = [("head", cluster["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    if kind_doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        out.append(("submitter", spec["submitterPodTemplate"]))
    return out


def _containers(kind_doc: dict) -> list[tuple[str, dict]]:
    return [(g, c) for g, t in _pod_templates(kind_doc) for c in t["spec"]["containers"]]


def _configmap_env() -> dict[str, str]:
    for _, d in _k8s_docs():
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "ganflow-env":
            return d["data"]
    raise AssertionError("ConfigMap ganflow-env not found under deploy/kuberay")


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


# --- parsing ---------------------------------------------------------------------------


def test_every_yaml_file_parses():
    for path in _yaml_files():
        docs = _docs(path)
        assert docs, f"{path.relative_to(ROOT)} is empty"
        assert all(isinstance(d, dict) for d in docs), path


def test_expected_files_exist():
    for path in (COMPOSE, DOCKERFILE, ENV_EXAMPLE, PREFECT_YAML, RAYCLUSTER, RAYJOB, LAUNCHER):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    assert (INFRA / "README.md").is_file()


# --- Kubernetes schemas -----------------------------------------------------------------


@cache
def _k8s_schema_dir() -> Path:
    import kubernetes_validate

    d = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    return d / f"v{K8S_VERSION}-local-strict"


@cache
def _pod_template_validator() -> jsonschema.Validator:
    from referencing import Registry, Resource

    schema_dir = _k8s_schema_dir()
    definitions = json.loads((schema_dir / "_definitions.json").read_text())
    schema = json.loads((schema_dir / "podtemplatespec-v1.json").read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def test_core_kubernetes_objects_validate_against_bundled_schemas():
    import kubernetes_validate

    core = [(p, d) for p, d in _k8s_docs() if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in core} >= {"Secret", "ConfigMap", "Namespace"}
    for path, doc in core:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{path.name} {doc['kind']}: {exc.message}") from exc


def test_kuberay_pod_templates_validate_as_kubernetes_pod_templates():
    validator = _pod_template_validator()
    for path in (RAYCLUSTER, RAYJOB):
        for group, template in _pod_templates(_doc(path)):
            errors = sorted(validator.iter_errors(template), key=lambda e: e.json_path)
            assert not errors, f"{path.name} {group}: " + "; ".join(
                f"{e.json_path}: {e.message}" for e in errors[:5]
            )


def test_pod_template_schema_rejects_a_misspelt_field():
    # The strict schema must not accept unknown fields, or the test above proves nothing.
    bad = {"spec": {"containers": [{"name": "x", "image": "i", "resorces": {}}]}}
    assert list(_pod_template_validator().iter_errors(bad))


# Hand-written: KubeRay ray.io/v1 fields this project relies on (names as in KubeRay's CRDs).
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_TEMPLATE = {"type": "object", "required": ["spec"]}
_AUTOSCALER = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "env": {"type": "array"},
        "resources": {"type": "object"},
        "image": {"type": "string"},
    },
}
_HEAD = {
    "type": "object",
    "additionalProperties": False,
    "required": ["rayStartParams", "template"],
    "properties": {
        "rayStartParams": _STR_MAP,
        "template": _TEMPLATE,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "enableIngress": {"type": "boolean"},
    },
}
_WORKER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"],
    "properties": {
        "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 1},
        "rayStartParams": _STR_MAP,
        "template": _TEMPLATE,
        "idleTimeoutSeconds": {"type": "integer"},
    },
}
_CLUSTER_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": _AUTOSCALER,
        "headGroupSpec": _HEAD,
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": _WORKER},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
}
KUBERAY_SCHEMAS = {
    "RayCluster": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayCluster"},
            "metadata": _METADATA,
            "spec": _CLUSTER_SPEC,
        },
    },
    "RayJob": {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": "RayJob"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["entrypoint", "rayClusterSpec"],
                "properties": {
                    "entrypoint": {"type": "string", "minLength": 1},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "submissionMode": {
                        "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
                    },
                    "submitterPodTemplate": _TEMPLATE,
                    "runtimeEnvYAML": {"type": "string"},
                    "rayClusterSpec": _CLUSTER_SPEC,
                },
            },
        },
    },
}


def test_kuberay_resources_match_the_fields_we_rely_on():
    kinds = []
    for path, doc in _k8s_docs():
        if doc["apiVersion"].startswith("ray.io/"):
            kinds.append(doc["kind"])
            errors = list(
                jsonschema.Draft202012Validator(KUBERAY_SCHEMAS[doc["kind"]]).iter_errors(doc)
            )
            assert not errors, f"{path.name}: " + "; ".join(
                f"{e.json_path}: {e.message}" for e in errors[:5]
            )
    assert sorted(kinds) == ["RayCluster", "RayJob"]


def test_kuberay_schema_rejects_a_misspelt_field():
    doc = _doc(RAYCLUSTER)
    bad = {**doc, "spec": {**doc["spec"], "enableIntreeAutoscaling": True}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, KUBERAY_SCHEMAS["RayCluster"])


# --- Ray: head does no training, GPU workers autoscale, token auth is on ---------------


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_head_takes_no_training_and_gpu_workers_autoscale(path):
    doc = _doc(path)
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == "2.60.0"
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if any(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
        assert g["maxReplicas"] > g["minReplicas"], "GPU group cannot scale"
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), g["groupName"]
    # Jobs may ask for as many GPUs as the groups can grow to, none of which exist at first.
    ceiling = sum(
        g["maxReplicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in gpu_groups
        for c in g["template"]["spec"]["containers"]
    )
    for group, c in _containers(doc):
        env = _env_sources(c)
        from_cm = any(
            s.get("configMapRef", {}).get("name") == "ganflow-env" for s in c.get("envFrom", [])
        )
        if "GANFLOW_RAY_MAX_GPUS" in env:
            value = env["GANFLOW_RAY_MAX_GPUS"]["value"]
        elif from_cm:
            value = _configmap_env()["GANFLOW_RAY_MAX_GPUS"]
        else:
            continue  # not a Ray node (the submitter only calls the Jobs API)
        assert float(value) == ceiling, f"{path.name} {group}: GANFLOW_RAY_MAX_GPUS={value}"


def _env_sources(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_ray_token_auth_is_wired_from_a_secret_everywhere(path):
    doc = _doc(path)
    cm = _configmap_env()
    secrets = {
        d["metadata"]["name"]: set(d["stringData"]) for _, d in _k8s_docs() if d["kind"] == "Secret"
    }
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    subjects = [(g, c) for g, c in _containers(doc)]
    subjects.append(("autoscaler", cluster["autoscalerOptions"]))
    for group, c in subjects:
        env = _env_sources(c)
        from_cm = any(
            s.get("configMapRef", {}).get("name") == "ganflow-env" for s in c.get("envFrom", [])
        )
        mode = env["RAY_AUTH_MODE"]["value"] if "RAY_AUTH_MODE" in env else None
        assert mode == "token" or (mode is None and from_cm and cm["RAY_AUTH_MODE"] == "token"), (
            f"{path.name} {group}: RAY_AUTH_MODE is not token"
        )
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]], f"{path.name} {group}: {ref}"
    text = "\n".join(p.read_text() for p in _yaml_files())
    assert not re.search(r"RAY_AUTH_MODE\W+disabled", text), "token auth switched off somewhere"


def test_compose_ray_nodes_and_worker_use_token_auth():
    services = _compose()["services"]
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name
    head = _service_command(services["ray-head"])
    assert "ray start --head --block" in head and "--num-cpus=0" in head


def test_cluster_launcher_gpu_cluster():
    cfg = _doc(LAUNCHER)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"])
    workers = [n for k, n in cfg["available_node_types"].items() if k != cfg["head_node_type"]]
    assert any(
        n["node_config"]["InstanceType"].startswith(("g", "p")) and n["max_workers"] > 0
        for n in workers
    ), "no GPU instance type among the worker node types"
    opts = " ".join(cfg["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in opts and "RAY_AUTH_TOKEN_PATH=" in opts
    # g5.2xlarge has one GPU: the autoscaling ceiling is max_workers of the GPU type.
    gpu_nodes = [n for n in workers if n["node_config"]["InstanceType"] == "g5.2xlarge"]
    assert f"--env GANFLOW_RAY_MAX_GPUS={sum(n['max_workers'] for n in gpu_nodes)}" in opts


# --- consistency with the code ----------------------------------------------------------


def test_console_script_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["ganflow"] == "flows.cli:main"


@cache
def _subparsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from flows.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, dict(sub.choices)


def _ganflow_invocations() -> list[tuple[str, list[str]]]:
    """Every `ganflow ...` command line in the YAML files and in the README's code blocks."""
    lines: list[tuple[str, str]] = []
    for path in _yaml_files():
        for d in _docs(path):
            for _, v in _walk(d):
                if isinstance(v, str):
                    lines += [(path.name, line) for line in v.splitlines()]
    in_code = False
    for line in (INFRA / "README.md").read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif in_code:
            lines.append(("README.md", line))
    out = []
    for where, line in lines:
        for segment in re.split(r"&&|\|\||;|\||&", line):
            try:
                words = shlex.split(segment.split(" #")[0])
            except ValueError:
                continue
            if words[:1] == ["$"]:
                words = words[1:]
            if words[:1] == ["ganflow"] and len(words) > 1:
                out.append((where, words[1:]))
    return out


def test_manifests_use_only_documented_existing_commands():
    invocations = _ganflow_invocations()
    assert any(w == "rayjob.yaml" for w, _ in invocations), "RayJob runs no ganflow command"
    parser, existing = _subparsers()
    assert {"run", "bench"} <= set(existing)
    for where, argv in invocations:
        assert argv[0] in DOCUMENTED_COMMANDS, f"{where}: ganflow {argv[0]} is not documented"
        if argv[0] in existing:
            try:
                parser.parse_args(argv)
            except SystemExit as exc:  # argparse's way to say the arguments are wrong
                raise AssertionError(f"{where}: `ganflow {' '.join(argv)}` does not parse") from exc


@cache
def _prefect_setting_names() -> frozenset[str]:
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names

    return frozenset(_get_valid_setting_names(Settings))


@cache
def _mlflow_env_names() -> frozenset[str]:
    spec = importlib.util.find_spec("mlflow")  # not imported: reading the source is enough
    source = (Path(spec.origin).parent / "environment_variables.py").read_text()
    return frozenset(re.findall(r"Variable\(\s*\"(MLFLOW_[A-Z0-9_]+)\"", source))


def _manifest_env_names() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}

    def add(name: str, where: str) -> None:
        names.setdefault(name, set()).add(where)

    for name, svc in _compose()["services"].items():
        env = svc.get("environment", {})
        for key in env if isinstance(env, dict) else [e.split("=")[0] for e in env]:
            add(key, f"compose:{name}")
    for path, doc in _k8s_docs():
        if doc["kind"] == "ConfigMap":
            for key in doc["data"]:
                add(key, path.name)
        for keys, value in _walk(doc):
            if len(keys) >= 2 and keys[-1] == "name" and "env" in keys[-3:-1]:
                add(value, path.name)
    for opt in _doc(LAUNCHER)["docker"]["run_options"]:
        m = re.match(r"--env\s+([A-Z0-9_]+)=", opt)
        if m:
            add(m.group(1), LAUNCHER.name)
    return names


def test_environment_variable_names_are_known():
    names = _manifest_env_names()
    assert {"GANFLOW_STORAGE_ROOT", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN"} <= set(names)
    allowed = DOCUMENTED_ENV | TOOL_ENV | ENTRYPOINT_ENV
    for name, where in sorted(names.items()):
        assert ENV_NAME_RE.match(name), f"{name!r} in {where}"
        if name.startswith("PREFECT_"):
            assert name in _prefect_setting_names(), f"{name} ({where}) is no Prefect setting"
        elif name.startswith("MLFLOW_") and name not in DOCUMENTED_ENV:
            assert name in _mlflow_env_names(), f"{name} ({where}) is no MLflow variable"
        else:
            assert name in allowed, f"{name} ({where}) is neither documented nor a tool's"


def test_entrypoint_variables_are_read_by_the_entrypoint():
    script = (INFRA / "mlflow" / "entrypoint.sh").read_text()
    for name in ENTRYPOINT_ENV:
        assert "${" + name in script


def test_every_compose_variable_is_in_env_example():
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE.read_text()))
    example = _env_file(ENV_EXAMPLE)
    missing = used - set(example)
    assert not missing, f"infra/.env.example lacks {sorted(missing)}"


def test_no_real_secrets_are_committed():
    for key, value in _env_file(ENV_EXAMPLE).items():
        if re.search(r"PASSWORD|SECRET|TOKEN|AUTH_STRING", key):
            assert "change-me" in value, f"infra/.env.example {key} looks like a real secret"
    for _, doc in _k8s_docs():
        if doc["kind"] == "Secret":
            assert set(doc["stringData"].values()) == {"change-me"}, doc["metadata"]["name"]
    # Compose takes every secret from the environment, failing when it is unset.
    for name, svc in _compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN|AUTH_STRING", key):
                assert str(value).startswith("${"), f"compose:{name} {key} is a literal"


# --- images and ports -------------------------------------------------------------------


def _image_refs() -> list[tuple[str, str]]:
    refs = [
        (f"compose:{n}", s["image"])
        for n, s in _compose()["services"].items()
        if "infra/docker/Dockerfile" in str(s.get("build", {}).get("dockerfile", ""))
    ]
    refs.append(("compose default", re.search(r"GANFLOW_IMAGE:-([^}]+)}", COMPOSE.read_text())[1]))
    refs.append(("env.example", _env_file(ENV_EXAMPLE)["GANFLOW_IMAGE"]))
    for path in (RAYCLUSTER, RAYJOB):
        refs += [(f"{path.name}:{g}", c["image"]) for g, c in _containers(_doc(path))]
    refs.append((LAUNCHER.name, _doc(LAUNCHER)["docker"]["image"]))
    refs += [("Dockerfile", m) for m in re.findall(r"-t (\S+) \.", DOCKERFILE.read_text())]
    return refs


def test_project_image_name_is_consistent():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    refs = _image_refs()
    assert len(refs) >= 8
    for where, ref in refs:
        ref = ref.removeprefix("${GANFLOW_IMAGE:-").removesuffix("}")
        m = IMAGE_RE.match(ref)
        assert m, f"{where}: image {ref!r} is not ghcr.io/ganflow/ganflow:<version>-<variant>"
        assert m["version"] == version, f"{where}: {ref} is not version {version}"
        if where.startswith(("raycluster", "rayjob", "cluster-aws")):
            assert m["variant"] == "cuda", f"{where}: GPU nodes need the cuda image"
    # compose builds it with the Dockerfile's own build arguments
    args = set(re.findall(r"^ARG (\w+)", DOCKERFILE.read_text(), re.M))
    for name, svc in _compose()["services"].items():
        build = svc.get("build")
        if isinstance(build, dict) and "dockerfile" in build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
            assert set(build.get("args", {})) <= args, name


def test_ports_are_consistent():
    services = _compose()["services"]
    published = {
        n: {int(p.split(":")[-1]) for p in s.get("ports", [])} for n, s in services.items()
    }
    assert 5000 in published["mlflow"] and "--port=5000" in _service_command(services["mlflow"])
    assert 4200 in published["prefect-server"]
    assert "--port 4200" in _service_command(services["prefect-server"])
    assert {6379, 8265} <= published["ray-head"]
    head = _service_command(services["ray-head"])
    assert "--port=6379" in head and "--dashboard-port=8265" in head
    assert 8333 in published["s3"] and "-s3.port=8333" in _service_command(services["s3"])

    cm = _configmap_env()
    envs = [services["ray-head"]["environment"], cm]
    for env in envs:
        assert env["MLFLOW_TRACKING_URI"].endswith(":5000")
        assert env["PREFECT_API_URL"].endswith(":4200/api")
        assert env["GANFLOW_S3_ENDPOINT_URL"].endswith(":8333")
        assert env["AWS_ENDPOINT_URL"] == env["GANFLOW_S3_ENDPOINT_URL"]
    assert services["ray-head"]["environment"]["RAY_ADDRESS"].endswith(":6379")
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"].endswith(":8333")

    ports = {
        p["name"]: p["containerPort"]
        for _, c in _containers(_doc(RAYCLUSTER))
        for p in c.get("ports", [])
    }
    assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265
    driver = dict(_containers(_doc(RAYCLUSTER)))["prefect-driver"]
    assert _env_sources(driver)["RAY_ADDRESS"]["value"].endswith(":6379")
    launcher = _doc(LAUNCHER)
    assert any("--port=6379" in c for c in launcher["head_start_ray_commands"])
    assert any(":6379" in c for c in launcher["worker_start_ray_commands"])


def test_mlflow_server_flags():
    cmd = _service_command(_compose()["services"]["mlflow"])
    for flag in ("--backend-store-uri=postgresql+psycopg2://", "--serve-artifacts"):
        assert flag in cmd
    assert "--artifacts-destination=s3://" in cmd
    assert "--app-name=basic-auth" in cmd and "--allowed-hosts=" in cmd
    # the flags exist in the installed mlflow 3.17.2 (its CLI source, not imported: slow)
    pkg = Path(importlib.util.find_spec("mlflow").origin).parent
    source = (pkg / "cli" / "__init__.py").read_text() + (pkg / "utils" / "cli_args.py").read_text()
    for flag in re.findall(r"(--[a-z-]+)", cmd):
        assert re.search(f'"{flag}["/]', source), f"mlflow server has no {flag}"


def test_compose_prefect_uses_postgres():
    env = _compose()["services"]["prefect-server"]["environment"]
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    cmd = _service_command(_compose()["services"]["mlflow"])
    assert "@postgres:5432/mlflow" in cmd


# --- Prefect deployments ----------------------------------------------------------------


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in _doc(PREFECT_YAML)["deployments"]}


def test_prefect_yaml_is_a_valid_prefect_project():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule

    model = PrefectYamlModel.model_validate(_doc(PREFECT_YAML))
    by_entry = {d.entrypoint: d for d in model.deployments}
    retrain = by_entry["flows/orchestration/retraining.py:retraining_flow"]
    tune = by_entry["flows/orchestration/tune.py:tune_flow"]
    (schedule,) = retrain.schedules
    CronSchedule(cron=schedule.cron, timezone=schedule.timezone)  # raises on a bad cron
    assert schedule.cron.split()[4] != "*", "the retraining schedule is not weekly"
    assert not tune.schedules and not tune.schedule, "the search runs on demand only"
    assert tune.parameters == {
        "family": "cyclegan",
        "dataset": "builtin:digits-unpaired",
        "samples": 8,
    }


def test_prefect_work_pool_matches_the_workers():
    pools = {d["work_pool"]["name"] for d in _deployments().values()}
    assert pools == {"ganflow-process"}
    worker_cmds = [_service_command(_compose()["services"]["prefect-worker"])]
    driver = dict(_containers(_doc(RAYCLUSTER)))["prefect-driver"]
    worker_cmds.append(" ".join(driver["args"]))
    for cmd in worker_cmds:
        assert "prefect worker start --pool ganflow-process --type process" in cmd


@pytest.mark.parametrize(
    "entry",
    ["flows/orchestration/retraining.py:retraining_flow", "flows/orchestration/tune.py:tune_flow"],
)
def test_prefect_entrypoints_exist(entry):
    deployment = next(d for d in _deployments().values() if d["entrypoint"] == entry)
    rel, func = entry.split(":")
    path = ROOT / rel
    if not path.exists():
        pytest.skip(f"{rel} does not exist yet")
    tree = ast.parse(path.read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    if func not in defs:
        # Announced but not written yet: said loudly (pytest -ra), not failed, because the
        # flow belongs to another change. `prefect deploy` of this deployment fails until then.
        pytest.skip(f"{rel} has no {func} yet: deployment {deployment['name']!r} cannot deploy")
    fn = defs[func]
    decorators = [ast.unparse(d) for d in fn.decorator_list]
    assert any(d.split("(")[0].endswith("flow") for d in decorators), f"{func} is not a @flow"
    params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    assert set(deployment.get("parameters", {})) <= params, (
        f"{entry} takes {sorted(params)}, prefect.yaml passes {sorted(deployment['parameters'])}"
    )


# --- serving the champion (issue 12) ------------------------------------------------------


def test_serving_manifest_validates_and_agrees_with_the_code():
    import kubernetes_validate

    docs = _docs(SERVING)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{SERVING.name} {doc['kind']}: {exc.message}") from exc
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    m = IMAGE_RE.match(container["image"])
    assert m and m["version"] == version, container["image"]
    argv = container["args"]
    assert argv[:2] == ["ganflow", "serve"]
    parser, _ = _subparsers()
    args = parser.parse_args(argv[1:])
    assert args.model.endswith("@champion")  # follows promotion: the alias, not a version
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert args.port == port and service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["type"] == "ClusterIP"  # the scoring server has no authentication
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {c["configMapRef"]["name"] for c in container["envFrom"]} == {"ganflow-env"}
    secrets = {
        d["metadata"]["name"]: set(d["stringData"]) for _, d in _k8s_docs() if d["kind"] == "Secret"
    }
    allowed = DOCUMENTED_ENV | TOOL_ENV
    for e in container["env"]:
        assert e["name"] in allowed, e["name"]
        ref = e["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets.get(ref["name"], set()), f"{ref} not in deploy/kuberay"
    assert deployment["metadata"]["namespace"] == _configmap_namespace()


def _configmap_namespace() -> str:
    for _, d in _k8s_docs():
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "ganflow-env":
            return d["metadata"]["namespace"]
    raise AssertionError("ConfigMap ganflow-env not found under deploy/kuberay")
