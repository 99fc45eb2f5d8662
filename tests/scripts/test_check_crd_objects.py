"""scripts/check_crd_objects.py: custom objects validated against the vendored published CRD schemas.

The script needs PyYAML, jsonschema and google-re2, which the project venv may not have; it is run
with the first interpreter that has them: this one, else the tools venv that scripts/check-deploy.sh
sets up (.tools/venv, which CI creates before pytest runs). Skipped when neither has them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_crd_objects.py"
NEEDS = "import jsonschema, re2, yaml"


def _python() -> str | None:
    for candidate in (Path(sys.executable), ROOT / ".tools" / "venv" / "bin" / "python"):
        if candidate.exists() and subprocess.run([str(candidate), "-c", NEEDS], capture_output=True).returncode == 0:
            return str(candidate)
    return None


PYTHON = _python()
pytestmark = pytest.mark.skipif(
    PYTHON is None,
    reason="needs a Python with jsonschema, PyYAML and google-re2: neither this venv nor .tools/venv has them "
    "(`bash scripts/check-deploy.sh --install-only` sets up .tools/venv)",
)

VALID = """
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: {name: good-sm, labels: {release: kube-prometheus-stack}}
spec:
  selector: {matchLabels: {app.kubernetes.io/name: lowdiff}}
  namespaceSelector: {matchNames: [lowdiff]}
  endpoints: [{port: http, path: /metrics, interval: 15s, scrapeTimeout: 10s}]
---
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata: {name: good-rule}
spec:
  groups:
    - name: lowdiff
      partial_response_strategy: WARN   # RE2 pattern ^(?i)(abort|warn)?$
      rules:
        - alert: LowDiffDown
          expr: up{job="lowdiff"} == 0
          for: 5m
          labels: {severity: critical}
          annotations: {summary: LowDiff is down, description: No target is up.}
        - record: lowdiff:requests:rate5m
          expr: sum(rate(lowdiff_requests_total[5m]))
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: good-so}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: lowdiff}
  minReplicaCount: 1
  maxReplicaCount: 10
  triggers:
    - type: prometheus
      metadata: {serverAddress: "http://prometheus:9090", query: sum(x), threshold: "64"}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: dashboard, labels: {grafana_dashboard: "1"}}
data:
  lowdiff.json: '{"uid": "lowdiff", "title": "LowDiff", "panels": [{"targets": [{"expr": "up"}]}]}'
"""

INVALID = """
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: {name: bad-sm}
spec:
  selector: {matchLabels: {app.kubernetes.io/name: lowdiff}}
  endpoints: [{port: http, interval: 15, scrapeTimout: 10s}]
---
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata: {name: bad-rule}
spec:
  groups:
    - name: lowdiff
      partial_response_strategy: sometimes
      rules:
        - alert: LowDiffDown
          expresion: up == 0
          for: 5 minutes
          labels: {severity: critical}
          annotations: {summary: LowDiff is down, description: No target is up.}
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: bad-so}
labels: {app: lowdiff}
spec:
  scaleTargetRef: {name: lowdiff}
  triggers:
    - type: prometheus
      metadata: {serverAddress: "http://prometheus:9090", query: sum(x), threshold: 64}
"""

# One line per problem in INVALID, each naming the JSON path and the field.
EXPECTED_ERRORS = [
    "ServiceMonitor/bad-sm: $.spec.endpoints[0]: Additional properties are not allowed ('scrapeTimout' was unexpected)",
    "ServiceMonitor/bad-sm: $.spec.endpoints[0].interval: 15 is not of type 'string'",
    "PrometheusRule/bad-rule: $.spec.groups[0].partial_response_strategy: 'sometimes' does not match",
    "PrometheusRule/bad-rule: $.spec.groups[0].rules[0]: 'expr' is a required property",
    "PrometheusRule/bad-rule: $.spec.groups[0].rules[0]: Additional properties are not allowed ('expresion' was",
    "PrometheusRule/bad-rule: $.spec.groups[0].rules[0].for: '5 minutes' does not match",
    "ScaledObject/bad-so: $: Additional properties are not allowed ('labels' was unexpected)",
    "ScaledObject/bad-so: $.spec.triggers[0].metadata.threshold: 64 is not of type 'string'",
]


def run(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(text)
    assert PYTHON is not None
    return subprocess.run([PYTHON, str(SCRIPT), str(rendered), *args], capture_output=True, text=True, timeout=120)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("ERROR ")]


def test_valid_objects_pass_and_rules_are_written(tmp_path: Path) -> None:
    result = run(tmp_path, VALID, "--rules-dir", str(tmp_path / "rules"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 core object(s)" in result.stdout
    assert "3 custom object(s) checked against the operators' published schemas (strict), 0 problem(s)" in result.stdout
    assert "alert: LowDiffDown" in (tmp_path / "rules" / "good-rule.rules.yaml").read_text()


def test_every_invalid_field_is_reported(tmp_path: Path) -> None:
    result = run(tmp_path, VALID + "---" + INVALID)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = error_lines(result)
    for expected in EXPECTED_ERRORS:
        assert any(e.startswith(expected) for e in errors), f"missing {expected!r} in:\n{result.stdout}"
    assert len(errors) == len(EXPECTED_ERRORS), result.stdout
    assert not any("good-" in e for e in errors), result.stdout
    assert f"{len(EXPECTED_ERRORS)} problem(s)" in result.stdout


def test_no_strict_accepts_unknown_top_level_fields(tmp_path: Path) -> None:
    result = run(tmp_path, INVALID, "--no-strict")
    assert result.returncode == 1
    errors = error_lines(result)
    assert not any("'labels' was unexpected" in e for e in errors), result.stdout
    # The published schemas close the nested objects themselves.
    assert any("'scrapeTimout' was unexpected" in e for e in errors), result.stdout
    assert len(errors) == len(EXPECTED_ERRORS) - 1, result.stdout


def test_unknown_kinds_and_empty_dashboard_queries_are_refused(tmp_path: Path) -> None:
    text = """
apiVersion: example.com/v1
kind: Widget
metadata: {name: w}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: dashboard, labels: {grafana_dashboard: "1"}}
data:
  lowdiff.json: '{"uid": "lowdiff", "title": "LowDiff", "panels": [{"targets": [{"expr": " "}]}]}'
"""
    result = run(tmp_path, text)
    assert result.returncode == 1
    assert error_lines(result) == [
        "Widget/w: example.com/v1 Widget is neither a core kind nor a custom kind with a schema here",
        "dashboard lowdiff.json: a panel has an empty query",
    ]
