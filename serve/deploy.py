"""Deploy a registry model as a Ray Serve application: one router (the HTTP ingress) and two autoscaled model
deployments of the family's replica class, one for the production alias and one for the canary alias. Apart, a
canary that fails its health checks gets only its own replicas restarted; the router then stops sending it
traffic (serve/router.py).

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
from serve import api
from serve.registry import Registry
from serve.replicas import replica_cache_dir, replica_class

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0


def serve_settings(serve_cfg: ServeConfig, *, model: str, family: str) -> dict:
    """What the router and the replicas need, as a plain dict (it travels to Ray actors)."""
    return {"model": model, "family": family, "routes": list(replica_class(family).ROUTES),
            "registry": str(Registry(serve_cfg.registry).uri),
            "api_key": serve_cfg.api_key, "refresh_s": serve_cfg.refresh_s,
            "max_tokens_limit": serve_cfg.max_tokens_limit, "max_candidates": serve_cfg.max_candidates,
            "max_batch_size": serve_cfg.max_batch_size, "batch_wait_timeout_s": serve_cfg.batch_wait_timeout_s,
            "max_body_bytes": serve_cfg.max_body_bytes, "max_running_requests": serve_cfg.max_running_requests,
            "max_batched_tokens": serve_cfg.max_batched_tokens, "max_queued_requests": serve_cfg.max_queued_requests,
            "ongoing_limit": replica_class(family).ongoing_limit(serve_cfg)}


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

    _check_serve_config(serve_cfg)
    if serve_cfg.engine == ServeEngine.vllm:
        from serve.vllm_app import build_vllm_app

        return build_vllm_app(serve_cfg, model=model)
    settings = serve_settings(serve_cfg, model=model, family=family)
    # The canary scales to zero while there is none; the production replicas' first check brings up its first.
    canary = _replica_deployment(serve_cfg, family=family, name=f"{family}_canary", min_replicas=0,
                                 initial_replicas=0)
    production = ingress_deployment(serve_cfg, Router, family=family, settings=settings,
                                    user_config={"preload_aliases": True})
    return production.bind(canary.bind({**settings, "role": "canary"}), settings=settings)


def ingress_deployment(serve_cfg: ServeConfig, ingress: type, *, family: str, settings: dict,
                       user_config: dict | None = None, num_gpus: float | None = None):
    """The HTTP ingress's deployment, `<family>_replica`. It refuses requests beyond settings["ongoing_limit"]
    itself, in OpenAI's shape. Serve lets many more through so that they reach it (a refusal costs a parse), and
    the proxy's queue behind that is as deep: the proxy counts a burst of arrivals as queued until each is
    assigned, and its own refusal is a plain-text 503."""
    concurrency = max(64, 4 * settings["ongoing_limit"])
    return _replica_deployment(serve_cfg, family=family, name=f"{family}_replica",
                               min_replicas=serve_cfg.min_replicas, initial_replicas=max(serve_cfg.min_replicas, 1),
                               ingress=ingress, max_ongoing_requests=concurrency,
                               max_queued_requests=max(concurrency, serve_cfg.max_queued_requests),
                               user_config=user_config, num_gpus=num_gpus)


def _replica_deployment(serve_cfg: ServeConfig, *, family: str, name: str, min_replicas: int,
                        initial_replicas: int, ingress: type | None = None, max_ongoing_requests: int | None = None,
                        max_queued_requests: int | None = None, user_config: dict | None = None,
                        num_gpus: float | None = None):
    """The family's replica class as an autoscaled deployment, or `ingress` (the Router, which holds one; the
    vLLM ingress, which holds none). Serve awaits each replica's reconfigure(user_config) before it serves."""
    from ray import serve

    return serve.deployment(ingress or replica_class(family)).options(
        name=name,
        autoscaling_config=autoscaling_config(serve_cfg, min_replicas=min_replicas, initial_replicas=initial_replicas),
        ray_actor_options={"num_cpus": serve_cfg.num_cpus,
                           "num_gpus": serve_cfg.num_gpus if num_gpus is None else num_gpus},
        max_ongoing_requests=max_ongoing_requests or replica_class(family).ongoing_limit(serve_cfg),
        user_config={"preload_aliases": True} if ingress is None else user_config,
        health_check_period_s=serve_cfg.health_check_period_s,
        graceful_shutdown_timeout_s=serve_cfg.graceful_shutdown_timeout_s,
        **_queue_options(max_queued_requests or serve_cfg.max_queued_requests),
    )


# How fresh the autoscaler's view of the load is. In Ray 2.60 every handle that calls a deployment (Serve's proxies
# for the ingress, our replicas for the canary) samples the requests it has queued and ongoing there every
# min(metrics_interval_s, look_back_period_s / 5) and pushes them to the controller every metrics_interval_s
# (ray/serve/_private/router.py RouterMetricsManager.update_deployment_config; replica.py likewise where replicas
# report); the controller averages what it got over look_back_period_s. Serve's defaults, 10 s and 30 s, put the
# first sight of a load step up to 10 s late and dilute it with 30 s of the load before: 10-11 s from a step to
# a second replica asked for (scripts/bench_serve.py --parts autoscaling). Half a second and 5 s: the decision
# then waits mostly for upscale_delay_s, which is the user's to set; the cost is two small calls a second from
# each calling handle to the controller. Both are per-deployment settings that travel with the application, so
# they hold on an embedded Ray and on any cluster with nothing set there. Ray marks metrics_interval_s deprecated
# in favour of RAY_SERVE_{HANDLE,REPLICA}_AUTOSCALING_METRIC_PUSH_INTERVAL_S, but 2.60 defines those variables
# without reading them (tests/serve/test_autoscaling_settings.py checks this).
AUTOSCALING_METRICS_INTERVAL_S = 0.5
AUTOSCALING_LOOK_BACK_S = 5.0


def autoscaling_config(serve_cfg: ServeConfig, *, min_replicas: int, initial_replicas: int) -> dict:
    """Ray Serve's AutoscalingConfig of a model deployment."""
    return {"min_replicas": min_replicas, "max_replicas": serve_cfg.max_replicas,
            "initial_replicas": initial_replicas, "target_ongoing_requests": serve_cfg.target_ongoing_requests,
            "upscale_delay_s": serve_cfg.upscale_delay_s, "downscale_delay_s": serve_cfg.downscale_delay_s,
            "metrics_interval_s": AUTOSCALING_METRICS_INTERVAL_S, "look_back_period_s": AUTOSCALING_LOOK_BACK_S}


def _queue_options(depth: int) -> dict:
    """A bounded queue at each caller: beyond it the canary's handle (in a production replica) raises
    BackPressureError, answered 503 in OpenAI's shape, and the proxy answers 503 itself for the production
    deployment; both say when to retry."""
    from ray.serve.config import BackpressureConfig

    return {"max_queued_requests": depth,
            "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=api.RETRY_AFTER_S)}


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
    from serve.promote import set_canary

    vllm = cfg.serve.engine == ServeEngine.vllm
    if vllm:  # what is missing is said before the registry changes or Ray starts
        from serve.vllm_app import llm_configs, require_ray_serve_llm

        require_ray_serve_llm()
    if cfg.serve.canary_version is not None:
        set_canary(cfg.serve, model=model)
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

