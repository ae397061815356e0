"""checkov (offline, `--skip-download`) over the rendered manifests of every values file and over
the Dockerfile. Each check that still fails must be listed, with its reason, in docs/deploy.md's
"Security scan (checkov)" table, for exactly the objects it fails on; a listed check that no longer
fails anywhere must leave the table. Nothing is skipped silently."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from conftest import CI_VALUES, RELEASE, ROOT, ci_values, render

CHECKOV = ROOT / ".venv" / "checkov" / "bin" / "checkov"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"


def _checkov(*args: str) -> list[dict]:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} missing: `make chart-tools` installs checkov (CI runs it via `make test`)")
    result = subprocess.run(
        [str(CHECKOV), *args, "--skip-download", "--quiet", "--compact", "--output", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = json.loads(result.stdout)
    return reports if isinstance(reports, list) else [reports]


def _failures(reports: list[dict]) -> set[tuple[str, str]]:
    """(check id, object): the object is the chart component ('consumer', 'redis', ...) or 'Dockerfile'."""
    found = set()
    for report in reports:
        for check in report["results"]["failed_checks"]:
            resource = check["resource"]
            if report["check_type"] == "dockerfile":
                found.add((check["check_id"], "Dockerfile"))
            else:
                name = resource.rsplit(".", 1)[-1]
                found.add((check["check_id"], name.removeprefix(f"{RELEASE}-streamgroup-")))
    return found


def documented() -> dict[str, set[str]]:
    rows = re.findall(r"^\| (CKV_\w+) \| ([^|]+) \| ([^|]+) \|$", DEPLOY_DOC.read_text(), re.M)
    assert rows, "docs/deploy.md has no checkov table"
    table = {}
    for check, objects, reason in rows:
        assert len(reason.strip()) > 30, f"{check}: give the reason"
        table[check] = {o.strip() for o in objects.split(",")}
    return table


@pytest.fixture(scope="module")
def scanned(tmp_path_factory) -> set[tuple[str, str]]:
    directory = tmp_path_factory.mktemp("manifests")
    for values_file in [None, *CI_VALUES]:
        name = values_file.stem if values_file else "defaults"
        objects = render(ci_values(values_file) if values_file else None)
        (directory / f"{name}.yaml").write_text(yaml.safe_dump_all(objects))
    manifests = _checkov("--directory", str(directory), "--framework", "kubernetes")
    passed = sum(r["summary"]["passed"] for r in manifests)
    assert passed > 200, "checkov ran no checks over the manifests"
    dockerfile = _checkov("--file", str(ROOT / "Dockerfile"), "--framework", "dockerfile")
    assert sum(r["summary"]["passed"] for r in dockerfile) > 20
    return _failures(manifests) | _failures(dockerfile)


def test_every_remaining_failure_is_documented_with_its_reason(scanned):
    table = documented()
    undocumented = sorted((check, obj) for check, obj in scanned if obj not in table.get(check, set()))
    assert undocumented == [], "fix these or list them with a reason in docs/deploy.md"


def test_the_documented_failures_still_fail(scanned):
    stale = sorted(
        (check, obj) for check, objects in documented().items() for obj in objects if (check, obj) not in scanned
    )
    assert stale == [], "these checks pass now: remove them from docs/deploy.md's table"


def test_checkov_catches_what_the_chart_avoids(tmp_path):
    """The scan really looks: a privileged root container with a writable root filesystem fails."""
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad", "namespace": "x"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "securityContext": {"privileged": True}}]},
    }  # fmt: skip
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(pod))
    failed = {check for check, _ in _failures(_checkov("--directory", str(tmp_path), "--framework", "kubernetes"))}
    assert {"CKV_K8S_16", "CKV_K8S_22", "CKV_K8S_23"} <= failed
