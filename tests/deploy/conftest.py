"""Render the Helm chart with real Helm (the helm-python-sdk binding of Helm's Go SDK) and hand the
objects to the tests. Nothing here is mocked: a missing tool is a failure, never a skip."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "streamgroup"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "rel"
NAMESPACE = "streamgroup"
# Oldest Kubernetes the chart claims in Chart.yaml (kubeVersion); checked in test_chart.py.
OLDEST_KUBERNETES = "1.27.0"

Manifest = dict[str, Any]


def ci_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render_templates(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, exactly as `helm template` would produce it."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(values: dict[str, Any] | None = None) -> list[Manifest]:
    """Every Kubernetes object the chart renders (test hooks included, NOTES.txt not)."""
    objects = []
    for path, text in sorted(render_templates(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append(doc)
    return objects


def find(objects: list[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def component_name(component: str) -> str:
    return f"{RELEASE}-streamgroup-{component}"


def alert_rule_groups(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rule groups of the rendered PrometheusRule, ready for a Prometheus rule file."""
    merged = {"prometheusRule": {"enabled": True}}
    for key, value in (values or {}).items():
        merged[key] = value if key != "prometheusRule" else {"enabled": True, **value}
    rule = one(render(merged), "PrometheusRule")
    return rule["spec"]["groups"]


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package in .ci/apt-packages; `make system-deps`)")
    return path


@pytest.fixture(scope="session")
def rendered_defaults() -> list[Manifest]:
    return render()


@pytest.fixture(scope="session")
def renders() -> Callable[[str], list[Manifest]]:
    """Rendered objects of one ci/<name>.yaml values file, cached for the session."""
    cache: dict[str, list[Manifest]] = {}

    def get(name: str) -> list[Manifest]:
        if name not in cache:
            cache[name] = render(ci_values(CHART / "ci" / f"{name}.yaml"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool")
