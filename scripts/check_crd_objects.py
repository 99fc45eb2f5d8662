"""Offline checks of rendered Helm output that kubernetes-validate cannot do.

kubernetes-validate bundles the schemas of the core Kubernetes kinds only. For a custom resource
(ServiceMonitor, PrometheusRule, KEDA ScaledObject) it prints a WARN and passes, so a typo there
would go unnoticed. This script, run on the same rendered manifests:

1. checks that every object is either a core kind (validated strictly by kubernetes-validate) or
   one of the custom kinds below, so nothing passes unchecked;
2. validates each custom object against a structural JSON schema written for this chart: the
   fields the operators' CRDs define that this chart uses or may use, their types and required
   fields, and no unknown fields (``additionalProperties: false``) where the chart sets them.
   These schemas are a hand-written subset of the upstream CRDs (prometheus-operator
   monitoring.coreos.com/v1, KEDA keda.sh/v1alpha1), not the CRDs themselves;
3. writes each PrometheusRule's ``spec`` as a Prometheus rule file into --rules-dir, for
   ``promtool check rules``;
4. parses the Grafana dashboard ConfigMap's JSON and checks that every panel query is non-empty.

Usage: python scripts/check_crd_objects.py RENDERED.yaml [--rules-dir DIR]
Needs PyYAML and jsonschema (both come with kubernetes-validate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml

STR = {"type": "string"}
BOOL = {"type": "boolean"}
INT = {"type": "integer"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": STR_MAP, "matchExpressions": {"type": "array", "items": {"type": "object"}}},
}


def metadata_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
            "namespace": STR,
            "labels": STR_MAP,
            "annotations": STR_MAP,
        },
    }


def resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": metadata_schema(),
            "spec": spec,
        },
    }


SERVICE_MONITOR_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": STR,
        "targetPort": {"anyOf": [STR, INT]},
        "path": STR,
        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": BOOL,
        "honorTimestamps": BOOL,
        "params": {"type": "object"},
        "relabelings": {"type": "array", "items": {"type": "object"}},
        "metricRelabelings": {"type": "array", "items": {"type": "object"}},
        "tlsConfig": {"type": "object"},
        "bearerTokenSecret": {"type": "object"},
        "authorization": {"type": "object"},
        "basicAuth": {"type": "object"},
        "followRedirects": BOOL,
        "enableHttp2": BOOL,
        "filterRunning": BOOL,
        "trackTimestampsStaleness": BOOL,
    },
}

SERVICE_MONITOR = resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"any": BOOL, "matchNames": {"type": "array", "items": STR}},
            },
            "endpoints": {"type": "array", "minItems": 1, "items": SERVICE_MONITOR_ENDPOINT},
            "jobLabel": STR,
            "targetLabels": {"type": "array", "items": STR},
            "podTargetLabels": {"type": "array", "items": STR},
            "sampleLimit": {"type": "integer", "minimum": 0},
            "targetLimit": {"type": "integer", "minimum": 0},
            "attachMetadata": {"type": "object"},
            "scrapeClass": STR,
        },
    },
)

RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"},
        "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "expr": {"anyOf": [{"type": "string", "minLength": 1}, INT]},
        "for": DURATION,
        "keep_firing_for": DURATION,
        "labels": STR_MAP,
        "annotations": STR_MAP,
    },
}

PROMETHEUS_RULE = resource(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["groups"],
        "properties": {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": DURATION,
                        "query_offset": DURATION,
                        "limit": INT,
                        "labels": STR_MAP,
                        "rules": {"type": "array", "minItems": 1, "items": RULE},
                    },
                },
            }
        },
    },
)

HPA_BEHAVIOR_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}

SCALED_OBJECT = resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["scaleTargetRef", "triggers"],
        "properties": {
            "scaleTargetRef": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "apiVersion": STR,
                    "kind": STR,
                    "name": {"type": "string", "minLength": 1},
                    "envSourceContainerName": STR,
                },
            },
            "pollingInterval": {"type": "integer", "minimum": 1},
            "cooldownPeriod": {"type": "integer", "minimum": 0},
            "initialCooldownPeriod": {"type": "integer", "minimum": 0},
            "idleReplicaCount": {"type": "integer", "minimum": 0},
            "minReplicaCount": {"type": "integer", "minimum": 0},
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "fallback": {"type": "object"},
            "advanced": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "restoreToOriginalReplicaCount": BOOL,
                    "scalingModifiers": {"type": "object"},
                    "horizontalPodAutoscalerConfig": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "name": STR,
                            "behavior": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"scaleUp": HPA_BEHAVIOR_RULES, "scaleDown": HPA_BEHAVIOR_RULES},
                            },
                        },
                    },
                },
            },
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["type", "metadata"],
                    "properties": {
                        "type": {"type": "string", "minLength": 1},
                        "name": STR,
                        # KEDA trigger metadata values are all strings ("threshold": "32", not 32).
                        "metadata": STR_MAP,
                        "metricType": {"enum": ["Value", "AverageValue", "Utilization"]},
                        "useCachedMetrics": BOOL,
                        "authenticationRef": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["name"],
                            "properties": {
                                "name": STR,
                                "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
                            },
                        },
                    },
                },
            },
        },
    },
)

CUSTOM_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
}
# API groups whose kinds kubernetes-validate's bundled schemas cover.
CORE_GROUPS = {
    "v1",
    "apps/v1",
    "autoscaling/v2",
    "policy/v1",
    "batch/v1",
    "networking.k8s.io/v1",
    "rbac.authorization.k8s.io/v1",
}


def check_prometheus_rule_semantics(obj: dict[str, Any]) -> list[str]:
    problems = []
    for group in obj["spec"]["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                labels = rule.get("labels", {})
                annotations = rule.get("annotations", {})
                if labels.get("severity") not in ("info", "warning", "critical"):
                    problems.append(f"alert {rule['alert']}: labels.severity must be info, warning or critical")
                if not annotations.get("summary") or not annotations.get("description"):
                    problems.append(f"alert {rule['alert']}: needs annotations summary and description")
    return problems


def check_dashboard(obj: dict[str, Any]) -> list[str]:
    problems = []
    for key, text in obj.get("data", {}).items():
        if not key.endswith(".json"):
            continue
        dashboard = json.loads(text)
        queries = [t.get("expr", "") for p in dashboard.get("panels", []) for t in p.get("targets", [])]
        if not queries or any(not q.strip() for q in queries):
            problems.append(f"dashboard {key}: a panel has an empty query")
        if not dashboard.get("uid") or not dashboard.get("title"):
            problems.append(f"dashboard {key}: uid and title are required")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rendered", type=Path)
    parser.add_argument("--rules-dir", type=Path, default=None, help="write PrometheusRule specs here as rule files")
    args = parser.parse_args()
    docs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
    problems: list[str] = []
    counts = {"core": 0, "custom": 0}
    for doc in docs:
        api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        name = f"{kind}/{doc.get('metadata', {}).get('name', '?')}"
        schema = CUSTOM_SCHEMAS.get((api_version, kind))
        if schema is None:
            if api_version not in CORE_GROUPS:
                problems.append(f"{name}: {api_version} is neither a core kind nor a custom kind with a schema here")
            else:
                counts["core"] += 1
            if kind == "ConfigMap" and doc.get("metadata", {}).get("labels", {}).get("grafana_dashboard"):
                problems += check_dashboard(doc)
            continue
        counts["custom"] += 1
        validator = jsonschema.Draft7Validator(schema)
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in error.absolute_path) or "(root)"
            problems.append(f"{name}: {path}: {error.message}")
        if kind == "PrometheusRule":
            problems += check_prometheus_rule_semantics(doc)
            if args.rules_dir is not None:
                args.rules_dir.mkdir(parents=True, exist_ok=True)
                out = args.rules_dir / f"{doc['metadata']['name']}.rules.yaml"
                out.write_text(yaml.safe_dump(doc["spec"], sort_keys=False))
                print(f"  rule file for promtool: {out}")
    for problem in problems:
        print(f"ERROR {args.rendered}: {problem}")
    print(
        f"{args.rendered}: {counts['core']} core object(s) (kubernetes-validate checks them), "
        f"{counts['custom']} custom object(s) checked against the structural schemas, {len(problems)} problem(s)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
