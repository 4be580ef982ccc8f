"""cluster/monitoring/slipway_rules.yml: Prometheus's own promtool accepts the rules and their unit tests
(slipway_rules_test.yml: burn-rate and drift alerts on synthetic series) pass; every metric a rule reads exists
with the type it is read as. A real Prometheus scraping a served model sees the drift alert fire:
tests/serve/test_serving_ranker.py. promtool and prometheus come from the Debian package (`bash scripts/setup.sh
--test` installs it)."""

import subprocess
from pathlib import Path

import yaml

from tests.cluster.test_grafana_dashboard import known_metrics, problem_with, series_in

MONITORING = Path(__file__).resolve().parents[2] / "cluster" / "monitoring"
RULES = MONITORING / "slipway_rules.yml"


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules():
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0 and "SUCCESS: 15 rules found" in checked.stdout, checked.stdout + checked.stderr


def test_the_rules_unit_tests_pass():
    """Burn-rate alerts for server errors (not 4xx) and slow answers, and drift alerts that need enough rows and
    time: each expected alert, with its labels and annotations, fires at its time and no other."""
    tested = promtool("test", "rules", "slipway_rules_test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_rule_reads_metrics_that_exist_with_their_type():
    known = known_metrics()
    recorded = set()
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            series = series_in(rule["expr"])
            assert series, f"{rule.get('record') or rule['alert']}: no metric in {rule['expr']}"
            for name, as_range in series:
                if name in recorded:  # a recording rule of this file, defined above
                    continue
                problem = problem_with(name, as_range, known)
                assert problem is None, f"{rule.get('record') or rule['alert']}: {problem}"
            if "record" in rule:
                recorded.add(rule["record"])
    assert len(recorded) == 8
