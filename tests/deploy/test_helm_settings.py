"""The Helm chart's ``settings`` (rendered as LOWDIFF_* variables by templates/configmap.yaml) name real
``lowdiff serve`` settings with the same choices, and the values files' settings pass the service's own
validation: a key the service does not know would be ignored in the pod without a word."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

import pytest
import yaml

from lowdiff.service.settings import ServeSettings, resolve_settings

CHART = Path(__file__).resolve().parents[2] / "helm" / "lowdiff"


def snake(key: str) -> str:
    """Helm's ``snakecase`` of a camelCase key, as the ConfigMap template applies it."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def chart_settings() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())["properties"]["settings"]["properties"]


def test_every_chart_setting_is_a_serve_setting_with_the_same_choices() -> None:
    fields = ServeSettings.model_fields
    for key, rule in chart_settings().items():
        name = snake(key)
        assert name in fields, f"settings.{key} → LOWDIFF_{name.upper()} is not a lowdiff serve setting"
        if "enum" in rule:
            assert sorted(rule["enum"]) == sorted(get_args(fields[name].annotation)), key
    names = {snake(k) for k in chart_settings()}
    assert {"scheduler", "max_batch_per_stage", "stage_overlap", "overlap_backlog"} <= names


@pytest.mark.parametrize("values", ["values.yaml", "values-gpu.yaml"])
def test_the_values_files_settings_are_valid_serve_settings(values: str) -> None:
    merged = yaml.safe_load((CHART / "values.yaml").read_text())["settings"]
    merged.update(yaml.safe_load((CHART / values).read_text()).get("settings", {}))
    # (helm lint --strict checks them against values.schema.json: scripts/check-deploy.sh)
    environ = {f"LOWDIFF_{snake(k).upper()}": str(v) for k, v in merged.items() if v not in (None, "")}
    settings = resolve_settings(None, environ)
    assert (settings.scheduler, settings.stage_overlap) == (merged["scheduler"], merged["stageOverlap"])
    assert settings.max_batch == merged["maxBatch"] and settings.engine == merged["engine"]
