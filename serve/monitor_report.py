"""stage=monitor: what a served model is doing now, per version and arm, printed and plotted.

    python launch.py stage=monitor serve.model=ranker_dlrm
    python launch.py stage=monitor serve.model=ranker_dlrm serve.monitor.prometheus_url=http://127.0.0.1:9090

From the endpoint (GET /v1/monitor, the application's watcher, over serve.monitor.quality_window_s): traffic,
server errors, latency percentiles, live quality from feedback (AUC, logloss, calibration error; LLMs: the mean
feedback score) and the label-free estimate from the scores alone (what AUC and logloss would be were the scores
calibrated), which is all there is until labels arrive. Drift per feature (the largest PSI of any replica over its
serve.monitor.drift_window_s) and the alerts firing come from Prometheus when serve.monitor.prometheus_url names
one; without it, drift is scraped from the metrics agents of the Ray session on this machine, and alerts, which
only Prometheus evaluates, are not shown. `<paths.root>/monitor/<model>/monitor.png` plots the same, and
monitor.json holds it.
"""

import json
import logging
import math
import urllib.parse
import urllib.request
from pathlib import Path

from serve.drift import PSI_MAJOR
from serve.endpoint import endpoint_of

logger = logging.getLogger(__name__)

LOCAL_TARGETS = Path("/tmp/ray/prom_metrics_service_discovery.json")  # Ray writes its agents' metrics ports here
PSI_METRIC = "ray_slipway_feature_psi"
PREDICTION_PSI_METRIC = "ray_slipway_prediction_psi"


def _prometheus(url: str, query: str) -> list[dict]:
    path = f"{url.rstrip('/')}/api/v1/query?query={urllib.parse.quote(query)}"
    with urllib.request.urlopen(path, timeout=15) as response:
        return json.loads(response.read())["data"]["result"]


def drift_from_prometheus(url: str, *, model: str) -> tuple[dict, list[dict]]:
    """{(version, arm): {feature: largest PSI}} and the Slipway alerts firing for the model."""
    drift: dict = {}
    for metric, feature in ((PSI_METRIC, None), (PREDICTION_PSI_METRIC, "score")):
        by = "version, arm" + (", feature" if feature is None else "")
        for series in _prometheus(url, f'max by ({by}) ({metric}{{model="{model}"}})'):
            labels = series["metric"]
            key = (int(labels["version"]), labels["arm"])
            drift.setdefault(key, {})[feature or labels["feature"]] = float(series["value"][1])
    with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/alerts", timeout=15) as response:
        alerts = json.loads(response.read())["data"]["alerts"]
    firing = [{"alert": alert["labels"]["alertname"], **{k: v for k, v in alert["labels"].items()
                                                         if k in ("version", "arm", "feature", "severity")}}
              for alert in alerts if alert["state"] == "firing" and alert["labels"].get("model") == model]
    return drift, firing


def drift_from_local_ray(*, model: str, targets_file: Path = LOCAL_TARGETS) -> dict:
    """The same drift, scraped from the metrics agents of the Ray session on this machine (the ports Ray lists
    for Prometheus' file-based discovery)."""
    from prometheus_client.parser import text_string_to_metric_families

    drift: dict = {}
    targets = [target for group in json.loads(targets_file.read_text()) for target in group["targets"]]
    for target in targets:
        try:
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
                text = response.read().decode()
        except OSError:  # an agent that went away with its worker
            continue
        for family in text_string_to_metric_families(text):
            if family.name not in (PSI_METRIC, PREDICTION_PSI_METRIC):
                continue
            for sample in family.samples:
                labels = sample.labels
                if labels.get("model") != model or not math.isfinite(sample.value):
                    continue
                feature = labels.get("feature", "score")
                features = drift.setdefault((int(labels["version"]), labels["arm"]), {})
                features[feature] = max(features.get(feature, 0.0), sample.value)
    return drift


def _number(value, pattern: str = "{:.4f}") -> str:
    return "-" if value is None else pattern.format(value)


def format_report(model: str, summary: dict, drift: dict, alerts: list[dict] | None, *,
                  lineage: dict[int, str] | None = None) -> str:
    lines = [f"{model}: the last {summary['window_s']:g} s per version and arm",
             f"{'version':<8} {'arm':<11} {'requests':>8} {'5xx':>5} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
             f"{'labelled':>8} {'auc':>7} {'logloss':>7} {'calib':>6} {'est auc':>7} {'est ll':>7} {'feedback':>8}"]
    for arm in summary["arms"]:
        lines.append(
            f"v{arm['version']:<7} {arm['arm']:<11} {arm['requests']:>8} {arm['errors']:>5} "
            f"{_number(arm['latency_p50_ms'], '{:.1f}'):>7} {_number(arm['latency_p90_ms'], '{:.1f}'):>7} "
            f"{_number(arm['latency_p99_ms'], '{:.1f}'):>7} {arm['labelled_rows'] + arm['feedback_rows']:>8} "
            f"{_number(arm['auc']):>7} {_number(arm['logloss']):>7} {_number(arm['calibration_error'], '{:.3f}'):>6} "
            f"{_number(arm['estimated_auc']):>7} {_number(arm['estimated_logloss']):>7} "
            f"{_number(arm['feedback_score'], '{:.3f}'):>8}")
    for version, derived in sorted((lineage or {}).items()):
        lines.append(f"v{version} is a child: {derived} (stage=optimize)")
    lines.append(f"feedback: {summary['feedback']}")
    lines.append(f"drift (largest PSI of any replica; {PSI_MAJOR:g} and over is a major shift):")
    for (version, arm), features in sorted(drift.items()):
        shifted = sorted((psi, name) for name, psi in features.items() if psi >= PSI_MAJOR)
        worst = max(features.items(), key=lambda item: item[1])
        lines.append(f"  v{version} {arm}: {len(features)} features, largest {worst[0]} {worst[1]:.3f}; "
                     f"shifted: {', '.join(f'{name} {psi:.2f}' for psi, name in reversed(shifted)) or 'none'}")
    if not drift:
        lines.append("  none published yet (replicas publish every serve.monitor.publish_interval_s once they serve)")
    if alerts is None:
        lines.append("alerts: set serve.monitor.prometheus_url to a Prometheus that loads "
                     "cluster/monitoring/slipway_rules.yml to see the alerts firing")
    else:
        lines.append("alerts firing: " + (", ".join(
            f"{alert['alert']}({', '.join(f'{k}={v}' for k, v in alert.items() if k != 'alert')})"
            for alert in alerts) or "none"))
    return "\n".join(lines)


def plot_report(path: Path, model: str, summary: dict, drift: dict, *, lineage: dict[int, str] | None = None) -> None:
    """Four panels: traffic and 5xx, latency percentiles, quality (live and estimated), PSI per feature."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    names = [f"{_version_name(arm['version'], lineage or {})} {arm['arm']}" for arm in arms]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    positions = range(len(arms))
    axes[0][0].bar(positions, [arm["requests"] for arm in arms], label="requests")
    axes[0][0].bar(positions, [arm["errors"] for arm in arms], color="tab:red", label="5xx")
    _bar_axis(axes[0][0], names, "requests in the window")
    for offset, key in enumerate(("latency_p50_ms", "latency_p90_ms", "latency_p99_ms")):
        axes[0][1].bar([p + 0.27 * (offset - 1) for p in positions], [arm[key] or 0 for arm in arms], width=0.27,
                       label=key.split("_")[1])
    _bar_axis(axes[0][1], names, "latency (ms)")
    for offset, key in enumerate(("auc", "estimated_auc", "feedback_score")):
        axes[1][0].bar([p + 0.27 * (offset - 1) for p in positions], [arm[key] or 0 for arm in arms], width=0.27,
                       label=key.replace("_", " "))
    _bar_axis(axes[1][0], names, "quality")
    _plot_drift(axes[1][1], drift)
    fig.suptitle(f"{model}: the last {summary['window_s']:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bar_axis(ax, names: list[str], ylabel: str) -> None:
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)


def _plot_drift(ax, drift: dict) -> None:
    features = sorted({name for values in drift.values() for name in values})
    for key, values in sorted(drift.items()):
        ax.plot(range(len(features)), [values.get(name, math.nan) for name in features], "o",
                label=f"v{key[0]} {key[1]}")
    ax.axhline(PSI_MAJOR, color="tab:red", linestyle="--", label=f"major shift ({PSI_MAJOR:g})")
    ax.set_xticks(range(len(features)), features, rotation=90, fontsize=7)
    ax.set_ylabel("PSI (largest of any replica)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def monitor(serve_cfg, *, model: str, out_root: Path) -> Path:
    """Print the report and write monitor.png and monitor.json; returns the PNG's path."""
    summary = endpoint_of(serve_cfg).summary()
    prometheus = serve_cfg.monitor.prometheus_url
    if prometheus:
        drift, alerts = drift_from_prometheus(prometheus, model=model)
    else:
        drift, alerts = (drift_from_local_ray(model=model) if LOCAL_TARGETS.is_file() else {}), None
    lineage = lineage_of(serve_cfg, model, {arm["version"] for arm in summary["arms"]})
    print(format_report(model, summary, drift, alerts, lineage=lineage), flush=True)
    out_dir = out_root / "monitor" / model
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "monitor.json").write_text(json.dumps({
        "summary": summary, "alerts": alerts,
        "drift": [{"version": v, "arm": a, "psi": features} for (v, a), features in sorted(drift.items())]},
        indent=2) + "\n")
    plot_report(out_dir / "monitor.png", model, summary, drift, lineage=lineage)
    return out_dir / "monitor.png"


def lineage_of(serve_cfg, model: str, versions: set[int]) -> dict[int, str]:
    """{version: "int8_dynamic of v3"} for the versions that stage=optimize derived among those in the report and
    those the aliases serve, read from the registry; none when this shell cannot read it (the report is the
    endpoint's, the registry only names)."""
    from serve.registry import Registry

    try:
        registry = Registry(serve_cfg.registry)
        versions = versions | {alias["version"] for alias in registry.aliases(model).values()}
        records = {version: registry.version(model, version) for version in versions}
    except (OSError, ValueError) as err:
        logger.warning("no lineage in the report: the registry %s cannot be read here (%s)", serve_cfg.registry, err)
        return {}
    return {version: f"{record['derived']['method']} of v{record['derived']['parent']}"
            for version, record in records.items() if record.get("derived")}


def _version_name(version: int, lineage: dict[int, str]) -> str:
    return f"v{version} ({lineage[version]})" if version in lineage else f"v{version}"
