"""The deployment files in infra/, checked without a cloud account, a Docker engine or Kubernetes.

What can be checked here is checked with Ray's own code: its cluster-config schema and
validation (what `ray up` runs before it calls a cloud), its autoscaler's choice of node type for
a resource demand, its KubeRay translation of a RayCluster, and its NVIDIA accelerator naming.
Those are private Ray APIs; if a Ray upgrade moves them, these tests say so loudly.

Not checked here: building the image, applying the manifests, launching a cluster.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from lorajobs.orchestrator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
LAUNCHER = {"aws": INFRA / "ray" / "aws.yaml", "gcp": INFRA / "ray" / "gcp.yaml"}
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
CONTROLLER = INFRA / "kuberay" / "controller.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
UNIT = INFRA / "systemd" / "lorajobs-controller.service"
SERVER_UNIT = INFRA / "systemd" / "lorajobs-server.service"
SERVER = INFRA / "kuberay" / "server.yaml"
ENV_EXAMPLE = INFRA / "systemd" / "controller.env.example"
INFRA_README = INFRA / "README.md"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
ACCEL = "accelerator_type:"
# The files this suite owns; every one is scanned for secrets.
INFRA_FILES = [
    *LAUNCHER.values(),
    RAYCLUSTER,
    CONTROLLER,
    DOCKERFILE,
    DOCKERIGNORE,
    UNIT,
    SERVER_UNIT,
    SERVER,
    ENV_EXAMPLE,
    INFRA_README,
    CLUSTER_DOC,
]
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
# Where the image keeps its node-local cache; the controller forwards its own value to workers.
CACHE_DIR = "/var/cache/lorajobs"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def gpu_table() -> dict[str, dict]:
    """The `gpu_type` table of infra/README.md: name -> GPU device name, node types per config."""
    section = INFRA_README.read_text().split("## GPU types", 1)[1].split("\n## ", 1)[0]
    table: dict[str, dict] = {}
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 5, row
        name = re.fullmatch(r"`([^`]+)`", cells[0])
        assert name, row
        device = re.search(r"\(`([^`]+)`\)", cells[1])
        table[name.group(1)] = {
            "device": device.group(1) if device else None,
            "aws": set(re.findall(r"`(gpu-[^`]+)`", cells[2])),
            "gcp": set(re.findall(r"`(gpu-[^`]+)`", cells[3])),
            "kuberay": set(re.findall(r"`(gpu-[^`]+)`", cells[4])),
        }
    return table


def kuberay_node_types() -> dict[str, dict]:
    """The RayCluster as Ray's autoscaler sees it (its own translation, which validates too)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    return _derive_autoscaling_config_from_ray_cr(load(RAYCLUSTER))["available_node_types"]


def node_types(config: str) -> tuple[dict[str, dict], str]:
    """(node types, head node type) of a launcher config or of the RayCluster."""
    if config == "kuberay":
        return kuberay_node_types(), "headgroup"
    raw = load(LAUNCHER[config])
    return raw["available_node_types"], raw["head_node_type"]


def accelerators(resources: dict) -> set[str]:
    return {k[len(ACCEL) :] for k in resources if k.startswith(ACCEL)}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.strip().partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    return out


def docker_args() -> dict[str, str]:
    args = {}
    for op, rest in dockerfile():
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
    return args


def dockerignore_includes(rel: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    included = True
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        rx = re.escape(pattern).replace(r"\*\*", "\0").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]").replace("\0", ".*")
        if any(re.fullmatch(rx, p) for p in prefixes):
            included = negate
    return included


def image_refs() -> set[str]:
    refs = {load(p)["docker"]["image"] for p in LAUNCHER.values()}
    for path in (RAYCLUSTER, CONTROLLER):
        refs |= set(re.findall(r"^\s*image:\s*(\S+)\s*$", path.read_text(), re.M))
    return refs


# -- the Ray cluster launcher configs --------------------------------------------------------


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_config_passes_rays_schema_and_validation(cloud):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(LAUNCHER[cloud])
    # The schema file shipped with the installed Ray, as is.
    jsonschema.validate(raw, json.loads(RAY_SCHEMA.read_text()))
    # What `ray up` does before it talks to the cloud: fill in the provider's defaults, merge
    # setup commands, check docker settings and worker counts, validate again.
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["provider"]["type"] == cloud


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_config_uses_none_of_rays_default_commands(cloud):
    from ray.autoscaler._private.util import prepare_config

    raw = load(LAUNCHER[cloud])
    keys = (
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    assert all(k in raw for k in keys), "a missing list would fall back to Ray's default one"
    prepared = prepare_config(copy.deepcopy(raw))
    commands = " ".join(c for k in keys for c in prepared[k])
    # Ray's defaults pip-install a nightly Ray wheel, which would not match the image.
    assert "ray-wheels" not in commands and "pip install" not in commands
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in " ".join(
        raw["head_start_ray_commands"]
    )
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(raw["worker_start_ray_commands"])


def _spot(cloud: str, node_config: dict) -> bool:
    if cloud == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    # An object, as the Compute API wants it (a YAML list here is silently wrong).
    assert isinstance(scheduling, dict), "GCP `scheduling` must be a mapping"
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_head_on_demand_workers_spot_from_zero(cloud):
    raw = load(LAUNCHER[cloud])
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head runs no jobs"
    assert not head["resources"].get("GPU")
    assert not _spot(cloud, head["node_config"]), "the head must be on demand"
    assert raw["provider"].get("cache_stopped_nodes") is False, "spot nodes cannot be stopped"
    assert raw["idle_timeout_minutes"] > 0
    workers = {n: t for n, t in types.items() if n != raw["head_node_type"]}
    assert "cpu" in workers, "gpus: 0 jobs need a CPU worker type (the head takes none)"
    gpu_types = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) >= 3
    for name, t in workers.items():
        assert t.get("min_workers") == 0, f"{name} must scale from zero"
        assert 1 <= t["max_workers"] <= raw["max_workers"], name
        assert _spot(cloud, t["node_config"]), f"{name} must be spot"
        assert t["resources"].get("CPU", 0) >= 1, name
    for name, t in gpu_types.items():
        assert accelerators(t["resources"]), f"{name} declares no {ACCEL}*"
        assert "--gpus all" in t["docker"]["worker_run_options"], name
        if cloud == "gcp":
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name
        if cloud == "aws":
            assert t["node_config"]["IamInstanceProfile"] == {"Name": "lorajobs-worker"}, name
    for name, t in workers.items():
        if cloud == "gcp":
            # Ray cannot look machine types up on GCP: jobs with memory_gb need it declared.
            assert isinstance(t["resources"].get("memory"), int), name


# -- accelerator names: one table, every config ----------------------------------------------


@pytest.mark.parametrize("config", ["aws", "gcp", "kuberay"])
def test_accelerator_names_are_those_of_the_documented_table(config):
    table = gpu_table()
    assert {"A10G", "L4", "A100", "A100-80G", "H100"} <= set(table)
    types, head = node_types(config)
    declared: dict[str, set[str]] = {}
    for name, t in types.items():
        for accel in accelerators(t["resources"]):
            declared.setdefault(accel, set()).add(name)
        if accelerators(t["resources"]):
            assert t["resources"].get("GPU", 0) >= 1, f"{name}: an accelerator type without GPUs"
    unknown = set(declared) - set(table)
    assert not unknown, f"{config}: {sorted(unknown)} are not in the table of infra/README.md"
    for accel, row in table.items():
        assert declared.get(accel, set()) == row[config], (
            f"{config}: {ACCEL}{accel} is declared by {sorted(declared.get(accel, []))}, "
            f"the table says {sorted(row[config])}"
        )


def test_table_gpus_carry_the_name_ray_detects():
    from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

    table = gpu_table()
    configs = {c: node_types(c)[0] for c in ("aws", "gcp", "kuberay")}
    for _accel, row in table.items():
        if row["device"] is None:
            continue
        # Ray labels a GPU node with this name by itself; declaring it lets the autoscaler pick
        # the node type before such a node exists.
        detected = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(row["device"])
        assert detected in table, f"{row['device']} is detected as {detected}, not in the table"
        for config, types in configs.items():
            for name in row[config]:
                assert detected in accelerators(types[name]["resources"]), (config, name)


def job_demand(gpus: float, gpu_type: str | None, cpus: int, memory_gb: float | None = None):
    """A job's Ray resource request, as the controller makes it for its task and for the
    autoscaler: CPUs, GPUs (maybe a fraction), memory, a sliver of `accelerator_type:<type>`."""
    try:
        from lorajobs.orchestrator.scheduler import Shape
    except ImportError:  # a tree without the scheduler module: the same request, spelled out
        need = {"CPU": float(cpus), "GPU": float(gpus), "memory": (memory_gb or 0) * 1024**3}
        if gpu_type:
            need[ACCEL + gpu_type] = 0.001
        return {k: v for k, v in need.items() if v > 0}
    return Shape(gpus, gpu_type, cpus, memory_gb).ray_resources()


@pytest.mark.parametrize("config", ["aws", "gcp", "kuberay"])
def test_autoscaler_starts_the_node_type_a_job_needs(config):
    """Ray's own bin-packing, given each config's node types, for lorajobs-shaped demands."""
    from ray.autoscaler._private.node_provider_availability_tracker import (
        NodeAvailabilitySummary,
    )
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_nodes_for,
    )

    scorer = functools.partial(
        _default_utilization_scorer,
        node_availability_summary=NodeAvailabilitySummary(node_availabilities={}),
    )
    types, head = node_types(config)

    def launch(bundle: dict) -> str:
        to_add, left = get_nodes_for(types, {head: 1}, head, 10, [bundle], scorer)
        assert not left and sum(to_add.values()) == 1, (config, bundle, dict(to_add))
        return next(iter(to_add))

    for accel, row in gpu_table().items():
        if not row[config]:
            continue
        for gpus in (1, 0.25):
            picked = launch(job_demand(gpus, accel, 4))
            assert picked in row[config], (config, accel, gpus, picked)
    assert types[launch(job_demand(1, None, 4))]["resources"]["GPU"] >= 1
    assert launch(job_demand(0, None, 4)) == "cpu", "a CPU-only job must not start a GPU node"
    if config != "aws":  # on AWS `ray up` fills each type's `memory` in from the EC2 API
        assert launch(job_demand(1, "L4", 2, memory_gb=16)) in gpu_table()["L4"][config]


# -- KubeRay ----------------------------------------------------------------------------------


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _assert_no_inline_secrets(container: dict) -> None:
    for env in container.get("env", []):
        name = env["name"]
        if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|DATABASE_URL", name):
            assert "valueFrom" in env and "value" not in env, f"{name} must come from a Secret"


def test_raycluster_structure():
    cr = load(RAYCLUSTER)
    assert cr["apiVersion"] == "ray.io/v1" and cr["kind"] == "RayCluster"
    spec = cr["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs no jobs"
    terms = head["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert {"key": "cloud.google.com/gke-spot", "operator": "DoesNotExist"} in [
        e for t in terms for e in t["matchExpressions"]
    ], "the head must stay off Spot nodes"
    assert 10001 in [p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]]
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)), "group names must be unique"
    assert "cpu" in names
    for g in groups:
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0, g["groupName"]
        assert g["maxReplicas"] >= 1, g["groupName"]
        pod = g["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, g["groupName"]
        assert pod["nodeSelector"].get("cloud.google.com/gke-spot") == "true", g["groupName"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["groupName"]
        (container,) = pod["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "lorajobs-s3"}}]
        _assert_no_inline_secrets(container)
        assert CACHE_DIR in [m["mountPath"] for m in container["volumeMounts"]]
        limits = container["resources"]["limits"]
        if g["groupName"] == "cpu":
            assert "nvidia.com/gpu" not in limits
            continue
        assert int(limits["nvidia.com/gpu"]) >= 1, g["groupName"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        assert "cloud.google.com/gke-accelerator" in pod["nodeSelector"], g["groupName"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ], g["groupName"]
        # The quoting KubeRay wants: a JSON object inside a quoted string.
        raw = g["rayStartParams"]["resources"]
        assert raw.startswith('"{') and raw.endswith('}"'), raw
        assert all(k.startswith(ACCEL) for k in json.loads(raw[1:-1].replace("\\", "")))
    # Names line up with the launcher configs (the table checks the accelerators).
    launcher = set(load(LAUNCHER["gcp"])["available_node_types"]) - {"head"}
    assert set(names) <= launcher | set(load(LAUNCHER["aws"])["available_node_types"])


def test_controller_deployment():
    cr = load(RAYCLUSTER)
    dep = load(CONTROLLER)
    assert dep["kind"] == "Deployment" and dep["apiVersion"] == "apps/v1"
    assert dep["metadata"]["namespace"] == cr["metadata"]["namespace"]
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (init,) = pod["initContainers"]
    assert init["command"] == ["lorajobs", "db", "upgrade"]
    (main,) = pod["containers"]
    assert main["command"] == ["lorajobs", "controller"]
    for c in _containers(pod):
        _assert_no_inline_secrets(c)
        env = {e["name"]: e for e in c["env"]}
        assert env["LORAJOBS_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "lorajobs-db"
    env = {e["name"]: e.get("value") for e in main["env"]}
    # KubeRay names the head Service <cluster>-head-svc; 10001 is Ray's client port.
    assert env["LORAJOBS_RAY_ADDRESS"] == f"ray://{cr['metadata']['name']}-head-svc:10001"
    assert env["LORAJOBS_BUCKET"].startswith("s3://")
    assert env["LORAJOBS_CACHE_DIR"] == CACHE_DIR
    assert main["envFrom"] == [{"secretRef": {"name": "lorajobs-s3"}}]


# -- the image ----------------------------------------------------------------------------------


def test_dockerfile_copies_only_files_that_exist_and_pass_its_dockerignore():
    copies = [rest for op, rest in dockerfile() if op in ("COPY", "ADD")]
    assert copies
    sources = []
    for rest in copies:
        words = rest.split()
        if any(w.startswith("--from=") for w in words):
            continue  # from another build stage, not from the context
        words = [w for w in words if not w.startswith("--")]
        sources += words[:-1]
    # Every folder the package maps into the `lorajobs` namespace must reach the image.
    package_dirs = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
            "package-dir"
        ].values()
    )
    assert {"pyproject.toml", "README.md"} | package_dirs <= set(sources)
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"the Dockerfile copies {src}, which does not exist"
        files = (
            [path]
            if path.is_file()
            else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        assert files, src
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert dockerignore_includes(rel), f"{rel} is copied but excluded by the dockerignore"
    for rel in (
        ".venv/bin/python",
        "tests/unit/test_specs.py",
        ".git/HEAD",
        "infra/local/postgres.sh",
        "worker/__pycache__/x.pyc",
        "secrets.env",
    ):
        assert not dockerignore_includes(rel), f"{rel} would be sent to the build"


def test_dockerfile_image_shape():
    steps = dockerfile()
    args = docker_args()
    froms = [rest for op, rest in steps if op == "FROM"]
    final = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], froms[-1].split()[0])
    assert final.startswith("nvidia/cuda:") and "-runtime-" in final, final
    assert args["PYTHON_VERSION"] == "3.11"
    users = [rest for op, rest in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    env = " ".join(rest for op, rest in steps if op == "ENV")
    assert "HF_HUB_DISABLE_TELEMETRY=1" in env
    assert f"LORAJOBS_CACHE_DIR={CACHE_DIR}" in env
    assert not [op for op, _ in steps if op == "ENTRYPOINT"], (
        "the Ray launcher runs `bash` in the container and KubeRay sets its own command"
    )
    runs = " ".join(rest for op, rest in steps if op == "RUN")
    assert "-r /src/pyproject.toml" in runs and "--no-deps /src" in runs, "installs this repo"
    assert '"ray[default]==${RAY_VERSION}"' in runs
    for tool in ("rsync", "openssh-client", "wget"):  # Ray launcher and KubeRay probes need them
        assert tool in runs


def test_versions_agree_across_image_configs_and_docs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_version = docker_args()["RAY_VERSION"]
    (ray_req,) = [Requirement(d) for d in project["dependencies"] if d.startswith("ray")]
    assert ray_version in SpecifierSet(str(ray_req.specifier)), "Ray outside pyproject range"
    assert load(RAYCLUSTER)["spec"]["rayVersion"] == ray_version
    for doc in (INFRA_README, CLUSTER_DOC):
        for pinned in re.findall(r"ray\[default\]==([0-9][\w.]*)", doc.read_text()):
            assert pinned == ray_version, f"{doc.name} pins Ray {pinned}, the image {ray_version}"
    (image,) = image_refs()
    assert image.rsplit(":", 1)[1] == project["version"], "image tag = the lorajobs version"


# -- the controller as a systemd service ---------------------------------------------------------


def _unit(path: Path = UNIT) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def _env_file(path: Path) -> dict[str, str]:
    return dict(
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )


def test_systemd_unit():
    unit = _unit()
    svc = unit["Service"]
    assert svc["Restart"] == ["always"]
    assert unit["Unit"]["StartLimitIntervalSec"] == ["0"]
    assert svc["User"] != ["root"] and svc["User"]
    assert svc["EnvironmentFile"] == ["/etc/lorajobs/controller.env"]
    assert svc["ExecStart"][0].endswith("/lorajobs controller")
    assert svc["ExecStartPre"][0].endswith("/lorajobs db upgrade")
    assert f"LORAJOBS_CACHE_DIR={CACHE_DIR}" in svc["Environment"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # The example env file sets the real settings: Settings reads exactly these names.
    example = _env_file(ENV_EXAMPLE)
    settings = Settings.from_env(example)
    assert settings.database_url == example["LORAJOBS_DATABASE_URL"].strip()
    assert settings.ray_address == example["LORAJOBS_RAY_ADDRESS"].strip()
    assert settings.bucket == example["LORAJOBS_BUCKET"].strip()
    assert settings.ray_address.startswith("ray://") and settings.database_url.startswith(
        "postgresql://"
    )


def test_server_beside_the_controller():
    """The server runs with the controller's settings file, on loopback behind a TLS proxy
    (systemd), or as a Deployment and Service next to the controller (Kubernetes); both
    controller manifests keep jobs inside their owners' prefixes."""
    unit = _unit(SERVER_UNIT)
    svc = unit["Service"]
    assert svc["EnvironmentFile"][0] == "/etc/lorajobs/controller.env"
    assert svc["ExecStart"][0].endswith("/lorajobs server --host 127.0.0.1 --port 8000")
    assert svc["User"] == ["lorajobs"] and svc["UMask"] == ["0077"]
    dep, service = yaml.safe_load_all(SERVER.read_text())
    assert dep["kind"] == "Deployment" and service["kind"] == "Service"
    assert dep["metadata"]["namespace"] == load(CONTROLLER)["metadata"]["namespace"]
    (main,) = dep["spec"]["template"]["spec"]["containers"]
    assert main["command"][:2] == ["lorajobs", "server"]
    _assert_no_inline_secrets(main)
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["LORAJOBS_TENANCY"] == "shared" and env["LORAJOBS_SECURE_COOKIES"] == "1"
    assert main["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    (ctl,) = load(CONTROLLER)["spec"]["template"]["spec"]["containers"]
    ctl_env = {e["name"]: e.get("value") for e in ctl["env"]}
    assert ctl_env["LORAJOBS_TENANCY"] == "shared"
    # The server judges at submit whether any node could run a CUDA-only spec: from the same
    # Ray address as the controller (none would mean "this pod", which has no GPU).
    assert env["LORAJOBS_RAY_ADDRESS"] == ctl_env["LORAJOBS_RAY_ADDRESS"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("unit", [UNIT, SERVER_UNIT], ids=["controller", "server"])
def test_systemd_analyze_verify_finds_nothing_but_the_absent_venv(unit: Path):
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and "/opt/lorajobs/venv/bin/lorajobs" not in line
    ]
    assert not problems, "\n".join(problems)


# -- docs and secrets ---------------------------------------------------------------------------


def test_docs_name_only_real_settings_and_existing_files():
    code = "\n".join(
        p.read_text()
        for pkg in ("jobspecs", "storage", "orchestrator", "worker")
        for p in (ROOT / pkg).rglob("*.py")
    )
    known = set(re.findall(r"LORAJOBS_[A-Z0-9_]+", code))
    assert {"LORAJOBS_DATABASE_URL", "LORAJOBS_RAY_ADDRESS", "LORAJOBS_BUCKET"} <= known
    for path in INFRA_FILES:
        used = set(re.findall(r"LORAJOBS_[A-Z0-9_]+", path.read_text()))
        assert used <= known, f"{path.name} names settings lorajobs does not read: {used - known}"
    for doc in (CLUSTER_DOC, INFRA_README):
        links = re.findall(r"\]\((\.\.?/[^)#\s]+|[\w./-]+\.md)(?:#[^)]*)?\)", doc.read_text())
        for target in links:
            assert (doc.parent / target).resolve().exists(), f"{doc.name} links to {target}"
    assert "docs/cluster.md" in (ROOT / "README.md").read_text()
    text = CLUSTER_DOC.read_text()
    steps = ("## 1. PostgreSQL", "## 2. A bucket", "## 3. A Ray cluster", "## 4. The controller")
    for step in steps:
        assert step in text


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{40}"),
    "GCS HMAC access id": re.compile(r"\bGOOG1[0-9A-Z]{20,}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "password in a URL": re.compile(r"://[^/\s:@'\"]+:(?!<|\.\.\.|\$\{)[^@\s/'\"]+@"),
}


def _secrets_in(text: str) -> list[str]:
    return [name for name, rx in SECRET_PATTERNS.items() if rx.search(text)]


def test_secret_scanner_catches_secrets():
    # Built at run time, so that this file holds no key-shaped literal either.
    fake_id = "AKIA" + "Q" * 16
    fake_secret = "aws_secret_access_key = " + "a/B+" * 10
    assert _secrets_in(fake_id) == ["AWS access key id"]
    assert _secrets_in(fake_secret) == ["AWS secret key"]
    assert _secrets_in("postgresql://u:" + "hunter2" + "@db/x") == ["password in a URL"]
    assert not _secrets_in("postgresql://lorajobs:<password>@<host>:5432/lorajobs")


@pytest.mark.parametrize("path", INFRA_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_secret_in_infra_files(path):
    assert not _secrets_in(path.read_text()), f"{path} looks like it holds a secret"


def _pins() -> dict[str, str]:
    lines = (ROOT / "infra" / "constraints.txt").read_text().splitlines()
    pairs = [ln.split("==", 1) for ln in lines if ln.strip() and not ln.startswith("#")]
    return {name.lower(): version for name, version in pairs}


def test_ci_and_the_image_install_the_locked_versions():
    pins = _pins()
    # Every runtime dependency of the package is pinned, and the pins are exact.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.split(r"[<>=\[ ;]", dep, maxsplit=1)[0].lower()
        assert name in pins, f"{name} is not in infra/constraints.txt: run make lock"
    assert docker_args()["RAY_VERSION"] == pins["ray"], "the image's Ray must be the locked one"
    runs = " ".join(rest for op, rest in dockerfile() if op == "RUN")
    assert "-c /src/constraints.txt" in runs
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"TORCH_CPU \?= torch=={re.escape(pins['torch'])}\n", makefile)
    assert makefile.count("-c $(CONSTRAINTS)") >= 2


def test_a_folder_bucket_is_refused_with_a_cluster_elsewhere():
    from lorajobs.jobspecs.failures import InvalidInput
    from lorajobs.orchestrator.ray_backend import refuse_folder_bucket_on_remote_cluster

    far = Settings.from_env({"LORAJOBS_RAY_ADDRESS": "ray://203.0.113.7:10001"})
    with pytest.raises(InvalidInput, match="use an s3:// bucket every node can reach"):
        refuse_folder_bucket_on_remote_cluster(far, [])
    near = Settings.from_env({"LORAJOBS_RAY_ADDRESS": "ray://127.0.0.1:10001"})
    refuse_folder_bucket_on_remote_cluster(near, ["127.0.0.1"])  # one machine: fine
    with pytest.raises(InvalidInput, match=r"\(203\.0\.113\.9\)"):  # a worker node elsewhere
        refuse_folder_bucket_on_remote_cluster(near, ["127.0.0.1", "203.0.113.9"])
    s3 = Settings.from_env(
        {"LORAJOBS_RAY_ADDRESS": "ray://203.0.113.7:10001", "LORAJOBS_BUCKET": "s3://b/lj"}
    )
    refuse_folder_bucket_on_remote_cluster(s3, ["203.0.113.9"])
