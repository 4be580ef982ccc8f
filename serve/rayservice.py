"""The Ray Serve application of a RayService (cluster/kuberay/rayservice.yaml): Ray Serve's "application builder"
for serveConfigV2, which composes the Slipway config from its args and returns what `stage=serve` deploys.

    serveConfigV2: |
      applications:
        - name: llm_8b_zero3
          route_prefix: /
          import_path: serve.rayservice:app
          args:
            model: llm_8b_zero3                       # serve.model: the registry's model name
            registry: s3://my-bucket/slipway/registry  # serve.registry
            overrides: [serve.num_gpus=1, serve.max_replicas=8]   # any Hydra overrides, as on the command line
            api_key_env: SLIPWAY_API_KEY              # optional: serve.api_key from this environment variable

Serve calls app(args) on the cluster (the image has this repo on PYTHONPATH, see cluster/docker/Dockerfile). The
endpoint's address and route come from serveConfigV2 (http_options, route_prefix), not from serve.host/port.
Unlike the serve stage, the builder neither moves aliases (serve.canary_version: run `python launch.py
stage=canary ...` from anywhere, the router picks the change up) nor downloads the production export to check it:
every replica checks the checksums of what it loads.
"""

import logging
import os
from pathlib import Path

from conf.schema import RootConfig

logger = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
ARGS = ("model", "registry", "exp", "overrides", "api_key_env")


def app(args: dict):
    """The Serve application (the production deployment as ingress, and the canary's) that `stage=serve` deploys
    for these args."""
    from serve.deploy import build_app, production_version
    from serve.registry import Registry

    cfg = compose_config(args)
    model = cfg.serve.model
    for arm in ("canary", "shadow"):
        if getattr(cfg.serve, f"{arm}_version") is not None:
            raise ValueError(f"serve.{arm}_version: a RayService does not move aliases; set the {arm} with "
                             f"`python launch.py stage={arm} serve.model={model} serve.registry={cfg.serve.registry} "
                             f"serve.{arm}_version=N serve.{arm}_percent=P` (the replicas pick it up)")
    _, family = production_version(Registry(cfg.serve.registry), model)
    logger.info("building the %s application for %s from %s", family, model, cfg.serve.registry)
    return build_app(cfg.serve, model=model, family=family)


def compose_config(args: dict) -> RootConfig:
    """The typed config that `python launch.py [+exp=EXP] serve.model=MODEL serve.registry=REGISTRY OVERRIDES`
    would run with, plus serve.api_key from the environment variable that args["api_key_env"] names."""
    from hydra import compose, initialize_config_dir

    from trainers.config import config_from_dict, plain_config, register_configs

    overrides = _overrides(args)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = config_from_dict(plain_config(compose(config_name="config", overrides=overrides)))
    if args.get("api_key_env"):
        name = args["api_key_env"]
        if not os.environ.get(name):
            raise ValueError(f"args.api_key_env={name!r}: the environment variable {name} is not set on this node "
                             "(the manifest sets it from a Secret)")
        cfg.serve.api_key = os.environ[name]
    return cfg


def _overrides(args: dict) -> list[str]:
    if not isinstance(args, dict):
        raise ValueError(f"args: expected a mapping of {', '.join(ARGS)}, got {type(args).__name__}")
    if unknown := sorted(set(args) - set(ARGS)):
        raise ValueError(f"args.{unknown[0]}: unknown; the builder takes {', '.join(ARGS)}")
    model = args.get("model") or args.get("exp")  # as launch.py: serve.model, else the experiment's name
    registry = args.get("registry")
    if not isinstance(model, str) or not model:
        raise ValueError("args.model: name the registry model to serve (or args.exp, whose name it then is)")
    if not isinstance(registry, str) or not ("://" in registry or os.path.isabs(registry)):
        raise ValueError(f"args.registry={registry!r}: give the registry as a URI (s3://..., gs://...) or an absolute "
                         "path on storage every node sees; a relative path means nothing on a cluster")
    extra = args.get("overrides") or []
    if not isinstance(extra, list) or not all(isinstance(item, str) for item in extra):
        raise ValueError(f"args.overrides: expected a list of Hydra overrides (strings), got {extra!r}")
    exp = [f"+exp={args['exp']}"] if args.get("exp") else []
    return [*exp, f"serve.model={model}", f"serve.registry={registry}", *extra]
