"""Static checks of the deployment files: Dockerfile, cluster/*.yaml, cluster/kuberay/*.yaml.

Nothing here starts Ray or imports dynamo_dist. Launcher configs are validated
against the ``ray-schema.json`` shipped inside the installed Ray (the schema
``ray up`` itself uses); the security invariants (token auth, dashboard on
loopback, no public dashboard Service) are checked by small helpers, and each
helper is also run on a deliberately broken copy to show it can fail.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import shlex
import tomllib

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
LAUNCHER_CONFIGS = sorted(CLUSTER_DIR.glob("*.yaml"))
KUBERAY_MANIFESTS = sorted((CLUSTER_DIR / "kuberay").glob("*.yaml"))
IMAGE_REPO = "dynamo-dist"


# ---------------------------------------------------------------- fixtures


def _load_yaml(path: pathlib.Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    path = pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    assert path.is_file(), f"installed Ray ships no {path}"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def _pinned_version(pyproject: dict, name: str) -> str:
    for dep in pyproject["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            pins = [s.version for s in req.specifier if s.operator == "=="]
            assert len(pins) == 1, f"{name} must be pinned with ==, got {dep!r}"
            return pins[0]
    raise AssertionError(f"{name} not in pyproject dependencies")


@pytest.fixture(scope="module")
def project_version(pyproject: dict) -> str:
    return pyproject["project"]["version"]


# ------------------------------------------------- shell-command helpers


def _shell_segments(command: str) -> list[list[str]]:
    """Split a launcher shell command into simple commands, each as shlex tokens."""
    parts = re.split(r";|&&|\|\||\n", command)
    return [shlex.split(p) for p in parts if p.strip()]


def _ray_start_segments(commands: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """(env, argv) for every `ray start` in a list of launcher commands.

    env holds inline `VAR=value` prefixes plus earlier `export VAR=value` in the
    same command string.
    """
    found = []
    for command in commands:
        exported: dict[str, str] = {}
        for tokens in _shell_segments(command):
            if tokens[:1] == ["export"]:
                exported.update(t.split("=", 1) for t in tokens[1:] if "=" in t)
                continue
            env = dict(exported)
            i = 0
            while i < len(tokens) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[i]):
                key, value = tokens[i].split("=", 1)
                env[key] = value
                i += 1
            argv = tokens[i:]
            if argv[:2] == ["ray", "start"]:
                found.append((env, argv))
    return found


def _flag_values(argv: list[str], flag: str) -> list[str]:
    values = []
    for i, tok in enumerate(argv):
        if tok.startswith(flag + "="):
            values.append(tok.split("=", 1)[1])
        elif tok == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
    return values


# ------------------------------------------- launcher (ray up) checks


def launcher_problems(config: dict, schema: dict) -> list[str]:
    """Everything wrong with a cluster-launcher config; empty when fine."""
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as e:
        return [f"schema: {e.message} at {list(e.absolute_path)}"]

    problems = []
    node_types = config.get("available_node_types", {})
    if config.get("head_node_type") not in node_types:
        problems.append("head_node_type is not one of available_node_types")
    min_total = sum(t.get("min_workers", 0) for t in node_types.values())
    if min_total > config.get("max_workers", 0):
        problems.append("sum of min_workers exceeds max_workers")

    head = _ray_start_segments(config.get("head_start_ray_commands", []))
    workers = _ray_start_segments(config.get("worker_start_ray_commands", []))
    if not any("--head" in argv for _, argv in head):
        problems.append("head_start_ray_commands has no `ray start --head`")
    if not workers:
        problems.append("worker_start_ray_commands has no `ray start`")
    for env, argv in head + workers:
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"`{' '.join(argv)}` runs without RAY_AUTH_MODE=token")
    for _, argv in head:
        if "--head" in argv and _flag_values(argv, "--dashboard-host") != ["127.0.0.1"]:
            problems.append("head `ray start` does not bind the dashboard to 127.0.0.1")

    if not any(p.endswith("/.ray/auth_token") for p in config.get("file_mounts", {})):
        problems.append("file_mounts do not copy the auth token to the nodes")
    # shared storage: nodes have no common disk, so every node reaches the run bucket (its instance profile)
    for name, t in node_types.items():
        if not (t.get("node_config", {}).get("IamInstanceProfile") or {}).get("Name"):
            problems.append(f"node type {name} has no IamInstanceProfile: it cannot reach the run bucket")
    return problems


def test_the_cluster_config_runs_on_a_bucket_and_the_docs_submit_it():
    """configs/cluster.yaml (what the cluster docs and the RayJob run) puts every stage in a bucket."""
    from dynamo_dist import config

    cfg = config.load(REPO / "configs" / "cluster.yaml")
    assert cfg.run_dir.split("://")[0] in config.URI_SCHEMES
    assert cfg.population.root.startswith(cfg.run_dir) and cfg.meta.output_dir.startswith(cfg.run_dir)
    readme = (CLUSTER_DIR / "README.md").read_text()
    submits = [line for line in readme.splitlines() if "python jobs/pipeline.py" in line]
    assert submits and all("configs/cluster.yaml" in line and "--tracking-uri" in line for line in submits), submits


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_is_valid_and_secure(path, ray_schema):
    assert launcher_problems(_load_yaml(path), ray_schema) == []


def test_launcher_configs_exist():
    names = {p.name for p in LAUNCHER_CONFIGS}
    assert {"aws-cpu.yaml", "aws-gpu.yaml"} <= names


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.update(dashboard_host="0.0.0.0"), id="unknown-top-level-field"),
        pytest.param(lambda c: c["docker"].update(gpus="all"), id="unknown-docker-field"),
        pytest.param(
            lambda c: c["available_node_types"][c["head_node_type"]].update(resources={"CPU": "8"}),
            id="resource-not-integer",
        ),
        pytest.param(lambda c: c["provider"].pop("type"), id="provider-without-type"),
    ],
)
def test_ray_schema_rejects_broken_launcher_config(mutate, ray_schema):
    config = copy.deepcopy(_load_yaml(CLUSTER_DIR / "aws-cpu.yaml"))
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, ray_schema)


def _replace_in_start_commands(config: dict, old: str, new: str) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        config[key] = [c.replace(old, new) for c in config[key]]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: _replace_in_start_commands(c, "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
         "127.0.0.1"),
        (lambda c: _replace_in_start_commands(c, "--dashboard-host=127.0.0.1", ""), "127.0.0.1"),
        (lambda c: _replace_in_start_commands(c, "RAY_AUTH_MODE=token ", ""), "RAY_AUTH_MODE"),
        (lambda c: c.update(file_mounts={}), "auth token"),
        (lambda c: c.update(head_node_type="nope"), "head_node_type"),
        (lambda c: c["available_node_types"]["gpu.worker"]["node_config"].pop("IamInstanceProfile"),
         "run bucket"),
    ],
    ids=["dashboard-public", "dashboard-default", "no-token-auth", "no-token-file", "bad-head-type",
         "no-bucket-access"],
)
def test_launcher_checks_catch_insecure_config(mutate, expected, ray_schema):
    config = copy.deepcopy(_load_yaml(CLUSTER_DIR / "aws-gpu.yaml"))
    mutate(config)
    problems = launcher_problems(config, ray_schema)
    assert any(expected in p for p in problems), problems


def test_ray_start_parser_reads_export_and_inline_env():
    cmds = ["export RAY_AUTH_MODE=token; ray start --head --dashboard-host 127.0.0.1",
            "ulimit -n 65536; FOO=1 ray start --address=$RAY_HEAD_IP:6379"]
    (env0, argv0), (env1, argv1) = _ray_start_segments(cmds)
    assert env0 == {"RAY_AUTH_MODE": "token"}
    assert _flag_values(argv0, "--dashboard-host") == ["127.0.0.1"]
    assert env1 == {"FOO": "1"} and argv1[:2] == ["ray", "start"]


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_images_are_the_project_image(path, project_version):
    config = _load_yaml(path)
    docker = config["docker"]
    images = [docker["image"], docker.get("head_image", docker["image"])]
    images += [t["docker"]["worker_image"] for t in config["available_node_types"].values()
               if "worker_image" in t.get("docker", {})]
    allowed = {f"{IMAGE_REPO}:{project_version}", f"{IMAGE_REPO}:{project_version}-gpu"}
    for image in images:
        assert image.rsplit("/", 1)[-1] in allowed, image


def test_gpu_launcher_uses_gpu_image_on_gpu_workers(project_version):
    config = _load_yaml(CLUSTER_DIR / "aws-gpu.yaml")
    gpu_types = [t for name, t in config["available_node_types"].items() if "gpu" in name]
    assert gpu_types
    for t in gpu_types:
        assert t["docker"]["worker_image"].endswith(f"{IMAGE_REPO}:{project_version}-gpu")


# ------------------------------------------------------ KubeRay checks


def _cluster_spec(manifest: dict) -> dict:
    if manifest["kind"] == "RayCluster":
        return manifest["spec"]
    if manifest["kind"] == "RayJob":
        return manifest["spec"]["rayClusterSpec"]
    raise AssertionError(f"unexpected kind {manifest['kind']}")


def _groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [
        (g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])
    ]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _has_token_env(env: dict[str, dict]) -> bool:
    mode = env.get("RAY_AUTH_MODE", {}).get("value")
    token_ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return mode == "token" and bool(token_ref.get("name")) and bool(token_ref.get("key"))


def kuberay_problems(manifest: dict, ray_version: str, project_version: str) -> list[str]:
    """Everything wrong with a KubeRay manifest; empty when fine."""
    problems = []
    if manifest.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion is {manifest.get('apiVersion')!r}, not ray.io/v1")
    if manifest.get("kind") not in ("RayCluster", "RayJob"):
        return problems + [f"kind {manifest.get('kind')!r} is not RayCluster/RayJob"]
    if not manifest.get("metadata", {}).get("name"):
        problems.append("metadata.name missing")
    spec = _cluster_spec(manifest)
    if spec.get("rayVersion") != ray_version:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} != installed Ray {ray_version}")

    operator_token = spec.get("authOptions", {}).get("mode") == "token"
    images = {f"{IMAGE_REPO}:{project_version}", f"{IMAGE_REPO}:{project_version}-gpu"}
    for group_name, group in _groups(spec):
        containers = group.get("template", {}).get("spec", {}).get("containers", [])
        if not containers:
            problems.append(f"{group_name}: no containers")
        for c in containers:
            where = f"{group_name}/{c.get('name')}"
            if c.get("image", "").rsplit("/", 1)[-1] not in images:
                problems.append(f"{where}: image {c.get('image')!r} is not the project image")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(kind, {})):
                    problems.append(f"{where}: resources.{kind} lacks cpu/memory")
            if not operator_token and not _has_token_env(_env(c)):
                problems.append(f"{where}: no RAY_AUTH_MODE=token with RAY_AUTH_TOKEN from a Secret")
    if spec.get("enableInTreeAutoscaling") and not operator_token:
        if not _has_token_env(_env(spec.get("autoscalerOptions", {}))):
            problems.append("autoscaler sidecar has no token env")

    head = spec["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"head Service type {head['serviceType']} exposes the dashboard")
    if head.get("enableIngress"):
        problems.append("head ingress exposes the dashboard")
    dashboard_host = head.get("rayStartParams", {}).get("dashboard-host")
    if manifest["kind"] == "RayCluster" and dashboard_host != "127.0.0.1":
        problems.append(f"dashboard-host is {dashboard_host!r}, not 127.0.0.1")
    if dashboard_host != "127.0.0.1" and not operator_token:
        # A RayJob needs the operator to reach the Jobs API; then the operator
        # must hold the token (authOptions), or the dashboard is open in-cluster.
        problems.append("dashboard off loopback without authOptions.mode=token")
    return problems


def test_kuberay_manifests_exist():
    names = {p.name for p in KUBERAY_MANIFESTS}
    assert {"raycluster.yaml", "rayjob-pipeline.yaml"} <= names


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_is_complete_and_secure(path, project_version):
    for manifest in yaml.safe_load_all(path.read_text()):
        assert kuberay_problems(manifest, ray.__version__, project_version) == []


def test_rayjob_runs_the_pipeline():
    """The entrypoint names files the image has (the repository is copied to /app) and a command
    line the pipeline's CLI accepts, loading that config (tests/test_core.py runs the CLI parse)."""
    job = _load_yaml(CLUSTER_DIR / "kuberay" / "rayjob-pipeline.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1] == "/app/jobs/pipeline.py"
    assert re.search(r"^COPY (--\S+ )*\. /app$", (REPO / "Dockerfile").read_text(), re.M), "the image must hold the repo at /app"
    for path in (argv[1], argv[3]):
        assert (REPO / path.removeprefix("/app/")).is_file(), path
    assert argv[2] == "--config"
    # what every node shares: the run directory is a bucket URI, MLflow a tracking server (checked as the
    # CLI loads them: a relative run_dir would stay in the head pod, SQLite would be refused on 2+ nodes)
    from dynamo_dist import cli, config

    args = cli.build_parser().parse_args(["run", *[a.replace("/app/", f"{REPO}/") for a in argv[2:]]])
    cfg = cli.load_pipeline(args)
    assert cfg.run_dir.split("://")[0] in config.URI_SCHEMES, cfg.run_dir
    assert cfg.population.root.startswith(cfg.run_dir) and cfg.meta.output_dir.startswith(cfg.run_dir)
    assert cfg.tracking.tracking_uri.startswith("http"), cfg.tracking.tracking_uri


def test_a_relative_run_dir_in_a_ray_job_working_dir_is_refused_naming_the_fields(tmp_path, monkeypatch):
    from dynamo_dist import cli, config

    job_dir = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    cfg = config.recipe("smoke")
    with pytest.raises(ValueError, match=r"run_dir='runs/smoke'.*population.root=.*Ray's copy of its working dir"):
        config.check_cluster_paths(cfg)
    config.check_cluster_paths(cfg.model_copy(update={"run_dir": "s3://b/r", "population": cfg.population.replace(
        root="s3://b/r/population"), "meta": cfg.meta.replace(output_dir=str(tmp_path / "meta"))}))
    assert cli.main(["population", "--recipe", "smoke"]) == 2  # the CLI refuses it before any work
    assert not (job_dir / "runs").exists()


def _set_head_param(m, key, value):
    _cluster_spec(m)["headGroupSpec"]["rayStartParams"][key] = value


def _drop_auth_env(m):
    spec = _cluster_spec(m)
    for _, group in _groups(spec):
        for c in group["template"]["spec"]["containers"]:
            c["env"] = [e for e in c.get("env", []) if e["name"] != "RAY_AUTH_MODE"]


@pytest.mark.parametrize(
    ("filename", "mutate", "expected"),
    [
        ("raycluster.yaml", lambda m: _set_head_param(m, "dashboard-host", "0.0.0.0"), "127.0.0.1"),
        ("raycluster.yaml", _drop_auth_env, "RAY_AUTH_MODE"),
        ("raycluster.yaml", lambda m: m["spec"]["autoscalerOptions"].pop("env"), "autoscaler"),
        ("raycluster.yaml", lambda m: m["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
         "exposes"),
        ("raycluster.yaml", lambda m: m["spec"].update(rayVersion="2.9.0"), "rayVersion"),
        ("rayjob-pipeline.yaml", lambda m: _cluster_spec(m).pop("authOptions"), "authOptions"),
        ("rayjob-pipeline.yaml",
         lambda m: _cluster_spec(m)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("resources"),
         "resources"),
        ("rayjob-pipeline.yaml",
         lambda m: _cluster_spec(m)["headGroupSpec"]["template"]["spec"]["containers"][0].update(
             image="rayproject/ray:2.58.0"),
         "project image"),
        ("rayjob-pipeline.yaml", lambda m: _cluster_spec(m)["headGroupSpec"].update(enableIngress=True),
         "ingress"),
    ],
    ids=["cluster-dashboard-public", "cluster-no-auth-env", "autoscaler-no-token", "load-balancer",
         "wrong-ray-version", "job-no-authoptions", "no-resources", "foreign-image", "ingress"],
)
def test_kuberay_checks_catch_broken_manifest(filename, mutate, expected, project_version):
    manifest = copy.deepcopy(_load_yaml(CLUSTER_DIR / "kuberay" / filename))
    mutate(manifest)
    problems = kuberay_problems(manifest, ray.__version__, project_version)
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------ Dockerfile checks


def _dockerfile_args_and_from() -> tuple[dict[str, str], list[str], list[str]]:
    """(ARG defaults, FROM images with ARGs substituted, USER values) of ../Dockerfile."""
    text = (REPO / "Dockerfile").read_text()
    # Join line continuations so each instruction is one line.
    lines = re.sub(r"\\\n", " ", text).splitlines()
    args: dict[str, str] = {}
    froms, users = [], []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key.strip(), value.strip().strip('"'))
        elif instr == "FROM":
            image = rest.split()[0]
            froms.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image))
        elif instr == "USER":
            users.append(rest.strip())
    return args, froms, users


def test_dockerfile_base_image_matches_pinned_ray(pyproject):
    ray_pin = _pinned_version(pyproject, "ray")
    assert ray_pin == ray.__version__, "installed Ray differs from the pyproject pin"
    _, froms, _ = _dockerfile_args_and_from()
    assert froms, "Dockerfile has no FROM"
    repo, _, tag = froms[-1].partition(":")
    assert repo == "rayproject/ray"
    assert tag.split("-")[0] == ray_pin, f"base tag {tag} is not Ray {ray_pin}"
    assert "-py311" in tag


def test_dockerfile_torch_pins_match_pyproject(pyproject):
    args, _, _ = _dockerfile_args_and_from()
    assert args["TORCH_VERSION"] == _pinned_version(pyproject, "torch")
    assert args["TORCHVISION_VERSION"] == _pinned_version(pyproject, "torchvision")


def test_dockerfile_runs_as_non_root_and_installs_package():
    _, _, users = _dockerfile_args_and_from()
    assert users and users[-1].split(":")[0] not in ("root", "0")
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"pip install[^\n]*\s(/app|\.)(\s|$)", text), "package is not pip-installed"


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv"} <= ignored
