"""How Slipway's Serve deployments are configured, for either engine (serve/deploy.py builds the native one,
serve/vllm_app.py the vLLM one): the settings the ingress and the replicas get, the ingress's and the replicas'
deployment options, autoscaling, and the bounded queues in front of them.
"""

import dataclasses

from conf.schema import ServeConfig
from serve import api
from serve.registry import Registry
from serve.replicas import replica_class


def serve_settings(serve_cfg: ServeConfig, *, model: str, family: str) -> dict:
    """What the router and the replicas need, as a plain dict (it travels to Ray actors)."""
    return {"model": model, "family": family, "routes": list(replica_class(family).ROUTES),
            "registry": str(Registry(serve_cfg.registry).uri),
            "api_key": serve_cfg.api_key, "refresh_s": serve_cfg.refresh_s,
            "max_tokens_limit": serve_cfg.max_tokens_limit, "max_candidates": serve_cfg.max_candidates,
            "max_batch_size": serve_cfg.max_batch_size, "batch_wait_timeout_s": serve_cfg.batch_wait_timeout_s,
            "max_body_bytes": serve_cfg.max_body_bytes, "max_running_requests": serve_cfg.max_running_requests,
            "max_batched_tokens": serve_cfg.max_batched_tokens, "max_queued_requests": serve_cfg.max_queued_requests,
            "ongoing_limit": replica_class(family).ongoing_limit(serve_cfg),
            "monitor": dataclasses.asdict(serve_cfg.monitor)}


def ingress_deployment(serve_cfg: ServeConfig, ingress: type, *, family: str, settings: dict,
                       user_config: dict | None = None, num_gpus: float | None = None):
    """The HTTP ingress's deployment, `<family>_replica`. It refuses requests beyond settings["ongoing_limit"]
    itself, in OpenAI's shape. Serve lets many more through so that they reach it (a refusal costs a parse), and
    the proxy's queue behind that is as deep: the proxy counts a burst of arrivals as queued until each is
    assigned, and its own refusal is a plain-text 503."""
    concurrency = max(64, 4 * settings["ongoing_limit"])
    return replica_deployment(serve_cfg, family=family, name=f"{family}_replica",
                              min_replicas=serve_cfg.min_replicas, initial_replicas=max(serve_cfg.min_replicas, 1),
                              ingress=ingress, max_ongoing_requests=concurrency,
                              max_queued_requests=max(concurrency, serve_cfg.max_queued_requests),
                              user_config=user_config, num_gpus=num_gpus)


def replica_deployment(serve_cfg: ServeConfig, *, family: str, name: str, min_replicas: int,
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
