"""Deploy a registry model as a Ray Serve application and run the serve stage.

With serve.engine=native (any family): the production deployment, which is the HTTP ingress and holds the model
(serve/router.py), and the canary's deployment of the family's replica class. Apart, a canary that fails its
health checks gets only its own replicas restarted; production then stops sending it traffic. With
serve.engine=vllm (LLMs on GPUs): serve/vllm_app.py. The deployments' options live in serve/deployments.py.

    python launch.py stage=serve serve.model=llm_tiny
"""

import errno
import json
import logging
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

from conf.schema import RootConfig, ServeConfig, ServeEngine
from serve.deployments import ingress_deployment, replica_deployment, serve_settings
from serve.registry import Registry
from serve.replicas import replica_cache_dir, replica_class

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0


def _check_serve_config(serve_cfg: ServeConfig) -> None:
    if not 0 <= serve_cfg.min_replicas <= serve_cfg.max_replicas or serve_cfg.max_replicas < 1:
        raise ValueError(f"serve.min_replicas={serve_cfg.min_replicas} and serve.max_replicas="
                         f"{serve_cfg.max_replicas} must satisfy 0 <= min <= max and max >= 1")
    if serve_cfg.target_ongoing_requests <= 0:
        raise ValueError(f"serve.target_ongoing_requests must be positive, got {serve_cfg.target_ongoing_requests}")
    if serve_cfg.num_cpus < 0 or serve_cfg.num_gpus < 0:
        raise ValueError("serve.num_cpus and serve.num_gpus must not be negative")
    if not serve_cfg.route_prefix.startswith("/"):
        raise ValueError(f"serve.route_prefix={serve_cfg.route_prefix!r} must start with '/'")
    if not 1 <= serve_cfg.port <= 65535:
        raise ValueError(f"serve.port={serve_cfg.port} is not a TCP port")
    if serve_cfg.max_queued_requests < 1:
        raise ValueError(f"serve.max_queued_requests={serve_cfg.max_queued_requests} must be at least 1: an unbounded "
                         "queue turns overload into ever longer waits instead of a 503 that clients can retry")
    if serve_cfg.max_running_requests < 1:
        raise ValueError(f"serve.max_running_requests={serve_cfg.max_running_requests} must be at least 1")
    if serve_cfg.max_batched_tokens < serve_cfg.max_running_requests:
        raise ValueError(f"serve.max_batched_tokens={serve_cfg.max_batched_tokens} must be at least "
                         f"serve.max_running_requests={serve_cfg.max_running_requests}: each running sequence "
                         "decodes one token in every engine step")
    if serve_cfg.max_body_bytes < 1024:
        raise ValueError(f"serve.max_body_bytes={serve_cfg.max_body_bytes} must be at least 1024")


def build_app(serve_cfg: ServeConfig, *, model: str, family: str):
    """The Serve application graph. With serve.engine=native: the production deployment, which is also the HTTP
    ingress (serve/router.py: proxy -> the replica that computes), and the canary's deployment of the family's
    replica class (serve/replicas.py), which the production replicas call for the canary's share. The production
    deployment keeps the name `<family>_replica`. With serve.engine=vllm: serve/vllm_app.py."""
    from serve.router import Router
    from serve.watcher import watcher_deployment

    _check_serve_config(serve_cfg)
    if serve_cfg.engine == ServeEngine.vllm:
        from serve.vllm_app import build_vllm_app

        return build_vllm_app(serve_cfg, model=model)
    settings = serve_settings(serve_cfg, model=model, family=family)
    # The canary and the shadow scale to zero while there is none; the production replicas' first check brings
    # up the first replica of each.
    canary, shadow = (replica_deployment(serve_cfg, family=family, name=f"{family}_{role}", min_replicas=0,
                                         initial_replicas=0).bind({**settings, "role": role})
                      for role in ("canary", "shadow"))
    production = ingress_deployment(serve_cfg, Router, family=family, settings=settings,
                                    user_config={"preload_aliases": True})
    return production.bind(canary, watcher_deployment().bind(settings), shadow, settings=settings)


def production_version(registry: Registry, model: str) -> tuple[int, str]:
    """The version the production alias names and its model family (which replica class build_app uses)."""
    production = registry.resolve(model, "production")
    if production is None:
        raise ValueError(f"serve.model={model} has no production version in {registry.uri}: promote one first "
                         f"(stage=promote serve.source=<run_dir>)")
    return production, registry.version(model, production)["family"]


def deploy(serve_cfg: ServeConfig, *, model: str) -> str:
    """Start (or update) the model's application on the connected Ray cluster; returns the endpoint URL."""
    from ray import serve

    _check_serve_config(serve_cfg)
    registry = Registry(serve_cfg.registry)
    production, family = production_version(registry, model)
    # Refuse a version whose files fail their checksums here, by name, rather than in every replica.
    for alias in ("production", "canary"):
        if registry.resolve(model, alias) is not None:
            registry.fetch(model, registry.resolve(model, alias), cache_dir=replica_cache_dir())
    _start_serve(serve_cfg)
    serve.run(build_app(serve_cfg, model=model, family=family), name=model, route_prefix=serve_cfg.route_prefix)
    url = f"http://{serve_cfg.host}:{serve_cfg.port}{serve_cfg.route_prefix.rstrip('/')}"
    logger.info("serving %s (production v%d) at %s", model, production, url)
    return url


def _start_serve(serve_cfg: ServeConfig) -> None:
    """Start Serve's HTTP proxy on serve.host:serve.port, or check that the running one listens there: Serve
    keeps the address it started with and would silently ignore a new one."""
    from ray import serve
    from ray.serve.context import _get_global_client

    if _get_global_client(raise_if_no_controller_running=False) is None:
        _check_port_free(serve_cfg)
    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    running = _get_global_client().http_config
    if (running.host, running.port) != (serve_cfg.host, serve_cfg.port):
        raise ValueError(
            f"Ray Serve on this cluster already listens on {running.host}:{running.port}; serve.host="
            f"{serve_cfg.host} serve.port={serve_cfg.port} cannot change that while it runs: use those values or "
            f"shut Serve down first (serve shutdown)"
        )


def _check_port_free(serve_cfg: ServeConfig) -> None:
    """Refuse a port that another program listens on, before Serve starts: its proxy could not bind there, and
    the sample request (with the API key) would go to that program. Checked on the head node, where the proxy
    runs (a local Ray's head is this machine)."""
    import ray

    probe = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001})(_bind_error)
    problem = ray.get(probe.remote(serve_cfg.host, serve_cfg.port), timeout=60)
    if problem == "in use":
        raise ValueError(f"serve.port={serve_cfg.port}: another program already listens on {serve_cfg.host}:"
                         f"{serve_cfg.port}; choose a free serve.port or stop that program")
    if problem:
        raise ValueError(f"serve.host={serve_cfg.host} serve.port={serve_cfg.port}: cannot listen there on the head "
                         f"node: {problem}")


def _bind_error(host: str, port: int) -> str | None:
    """None if (host, port) can be bound now, "in use" if something listens there, else the OS's reason."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError as err:
            return "in use" if err.errno == errno.EADDRINUSE else str(err)
    return None


# ----------------------------------------------------------------------------------- the serve stage

def post_json(url: str, body: dict, *, api_key: str | None = None, timeout: float = 60.0) -> dict:
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _check_serving(url: str, *, model: str) -> None:
    """Our router answers the endpoint's /healthz (open, so no key is sent): whatever answers otherwise is not
    ours and must not receive the sample request and its API key."""
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            health = json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as err:
        health = f"{type(err).__name__}: {err}"
    if not isinstance(health, dict) or health.get("model") != model:
        raise ValueError(f"{url}/healthz is not answered by Slipway's router for {model} (got {str(health)[:200]}): "
                         f"another program may listen on serve.port; not sending the sample request there")


def _curl(url: str, body: dict, *, api_key: str | None) -> str:
    # Double quotes so the shell fills in the key: it is never printed.
    auth = ' -H "Authorization: Bearer $SLIPWAY_API_KEY"' if api_key else ""
    return f"curl -s {url} -H 'Content-Type: application/json'{auth} -d '{json.dumps(body)}'"


def _print_sample(serve_cfg: ServeConfig, *, url: str, model: str) -> None:
    registry = Registry(serve_cfg.registry)
    version = registry.resolve(model, "production")
    replica = replica_class(registry.version(model, version)["family"])
    # A family that needs the export for its sample (a ranker's feature spec) fetches it; others do not fetch
    # (and hash) it again.
    route, body = replica.sample_request(
        serve_cfg, model=model, fetch_export=lambda: registry.fetch(model, version, cache_dir=replica_cache_dir()))
    _check_serving(url, model=model)
    answer = post_json(url + route, body, api_key=serve_cfg.api_key)
    shown = replica.describe_sample(body, answer, url=url, model=model)
    hint = "\n  (first: export SLIPWAY_API_KEY=<the serve.api_key you set>)" if serve_cfg.api_key else ""
    print(f"\nsample {route} answered by {model} v{answer['model_version']}: {shown}\ntry it:\n  "
          f"{_curl(url + route, body, api_key=serve_cfg.api_key)}{hint}\n", flush=True)


def serve_endpoint(cfg: RootConfig, *, model: str) -> str:
    """The serve stage: apply canary settings, deploy, show a sample answer, then serve until Ctrl-C (or return
    at once with serve.block=false)."""
    from cluster.connection import connect
    from serve.promote import set_canary, set_shadow

    vllm = cfg.serve.engine == ServeEngine.vllm
    if vllm:  # what is missing is said before the registry changes or Ray starts
        from serve.vllm_app import llm_configs, require_ray_serve_llm

        require_ray_serve_llm()
    if cfg.serve.canary_version is not None:
        set_canary(cfg.serve, model=model)
    if cfg.serve.shadow_version is not None:
        set_shadow(cfg.serve, model=model)
    if vllm:
        llm_configs(cfg.serve, model=model)
    connect(cfg.cluster)
    url = deploy(cfg.serve, model=model)
    _print_sample(cfg.serve, url=url, model=model)
    if cfg.serve.block:
        _block_until_interrupted(model, url=url)
    return url


def _block_until_interrupted(model: str, *, url: str) -> None:
    """Serve until Ctrl-C or SIGTERM, then let in-flight requests finish.

    Our own handlers, because the SIGINT handler left in place by an earlier Ray Train fit() in this process
    swallows Ctrl-C once its run has ended."""
    from ray import serve

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    logger.info("serving %s at %s until Ctrl-C (rollback from another shell: python launch.py stage=rollback "
                "serve.model=%s)", model, url, model)
    try:
        while not stop.wait(1.0):  # a timeout keeps the wait interruptible everywhere
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("stopping %s: letting in-flight requests finish", model)
    serve.delete(model)


def wait_until_serving(url: str, *, timeout_s: float = READY_TIMEOUT_S) -> dict:
    """GET /healthz until the router answers (after a deploy or a restart)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer /healthz within {timeout_s:.0f} s: {err}") from err
            time.sleep(0.5)

