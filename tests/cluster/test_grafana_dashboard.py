"""cluster/grafana/slipway_serving.json: valid Grafana JSON, and every PromQL expression names metrics that exist:
Ray Serve's as the installed Ray defines them, Slipway's as serve/ creates them, each used as its type is exported.

Ray exports a metric NAME to Prometheus as ray_NAME; a counter as ray_NAME_total, a histogram as ray_NAME_bucket,
_sum and _count. No Ray cluster is needed: the names are read from the sources."""

import functools
import json
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "cluster" / "grafana" / "slipway_serving.json"

# A metric's creation: metrics.Counter("name", ...), Gauge(name="name", ...), Histogram(f"serve_{protocol}_...", ...)
METRIC_DEFINITION = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*(?:name\s*=\s*)?f?[\"']([A-Za-z0-9_{}]+)[\"']")
SUFFIX_TYPES = {"_total": "Counter", "_bucket": "Histogram", "_sum": "Histogram", "_count": "Histogram"}
# Keywords, and aggregation operators (which may come before their `by (...)`, apart from their parenthesis)
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset", "inf", "nan", "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk",
                "bottomk", "quantile", "count_values", "limitk", "limit_ratio"}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def metric_definitions(root: Path, prefix: str) -> list[tuple[re.Pattern, str]]:
    """(name pattern, type) of every metric created under root whose name starts with prefix. A name built by an
    f-string (Serve's serve_num_{protocol_name}_requests) matches any lower-case word in its placeholder."""
    definitions = []
    for path in sorted(root.rglob("*.py")):
        if "tests" in path.relative_to(root).parts:
            continue
        for kind, name in METRIC_DEFINITION.findall(path.read_text(errors="replace")):
            if name.startswith(prefix):
                pattern = "".join("[a-z0-9]+" if part.startswith("{") else re.escape(part)
                                  for part in re.split(r"(\{[^}]*\})", name))
                definitions.append((re.compile(pattern), kind))
    return definitions


def ray_serve_root() -> Path:
    import ray

    return Path(ray.__file__).resolve().parent / "serve"


@functools.cache
def known_metrics() -> list[tuple[re.Pattern, str]]:
    return metric_definitions(ray_serve_root(), "serve_") + metric_definitions(REPO_ROOT / "serve", "slipway_")


def exported_name(series: str) -> tuple[str, str]:
    """The metric name as Ray defines it and the type that its exported series name implies."""
    name = series.removeprefix("ray_")
    for suffix, kind in SUFFIX_TYPES.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix), kind
    return name, "Gauge"


def series_in(expr: str) -> list[tuple[str, bool]]:
    """(series name, read as a range vector) for every metric an expression selects: identifiers that are not
    functions, keywords, label names (inside {} or after by/without/on/ignoring), durations or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    found = []
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, rest = match.group(), text[match.end():].lstrip()
        before = text[match.start() - 1] if match.start() else " "
        if word.lower() in PROMQL_WORDS or rest.startswith("(") or before.isdigit() or before == ".":
            continue
        found.append((word, rest.removeprefix("{}").lstrip().startswith("[")))
    return found


def problem_with(series: str, as_range: bool, known: list[tuple[re.Pattern, str]]) -> str | None:
    """Why a series that an expression reads is wrong, or None."""
    if not series.startswith("ray_"):
        return f"{series}: Ray exports every metric with the prefix ray_"
    metric, kind = exported_name(series)
    kinds = {defined for pattern, defined in known if pattern.fullmatch(metric)}
    if not kinds:
        return f"{series}: neither a Ray Serve metric of the installed Ray nor one that serve/ creates ({metric})"
    if kind not in kinds:
        return f"{series} reads {metric} as a {kind}, but it is a {'/'.join(sorted(kinds))}"
    if as_range != (kind != "Gauge"):  # counters and histograms mean something only as rates; gauges as they are
        return f"{series}: a {kind} {'needs' if kind != 'Gauge' else 'takes no'} range selector"
    return None


def _targets(dashboard: dict) -> list[tuple[str, dict]]:
    return [(panel["title"], target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_is_valid_grafana_json():
    dashboard = load_dashboard()
    assert dashboard["title"] and dashboard["uid"] and 36 <= dashboard["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids, cells = set(), set()
    for panel in dashboard["panels"]:
        assert panel["type"] in {"row", "timeseries"}, panel["title"]
        assert panel["id"] not in ids, f"panel id {panel['id']} repeats"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in "xywh") and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                   for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not covered & cells, f"panel {panel['title']!r} overlaps another"
        cells |= covered
        if panel["type"] == "timeseries":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(set(ref_ids)) == len(ref_ids), panel["title"]
    assert len(_targets(dashboard)) >= 20


def test_every_expression_names_metrics_that_exist_with_their_type():
    known = known_metrics()
    assert len(known) > 40, "Ray Serve's metric definitions were not found: did the way Ray creates them change?"
    for title, target in _targets(load_dashboard()):
        series = series_in(target["expr"])
        assert series, f"{title}: no metric in {target['expr']}"
        for name, as_range in series:
            problem = problem_with(name, as_range, known)
            assert problem is None, f"{title}: {problem}"


def test_legends_name_only_labels_the_expression_keeps():
    for title, target in _targets(load_dashboard()):
        grouped = set()
        for labels in re.findall(r"\bby\s*\(([^)]*)\)", target["expr"]):
            grouped |= {label.strip() for label in labels.split(",")}
        legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
        assert legend_labels <= grouped - {"le"}, f"{title}: the legend names {legend_labels - grouped} which the " \
                                                  "aggregation drops"


def test_slipway_panels_cover_each_slipway_metric():
    """Each metric that serve/ creates has a panel: a new one shows up on the dashboard or fails here."""
    expressions = " ".join(target["expr"] for _, target in _targets(load_dashboard()))
    for pattern, _ in metric_definitions(REPO_ROOT / "serve", "slipway_"):
        assert re.search(rf"\bray_{pattern.pattern}(_total|_bucket|\b)", expressions), \
            f"{pattern.pattern} has no panel in {DASHBOARD.name}"


@pytest.mark.parametrize(("expr", "expected"), [
    ('sum by (model, version) (rate(ray_slipway_requests_total{model=~"$model"}[$__rate_interval]))',
     [("ray_slipway_requests_total", True)]),
    ('histogram_quantile(0.99, sum by (le) (rate(ray_serve_http_request_latency_ms_bucket{route!~"/-/.*"}[5m])))',
     [("ray_serve_http_request_latency_ms_bucket", True)]),
    ("max by (application) (ray_serve_autoscaling_total_requests) / on() ray_serve_replica_processing_queries",
     [("ray_serve_autoscaling_total_requests", False), ("ray_serve_replica_processing_queries", False)]),
])
def test_series_in_finds_the_metrics_of_an_expression(expr, expected):
    assert series_in(expr) == expected


@pytest.mark.parametrize(("series", "as_range", "problem"), [
    ("ray_slipway_request_latency_ms_total", True, "but it is a Histogram"),  # a histogram read as a counter
    ("ray_serve_num_http_request_total", True, "neither"),  # a typo of serve_num_http_requests
    ("ray_slipway_requets_total", True, "neither"),
    ("slipway_requests_total", True, "prefix ray_"),
    ("ray_serve_deployment_queued_queries", True, "takes no range"),  # rate() of a gauge
    ("ray_slipway_requests_total", False, "needs range"),  # a counter's raw total
])
def test_a_wrong_name_or_type_is_caught(series, as_range, problem):
    assert problem in (problem_with(series, as_range, known_metrics()) or "")


def test_a_name_that_serve_builds_with_an_f_string_is_known():
    assert problem_with("ray_serve_num_grpc_requests_total", True, known_metrics()) is None
