"""The cluster recipes in cluster/ and the README's cluster section stay consistent with the code.

Fast and offline: parses files and checks references; no Ray cluster, Docker or Kubernetes.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from r2d3.config import ScaleConfig, build_config
from r2d3.train.config import AlignConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
# repository-relative paths that commands and entrypoints may name
REPO_PATH = re.compile(r"(?<![\w/.~$-])((?:pipelines|cluster|tune_spaces|r2d3)/[\w./-]*\w)")


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def repo_paths(text: str) -> list[str]:
    return REPO_PATH.findall(text)


def align_overrides(command: str) -> list[str]:
    """The ``section.key=value`` arguments after ``pipelines/align.py`` in a shell command."""
    words = shlex.split(command.replace("\\\n", " "))
    start = next(i for i, w in enumerate(words) if w.endswith("pipelines/align.py")) + 1
    out = []
    for word in words[start:]:
        if word in ("&&", "||", ";", "|"):
            break
        if "=" in word and not word.startswith("-"):
            out.append(word)
    return out


def test_every_yaml_parses():
    files = sorted(CLUSTER.glob("*.yaml")) + sorted(CLUSTER.glob("*.yml"))
    assert {f.name for f in files} >= {"cluster.yaml", "rayjob.yaml", "runtime_env.yaml"}
    for file in files:
        assert isinstance(yaml.safe_load(file.read_text()), dict), file


# ----------------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import validate_config  # the launcher's own schema check

    validate_config(load("cluster.yaml"))


def test_launcher_has_cpu_head_and_gpu_workers():
    config = load("cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_instance = re.compile(r"^(g4dn|g5|g6|g6e|p3|p4d|p4de|p5|p5e)\.")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu_workers = [t for t in workers.values()
                   if gpu_instance.match(t["node_config"]["InstanceType"]) or t["resources"].get("GPU")]
    assert gpu_workers, "no GPU worker node type"
    for worker in gpu_workers:
        assert 0 <= worker["min_workers"] <= worker["max_workers"] <= config["max_workers"]


def test_launcher_commands_install_gpu_build_and_start_ray():
    config = load("cluster.yaml")
    setup = "\n".join(config["setup_commands"] + config["head_setup_commands"]
                      + config["worker_setup_commands"])
    assert re.search(r"pip install[^\n]*\[[^\]]*\bgpu\b", setup), "the gpu extra is not installed"
    assert "whl/cpu" not in setup and "+cpu" not in setup, "CPU-only torch on GPU nodes"
    head = "\n".join(config["head_start_ray_commands"])
    worker = "\n".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head and "--include-dashboard=true" in head and "8265" in head
    assert "ray start --address=" in worker
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker


def test_launcher_file_mounts_and_commands_reference_existing_files():
    config = load("cluster.yaml")
    for remote, local in config["file_mounts"].items():
        if not local.startswith("~"):  # repo-relative (ray up runs from the repository root)
            assert (ROOT / local).exists(), f"file mount {remote}: {local} is not in the repository"
    # the editable install points at a mounted copy of this repository
    installs = re.findall(r'pip install -e "\$HOME/([\w-]+)\[', "\n".join(config["setup_commands"]))
    assert installs
    for name in installs:
        local = config["file_mounts"][f"~/{name}"]
        assert (ROOT / local / "pyproject.toml").is_file()
    text = (CLUSTER / "cluster.yaml").read_text()
    for path in repo_paths(text):
        assert (ROOT / path).exists(), f"cluster.yaml names {path}, which does not exist"


# ----------------------------------------------------------------------------------------------------
# KubeRay RayJob


def test_rayjob_manifest():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and 0 < spec["ttlSecondsAfterFinished"] <= 86400
    assert "pipelines/align.py" in spec["entrypoint"]
    for path in repo_paths(spec["entrypoint"]):
        assert (ROOT / path).exists(), f"rayjob entrypoint names {path}, which does not exist"
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    groups = cluster["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group with nvidia.com/gpu"
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    images = [head["image"]] + [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert all("r2d3" in image for image in images)


def test_rayjob_credentials_come_from_a_secret():
    job = load("rayjob.yaml")
    cluster = job["spec"]["rayClusterSpec"]
    containers = cluster["headGroupSpec"]["template"]["spec"]["containers"] + [
        c for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    for container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key in env, f"{container['name']} lacks {key}"
            assert "value" not in env[key] and "secretKeyRef" in env[key]["valueFrom"]


def test_rayjob_entrypoint_options_exist():
    job = load("rayjob.yaml")
    config = build_config(AlignConfig, overrides=align_overrides(job["spec"]["entrypoint"]))
    # OmegaConf turns the override `true` into the string "True"
    assert config.scale.num_workers > 1 and config.scale.use_gpu is True
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert check_runtime_env(runtime_env, local=False)  # working_dir is a path inside the image
    assert runtime_env["working_dir"] == "/opt/r2d3"
    assert re.search(r"^WORKDIR /opt/r2d3$", (CLUSTER / "Dockerfile").read_text(), re.M)


# ----------------------------------------------------------------------------------------------------
# runtime_env and image


def check_runtime_env(runtime_env: dict, local: bool = True) -> bool:
    from ray.runtime_env import RuntimeEnv

    unknown = set(runtime_env) - set(RuntimeEnv.known_fields)
    assert not unknown, f"unknown runtime_env keys: {unknown}"
    env_vars = runtime_env.get("env_vars", {})
    assert all(isinstance(v, str) for v in env_vars.values()), "env_vars values must be strings"
    if local:
        RuntimeEnv(**runtime_env)  # Ray's own validation (resolves working_dir here)
    return True


def test_runtime_env():
    runtime_env = load("runtime_env.yaml")
    assert check_runtime_env(runtime_env)
    assert runtime_env["working_dir"] == "."
    secret = re.compile(r"(SECRET|PASSWORD|TOKEN|API_KEY|ACCESS_KEY)", re.I)
    assert not [k for k in runtime_env.get("env_vars", {}) if secret.search(k)], "secrets in runtime_env"


def test_dockerfile_installs_gpu_extra_and_no_cpu_torch():
    text = (CLUSTER / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    body = "\n".join(instructions)
    assert re.search(r"^FROM\s+\S*cuda", body, re.M) or re.search(r"CUDA_IMAGE=\S*cuda", body)
    assert "python3.11" in body
    assert re.search(r"pip install [^\n]*\.\[[^\]]*\bgpu\b", body), "the gpu extra is not installed"
    assert "whl/cpu" not in body and "+cpu" not in body, "CPU-only torch wheel"
    assert "WITH_NVDIFFRAST" in body
    for line in instructions:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


# ----------------------------------------------------------------------------------------------------
# README


def cluster_section() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Cluster usage\n(.*?)(?=^## )", readme, re.M | re.S)
    assert match, "README has no '## Cluster usage' section"
    return match.group(1)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ScaleConfig)])
def test_readme_documents_every_scale_option(name):
    assert re.search(rf"\bscale\.{name}\b", cluster_section()), f"README cluster section lacks scale.{name}"


def test_readme_names_the_recipes_and_only_real_options():
    section = cluster_section()
    for file in ("cluster/" + n for n in ("cluster.yaml", "rayjob.yaml", "Dockerfile", "runtime_env.yaml")):
        assert file in section and (ROOT / file).exists()
    # every align.py command in the section builds a valid config (placeholders are plain strings)
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [line for line in lines if "pipelines/align.py" in line]
    assert commands
    for command in commands:
        build_config(AlignConfig, overrides=align_overrides(command.split("#")[0]))
    # and every inline section.key the section mentions exists
    known = set(_flat_keys(AlignConfig))
    for key in re.findall(r"`((?:run|model|sampler|render|algo|train|data|eval|scale)\.\w+)", section):
        assert key in known, f"README mentions {key}, which is not an option"


def _flat_keys(cls: type, prefix: str = "") -> list[str]:
    """``section.key`` for every option of a config dataclass."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _flat_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys
