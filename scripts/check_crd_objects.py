"""Offline checks of rendered Helm output that kubernetes-validate cannot do.

kubernetes-validate bundles the schemas of the core Kubernetes kinds only. For a custom resource
(ServiceMonitor, PrometheusRule, KEDA ScaledObject) it prints a WARN and passes, so a typo there
would go unnoticed. This script, run on the same rendered manifests:

1. checks that every object is either a core kind (validated strictly by kubernetes-validate) or
   one of the custom kinds in CUSTOM_KINDS, so nothing passes unchecked;
2. validates each custom object with ``jsonschema`` against the operators' published schema for
   its apiVersion and kind: the JSON-Schema form of the Prometheus Operator and KEDA CRDs
   (``openAPIV3Schema``) from the datreeio/CRDs-catalog, vendored unchanged in scripts/crd-schemas/
   (provenance in its README). The files carry no ``$schema``, so they are read as JSON Schema
   draft 7 (the validator class follows ``$schema`` if a newer file has one). Two deliberate
   departures from plain ``jsonschema`` validation, both here and not in the vendored files:

   * ``pattern`` is matched with RE2 (google-re2), not Python's ``re``: CRD patterns are written
     for the API server's Go regexp (RE2 syntax), and one of them (``^(?i)(abort|warn)?$``) is not
     even a valid Python 3.11+ regex;
   * strict mode (the default; ``--no-strict`` turns it off): every object schema that lists
     ``properties`` and says nothing about other fields (no ``additionalProperties``, no
     ``x-kubernetes-preserve-unknown-fields``, not an embedded resource) gets
     ``additionalProperties: false``, so an unknown or misspelled field is an error, as it is for
     ``kubectl apply`` (strict field validation) rather than silently pruned by the API server.
     Branches of ``anyOf``/``allOf``/``oneOf``/``not`` are left alone (in a structural schema
     their ``properties`` repeat the parent's, so closing them could refuse valid fields).
     The catalogue already closes the nested objects of these CRDs, so in practice this adds
     the check at the top level (``apiVersion``/``kind``/``metadata``/``spec``/...).

   Every error is reported with its JSON path. Not covered: ``metadata`` is just ``type: object``
   in the published schemas (the chart renders it with the same helpers as the core objects,
   which kubernetes-validate checks), and ``format`` is not asserted (``int32`` and the like are
   annotations for jsonschema). A custom object without ``metadata.name`` is refused, since the
   API server would refuse it;
3. checks the chart's alert conventions on each PrometheusRule (``severity`` label, ``summary``
   and ``description`` annotations) and writes its ``spec`` as a Prometheus rule file into
   --rules-dir, for ``promtool check rules`` (which checks the PromQL and the alert/record names);
4. parses the Grafana dashboard ConfigMap's JSON and checks that every panel query is non-empty.

Usage: python scripts/check_crd_objects.py RENDERED.yaml [--rules-dir DIR] [--no-strict]
Exits 1 if any problem is found. Needs PyYAML, jsonschema and google-re2 (scripts/check-deploy.sh
installs them into .tools/venv).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import re2
import yaml

SCHEMA_DIR = Path(__file__).resolve().parent / "crd-schemas"
# The custom kinds the chart may render, and the published schema each is validated against.
CUSTOM_KINDS: dict[tuple[str, str], str] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrule_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_scaledobject_v1alpha1.json",
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


@functools.cache
def _re2(pattern: str) -> Any:
    return re2.compile(pattern)


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """The ``pattern`` keyword with RE2 (the API server's regex syntax) instead of Python's ``re``."""
    if validator.is_type(instance, "string") and not _re2(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


# Checks the vendored schemas themselves: their ``pattern`` values must be valid RE2.
SCHEMA_FORMAT_CHECKER = jsonschema.FormatChecker()
SCHEMA_FORMAT_CHECKER.checks("regex", raises=re2.error)(_re2)


def strict(schema: Any) -> Any:
    """A copy of ``schema`` that refuses unknown fields wherever the schema lists ``properties``
    and leaves other fields unspecified (see the module docstring)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if not (
            "additionalProperties" in out
            or out.get("x-kubernetes-preserve-unknown-fields")
            or out.get("x-kubernetes-embedded-resource")
        ):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    return out


@functools.cache
def validator_for(filename: str, strict_mode: bool) -> Any:
    schema = json.loads((SCHEMA_DIR / filename).read_text())
    if strict_mode:
        schema = strict(schema)
    base = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls = jsonschema.validators.extend(base, validators={"pattern": _re2_pattern})
    cls.check_schema(schema, format_checker=SCHEMA_FORMAT_CHECKER)
    return cls(schema)


def schema_problems(doc: dict[str, Any], filename: str, strict_mode: bool) -> list[str]:
    errors = validator_for(filename, strict_mode).iter_errors(doc)
    return [f"{e.json_path}: {e.message}" for e in sorted(errors, key=lambda e: (e.json_path, e.message))]


def check_prometheus_rule_conventions(obj: dict[str, Any]) -> list[str]:
    """The chart's own alert conventions (not part of the CRD): severity, summary, description."""
    problems = []
    # (Shapes the schema refuses are skipped here; they are reported already.)
    groups = [g for g in (obj.get("spec") or {}).get("groups") or [] if isinstance(g, dict)]
    for rule in (r for g in groups for r in g.get("rules") or [] if isinstance(r, dict)):
        if "alert" in rule:
            labels = rule.get("labels") or {}
            annotations = rule.get("annotations") or {}
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
    parser.add_argument(
        "--no-strict",
        dest="strict",
        action="store_false",
        help="validate against the published schemas as they are (unknown top-level fields pass)",
    )
    args = parser.parse_args()
    docs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
    problems: list[str] = []
    counts = {"core": 0, "custom": 0}
    for doc in docs:
        api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        name = f"{kind}/{metadata.get('name', '?')}"
        filename = CUSTOM_KINDS.get((api_version, kind))
        if filename is None:
            if api_version not in CORE_GROUPS:
                problems.append(
                    f"{name}: {api_version} {kind} is neither a core kind nor a custom kind with a schema here"
                )
            else:
                counts["core"] += 1
            if kind == "ConfigMap" and (metadata.get("labels") or {}).get("grafana_dashboard"):
                problems += check_dashboard(doc)
            continue
        counts["custom"] += 1
        problems += [f"{name}: {p}" for p in schema_problems(doc, filename, args.strict)]
        if not metadata.get("name"):
            problems.append(f"{name}: $.metadata.name is required")
        if kind == "PrometheusRule":
            problems += check_prometheus_rule_conventions(doc)
            if args.rules_dir is not None and metadata.get("name"):
                args.rules_dir.mkdir(parents=True, exist_ok=True)
                out = args.rules_dir / f"{metadata['name']}.rules.yaml"
                out.write_text(yaml.safe_dump(doc.get("spec"), sort_keys=False))
                print(f"  rule file for promtool: {out}")
    for problem in problems:
        print(f"ERROR {args.rendered}: {problem}")
    mode = "strict" if args.strict else "not strict"
    print(
        f"{args.rendered}: {counts['core']} core object(s) (kubernetes-validate checks them), "
        f"{counts['custom']} custom object(s) checked against the operators' published schemas ({mode}), "
        f"{len(problems)} problem(s)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
