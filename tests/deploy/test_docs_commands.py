"""The `helm install` / `helm upgrade` commands in docs/deploy.md render with the real chart."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from conftest import find, render

DEPLOY_DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


def _commands() -> list[str]:
    """Every helm install/upgrade command of the doc's code blocks, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DEPLOY_DOC.read_text())
    return [line.split("#")[0].strip() for line in text.splitlines() if re.match(r"\s*helm (install|upgrade) ", line)]


def _typed(value: str) -> Any:
    """What `helm --set` makes of a value: `{a,b}` is a list, booleans and integers are typed, the
    rest are strings."""
    if value.startswith("{") and value.endswith("}"):
        return [_typed(item) for item in value[1:-1].split(",") if item]
    if value in ("true", "false"):
        return value == "true"
    return int(value) if re.fullmatch(r"-?\d+", value) else value


def _values(command: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for assignment in re.findall(r"--set (\S+)", command):
        path, _, value = assignment.partition("=")
        *parents, leaf = path.split(".")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = _typed(value)
    return values


def test_the_doc_has_install_commands() -> None:
    assert len([c for c in _commands() if c.startswith("helm install")]) >= 4
    modes = {_values(c).get("redis", {}).get("mode") for c in _commands()}
    assert {"cluster", "sentinel"} <= modes, "docs/deploy.md shows a cluster and a Sentinel install"


def test_set_values_are_read_as_helm_reads_them() -> None:
    assert _values("helm install x . --set a.b={h:1,k:2} --set c=3 --set d=true --set e={orders}") == {
        "a": {"b": ["h:1", "k:2"]},
        "c": 3,
        "d": True,
        "e": ["orders"],
    }


@pytest.mark.parametrize("command", _commands())
def test_documented_command_renders(command: str) -> None:
    values = _values(command)
    assert values, f"no --set values parsed from {command!r}"
    objects = render(values)
    assert find(objects, "Deployment"), f"{command!r} rendered no Deployment"
