"""The model deployments' autoscaling reacts to a load step within seconds (issue 16): their AutoscalingConfig
carries a short metrics push period and look-back window, and the installed Ray still takes those from the
deployment's config rather than from environment variables. No Ray cluster needed: the application graph is
built, not run."""

import inspect
import re
import warnings
from pathlib import Path

import pytest

from conf.schema import ServeConfig
from serve.deploy import build_app
from serve.deployments import AUTOSCALING_LOOK_BACK_S, AUTOSCALING_METRICS_INTERVAL_S

PUSH_INTERVAL_ENV_VARS = ("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
                          "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S")


def deployments_of(app) -> dict:
    """Deployment name -> Deployment of every deployment in an application graph."""
    from ray.serve.deployment import Application

    found, pending = {}, [app]
    while pending:
        deployment = pending.pop()._bound_deployment
        found[deployment.name] = deployment
        pending += [arg for arg in (*deployment.init_args, *deployment.init_kwargs.values())
                    if isinstance(arg, Application)]
    return found


@pytest.mark.parametrize("family", ["llm", "ranker"])
def test_model_deployments_carry_fast_autoscaling_metrics(tmp_path, family):
    cfg = ServeConfig(registry=str(tmp_path / "registry"), target_ongoing_requests=3.0, upscale_delay_s=1.5,
                      downscale_delay_s=45.0, max_replicas=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app = build_app(cfg, model="m", family=family)
    # Serve warns (for now) when the look-back window is not longer than the push period: it would average nothing.
    assert not [w for w in caught if "look_back_period_s" in str(w.message)]
    deployments = deployments_of(app)
    autoscaled = {name: deployment._deployment_config.autoscaling_config for name, deployment in deployments.items()
                  if deployment._deployment_config.autoscaling_config is not None}
    assert {f"{family}_replica", f"{family}_canary"} <= set(autoscaled)
    for name, config in autoscaled.items():
        assert (config.metrics_interval_s, config.look_back_period_s) == (AUTOSCALING_METRICS_INTERVAL_S,
                                                                           AUTOSCALING_LOOK_BACK_S), name
        assert config.metrics_interval_s <= 1.0 < config.look_back_period_s <= 10.0
        # The user's settings are kept alongside.
        assert (config.target_ongoing_requests, config.upscale_delay_s, config.downscale_delay_s,
                config.max_replicas) == (3.0, 1.5, 45.0, 4), name
    assert autoscaled[f"{family}_canary"].min_replicas == 0


def test_ray_takes_the_push_period_from_the_deployment_config():
    """Ray 2.60 pushes a handle's (and a replica's) autoscaling metrics every metrics_interval_s of the deployment's
    config and never reads the environment variables that its deprecation note names. If an upgrade reads them,
    the per-deployment setting may stop counting: then set them where the handles live (the router replicas'
    runtime_env env_vars) and on the replicas, and update serve/deploy.py's comment."""
    import ray
    from ray.serve._private.replica import ReplicaMetricsManager
    from ray.serve._private.router import RouterMetricsManager

    for method in (RouterMetricsManager.update_deployment_config, ReplicaMetricsManager.start_metrics_pusher):
        source = inspect.getsource(method)
        assert "autoscaling_config.metrics_interval_s" in source, method.__qualname__
        assert "autoscaling_config.look_back_period_s" in source, method.__qualname__
    serve_dir = Path(ray.__file__).resolve().parent / "serve"
    for name in PUSH_INTERVAL_ENV_VARS:
        readers = [path.relative_to(serve_dir) for path in serve_dir.rglob("*.py") if "tests" not in path.parts
                   and path.name not in ("constants.py", "config.py")
                   and re.search(rf"\b{name}\b", path.read_text(errors="replace"))]
        assert not readers, f"{name} is now read by {readers}: see this test's docstring"
