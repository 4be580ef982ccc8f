"""The cluster presets (conf/cluster/), the cluster-launcher YAMLs (cluster/aws.yaml, cluster/gcp.yaml), the KubeRay
manifests (cluster/kuberay/) and the RayService builder (serve/rayservice.py) agree: the same image, node shape and
node limits everywhere, every `python launch.py ...` command they show composes, and the launcher YAMLs pass Ray's
own config checks. Nothing here starts Ray."""

import copy
import json
import math
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conf.schema import ClusterConfig, RootConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
PRESETS = sorted(path.stem for path in (CONF_DIR / "cluster").glob("*.yaml"))
LAUNCHER_YAMLS = {"aws.yaml": "aws_p5", "gcp.yaml": "gcp_a3"}  # file in cluster/ -> the preset it serves
KUBERAY_DIR = REPO_ROOT / "cluster" / "kuberay"
KUBERAY_PRESET = "kuberay"
MANIFESTS = [REPO_ROOT / "cluster" / name for name in LAUNCHER_YAMLS] + sorted(KUBERAY_DIR.glob("*.yaml"))
SHARED_MOUNT = "/mnt/shared"  # where every node of every manifest mounts the storage paths.root lives on
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
RAY_PIN = next(dep.split("==")[1] for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("ray["))


def compose_config(overrides: list[str]) -> RootConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


@cache
def preset(name: str) -> ClusterConfig:
    address = ["cluster.address=HEAD:6379"] if name == "remote" else []  # remote needs one (see remote.yaml)
    return compose_config([f"cluster={name}", *address]).cluster


def gpu_presets() -> list[str]:
    return [name for name in PRESETS if preset(name).use_gpu]


@cache
def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay_object(file: str, kind: str) -> dict:
    (found,) = [doc for doc in documents(KUBERAY_DIR / file) if doc["kind"] == kind]
    return found


def ray_cluster_specs() -> dict[str, dict]:
    return {"raycluster.yaml": kuberay_object("raycluster.yaml", "RayCluster")["spec"],
            "rayjob.yaml": kuberay_object("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
            "rayservice.yaml": kuberay_object("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"]}


def launch_commands(text: str) -> list[list[str]]:
    """The overrides of every `python launch.py ...` in a file, in comments or values; a trailing backslash
    continues a command on the next (comment) line."""
    joined = re.sub(r"\\\n[ \t]*#?[ \t]*", " ", text)
    return [shlex.split(match) for match in re.findall(r"python launch\.py([^\n#`]*)", joined)]


def gigabytes(quantity: str) -> float:
    """A Kubernetes memory quantity in GB (1e9 bytes)."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(number) * scale[unit] / 1e9


# ----------------------------------------------------------------------------------------------- the presets

@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_says_how_to_use_it(name):
    cfg = preset(name)
    assert cfg.name == name
    header = (CONF_DIR / "cluster" / f"{name}.yaml").read_text().splitlines()[0]
    assert header.startswith("# "), f"conf/cluster/{name}.yaml must start with a comment saying what it is"
    assert launch_commands((CONF_DIR / "cluster" / f"{name}.yaml").read_text()), \
        f"conf/cluster/{name}.yaml must show a command that uses it"


def test_remote_preset_refuses_to_run_without_an_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(Exception, match="RAY_ADDRESS") as error:
        compose_config(["cluster=remote"])
    assert "cluster.address" in str(error.value)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert compose_config(["cluster=remote"]).cluster.address == "10.0.0.1:6379"


def test_gpu_presets_describe_their_node():
    assert set(gpu_presets()) >= {"gpu_node", "aws_p5", "gcp_a3", KUBERAY_PRESET}
    for name in gpu_presets():
        cfg, node = preset(name), preset(name).node
        assert node.gpus > 0 and node.gpu_memory_gb > 0 and node.cpus > 0 and node.memory_gb > 0, name
        assert node.gpu_type and node.nvlink_gb_per_s > 0 and node.network_gbit_per_s > 0, name
        assert node.price_per_hour > 0 and node.price_source, f"{name}: a price and where it comes from"
        assert cfg.gpus_per_worker == 1 and cfg.num_workers == node.gpus, f"{name}: one worker per GPU of a node"
        assert cfg.cpus_per_worker * node.gpus < node.cpus, f"{name}: a node's workers must leave CPUs for Ray"
        assert cfg.peak_tflops_per_gpu > 0 and cfg.max_nodes >= 1


# ------------------------------------------------------------------------------ every launch.py command shown

def shown_commands() -> list[tuple[str, list[str]]]:
    files = [*MANIFESTS, *sorted((CONF_DIR / "cluster").glob("*.yaml"))]
    return [(str(path.relative_to(REPO_ROOT)), overrides) for path in files
            for overrides in launch_commands(path.read_text())]


def test_every_launch_command_shown_composes():
    """Each command a manifest or preset shows must compose with Hydra, name an existing experiment and cluster
    preset, and pass the checks launch.py makes before it starts anything."""
    from launch import stages_of
    from trainers.run import check_config

    commands = shown_commands()
    assert len(commands) >= 10
    for where, overrides in commands:
        flags = [item for item in overrides if item.startswith("--")]
        assert not flags, f"{where}: {flags} (show Hydra flags elsewhere)"
        groups = dict(item.lstrip("+").split("=", 1) for item in overrides if item.split("=")[0] in ("+exp", "cluster"))
        assert "exp" not in groups or (CONF_DIR / "exp" / f"{groups['exp']}.yaml").exists(), f"{where}: {overrides}"
        assert groups.get("cluster", "local") in PRESETS, f"{where}: {overrides}"
        cfg = compose_config(overrides)
        if {"train", "sweep"} & set(stages_of(cfg)):
            check_config(cfg)
        if cfg.cluster.node.gpus and cfg.cluster.name != "gpu_node":  # a cluster whose nodes share a mount
            assert cfg.plan or cfg.paths.root.startswith(SHARED_MOUNT + "/"), \
                f"{where}: {overrides} must put paths.root under {SHARED_MOUNT}, which every node mounts"


# --------------------------------------------------------------------------- the Ray cluster-launcher YAMLs

@pytest.mark.parametrize("file, preset_name", LAUNCHER_YAMLS.items())
def test_cluster_launcher_yaml_passes_rays_checks(file, preset_name):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = documents(REPO_ROOT / "cluster" / file)[0]
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's defaults merged in, as `ray up` does


@pytest.mark.parametrize("file, preset_name", LAUNCHER_YAMLS.items())
def test_cluster_launcher_yaml_matches_its_preset(file, preset_name):
    config, cfg = documents(REPO_ROOT / "cluster" / file)[0], preset(preset_name)
    assert cfg.autoscaling and cfg.image
    assert config["docker"]["image"] == cfg.image
    assert f"--volume {SHARED_MOUNT}:{SHARED_MOUNT}" in config["docker"]["run_options"]
    assert any(f" {SHARED_MOUNT}" in command for command in config["initialization_commands"]), "mount the share"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "no training workers or data tasks on the head"
    (gpu_type,) = [node for name, node in config["available_node_types"].items() if name != config["head_node_type"]]
    assert gpu_type["resources"] == {"CPU": cfg.node.cpus, "GPU": cfg.node.gpus}
    assert gpu_type["min_workers"] == 0 and gpu_type["max_workers"] == cfg.max_nodes == config["max_workers"]
    node_config = gpu_type["node_config"]
    if config["provider"]["type"] == "aws":
        assert node_config["InstanceType"] == cfg.node.instance_type
    else:
        assert config["provider"]["type"] == "gcp" and node_config["machineType"] == cfg.node.instance_type
        assert [accelerator["acceleratorCount"] for accelerator in node_config["guestAccelerators"]] == [cfg.node.gpus]
    (head_start,) = [command for command in config["head_start_ray_commands"] if "ray start" in command]
    flags = ("--head", "--port=6379", "--dashboard-host=0.0.0.0", "--autoscaling-config=~/ray_bootstrap_config.yaml")
    assert all(flag in head_start for flag in flags), head_start
    assert any("ray start --address=$RAY_HEAD_IP:6379" in command for command in config["worker_start_ray_commands"])


# ---------------------------------------------------------------------------------------- the KubeRay manifests

def test_kuberay_manifests_are_well_formed():
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        kinds = []
        for doc in documents(path):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys() and doc["metadata"].get("name"), path.name
            kinds.append(doc["kind"])
            if doc["kind"].startswith("Ray"):
                assert doc["apiVersion"] == "ray.io/v1", path.name
            if doc["kind"] == "PersistentVolumeClaim":
                assert doc["spec"]["accessModes"] == ["ReadWriteMany"], f"{path.name}: every pod mounts the claim"
        assert sum(kind.startswith("Ray") for kind in kinds) == 1, f"{path.name}: one Ray resource per file"
    claims = [kuberay_object(path.name, "PersistentVolumeClaim") for path in sorted(KUBERAY_DIR.glob("*.yaml"))]
    assert all(claim == claims[0] for claim in claims), "the files must define the same shared claim"


def test_kuberay_clusters_match_the_preset():
    cfg = preset(KUBERAY_PRESET)
    claim = kuberay_object("raycluster.yaml", "PersistentVolumeClaim")["metadata"]["name"]
    for file, spec in ray_cluster_specs().items():
        assert spec["rayVersion"] == RAY_PIN, f"{file}: rayVersion must be pyproject's ray pin"
        assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"] == {"mode": "token"}, file
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        (gpu_group,) = spec["workerGroupSpecs"]
        assert gpu_group["minReplicas"] == 0 and gpu_group["replicas"] == 0
        assert 1 <= gpu_group["maxReplicas"] <= cfg.max_nodes, file
        for pod in (head["template"]["spec"], gpu_group["template"]["spec"]):
            (container,) = pod["containers"]
            assert container["image"] == cfg.image, f"{file}: the kuberay preset's image"
            assert {"name": "shared", "mountPath": SHARED_MOUNT} in container["volumeMounts"], file
            assert {"name": "shared", "persistentVolumeClaim": {"claimName": claim}} in pod["volumes"], file
        (worker,) = gpu_group["template"]["spec"]["containers"]
        limits = worker["resources"]["limits"]
        assert worker["resources"]["requests"] == limits, f"{file}: a pod that gets what it asks for"
        assert int(limits["nvidia.com/gpu"]) == cfg.node.gpus and float(limits["cpu"]) == cfg.node.cpus, file
        assert gigabytes(limits["memory"]) == pytest.approx(cfg.node.memory_gb, abs=1.0), file


def test_rayjob_runs_a_training_command_on_the_raycluster_spec():
    job = kuberay_object("rayjob.yaml", "RayJob")["spec"]
    specs = ray_cluster_specs()
    assert specs["rayjob.yaml"] == specs["raycluster.yaml"], "rayjob.yaml's rayClusterSpec is raycluster.yaml's"
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"
    (overrides,) = launch_commands(job["entrypoint"])
    cfg = compose_config(overrides)
    assert cfg.cluster.name == KUBERAY_PRESET and cfg.paths.root.startswith(SHARED_MOUNT + "/")
    assert job["entrypoint"].startswith("cd /app && "), "the image's copy of the repo (cluster/docker/Dockerfile)"
    assert cfg.cluster.num_workers <= cfg.cluster.max_nodes * cfg.cluster.node.gpus


def test_images_are_built_from_our_dockerfile():
    dockerfile = (REPO_ROOT / "cluster" / "docker" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)
    assert base == f"rayproject/ray:{RAY_PIN}-py311-gpu"
    images = {preset(name).image for name in gpu_presets()} - {None}
    assert len(images) == 1 and f"ray{RAY_PIN}-py311-gpu" in images.pop()


# ---------------------------------------------------------------------------------------------- the RayService

def serve_config() -> dict:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(kuberay_object("rayservice.yaml", "RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # what Serve itself accepts
    return config


def test_rayservice_application_agrees_with_the_serve_config():
    from serve.rayservice import compose_config as compose_from_args

    config = serve_config()
    (application,) = config["applications"]
    assert application["import_path"] == "serve.rayservice:app"
    cfg = compose_from_args({**application["args"], "api_key_env": None})
    assert application["name"] == cfg.serve.model, "deploy() names the application after the model"
    assert application["route_prefix"] == cfg.serve.route_prefix
    assert config["http_options"] == {"host": "0.0.0.0", "port": cfg.serve.port}
    (gpu_group,) = ray_cluster_specs()["rayservice.yaml"]["workerGroupSpecs"]
    node = preset(KUBERAY_PRESET).node
    replicas_per_pod = min(node.gpus / cfg.serve.num_gpus if cfg.serve.num_gpus else math.inf,
                           node.cpus / cfg.serve.num_cpus)
    assert gpu_group["maxReplicas"] * replicas_per_pod >= cfg.serve.max_replicas, "room for serve.max_replicas"
    (worker,) = gpu_group["template"]["spec"]["containers"]
    assert application["args"]["api_key_env"] in [variable["name"] for variable in worker["env"]]


def test_rayservice_builds_the_serve_stage_application(tmp_path, monkeypatch):
    """Serve's own builder call on the manifest's args (the registry swapped for a local one holding a production
    version) gives the application `stage=serve` deploys, with the settings of the args."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from serve.rayservice import app, compose_config
    from serve.registry import Registry

    (application,) = serve_config()["applications"]
    args = {**application["args"], "registry": str(tmp_path / "registry")}
    export = tmp_path / "export"
    export.mkdir()
    (export / "model_config.json").write_text("{}")
    registry = Registry(args["registry"])
    version = registry.register(args["model"], export, metadata={"family": "llm"})["version"]
    registry.move_alias(args["model"], "production", version, reason="test")
    monkeypatch.setenv(args["api_key_env"], "secret")

    built = call_user_app_builder_with_args_if_necessary(app, args)
    assert isinstance(built, Application)
    production = built._bound_deployment  # the ingress: HTTP, and production's share computed in place
    canary = production.init_args[0]._bound_deployment
    cfg = compose_config(args)
    assert production.name == "llm_replica" and canary.name == "llm_canary"
    assert production.ray_actor_options == {"num_cpus": cfg.serve.num_cpus, "num_gpus": cfg.serve.num_gpus}
    assert production._deployment_config.autoscaling_config.max_replicas == cfg.serve.max_replicas
    assert production.init_kwargs["settings"]["api_key"] == "secret"
    assert production.init_kwargs["settings"]["registry"] == str(Registry(args["registry"]).uri)


def test_rayservice_builder_names_what_is_wrong(tmp_path):
    from serve.rayservice import app

    with pytest.raises(ValueError, match="args.registry"):
        app({"model": "m", "registry": "relative/registry"})
    with pytest.raises(ValueError, match="args.colour"):
        app({"model": "m", "registry": "/abs", "colour": "red"})
    with pytest.raises(ValueError, match="has no production version"):
        app({"model": "m", "registry": str(tmp_path / "empty")})
    with pytest.raises(ValueError, match="stage=canary"):
        app({"model": "m", "registry": str(tmp_path), "overrides": ["serve.canary_version=2"]})
