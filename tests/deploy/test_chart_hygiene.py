"""Chart hygiene: the values README is what the generator makes of values.yaml, every change of the
chart comes with a new chart version and a CHANGELOG entry, and the repository has its LICENSE."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tomllib

import yaml

from conftest import CHART, ROOT

README_GENERATOR = ROOT / ".ci" / "readme-generator" / "node_modules" / ".bin" / "readme-generator"
CHANGELOG = CHART / "CHANGELOG.md"
ENTRY = re.compile(r"^## (\d+\.\d+\.\d+) \(chart files sha256:([0-9a-f]{64})\)$", re.M)


def test_values_readme_is_generated_from_values_yaml(tmp_path):
    assert README_GENERATOR.exists(), "`make chart-tools` installs the pinned readme-generator-for-helm"
    fresh = tmp_path / "README.md"
    shutil.copy(CHART / "README.md", fresh)
    result = subprocess.run(
        [str(README_GENERATOR), "--values", str(CHART / "values.yaml"), "--readme", str(fresh)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Metadata is correct" in result.stdout
    assert fresh.read_text() == (CHART / "README.md").read_text(), "run `make chart-readme` and commit README.md"
    assert "`consumer.autoscaling.keda.minReplicaCount`" in fresh.read_text()


def test_the_generator_refuses_an_undocumented_value(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text((CHART / "values.yaml").read_text() + "\nundocumentedKey: 1\n")
    readme = tmp_path / "README.md"
    shutil.copy(CHART / "README.md", readme)
    result = subprocess.run(
        [str(README_GENERATOR), "--values", str(values), "--readme", str(readme)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "undocumentedKey" in result.stdout + result.stderr


def chart_digest(chart=CHART) -> str:
    """sha256 over every file of the chart but its CHANGELOG (path and content, sorted by path)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in chart.rglob("*") if p.is_file() and p.name != "CHANGELOG.md"):
        digest.update(str(path.relative_to(chart)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def test_every_chart_change_bumps_the_version_and_has_a_changelog_entry():
    """The newest CHANGELOG entry records the digest of the chart's files at its version. Changing
    any chart file changes the digest: bump `version` in Chart.yaml and add an entry with the new
    digest (the failure message prints it). Entries are never edited: versions only go up and
    each version has its own digest."""
    entries = ENTRY.findall(CHANGELOG.read_text())
    assert entries, "CHANGELOG.md has no '## <version> (chart files sha256:<digest>)' entry"
    versions = [tuple(map(int, version.split("."))) for version, _ in entries]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions), versions
    assert len({digest for _, digest in entries}) == len(entries), "two versions with the same chart files"
    newest_version, newest_digest = entries[0]
    chart_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    current = chart_digest()
    assert (newest_version, newest_digest) == (chart_version, current), (
        f"the chart changed: bump version in Chart.yaml (now {chart_version}) and add "
        f"'## <new version> (chart files sha256:{current})' with what changed to CHANGELOG.md"
    )


def test_the_digest_sees_a_change(tmp_path):
    before = chart_digest()
    copy = tmp_path / "streamgroup"
    shutil.copytree(CHART, copy)
    assert chart_digest(copy) == before
    (copy / "CHANGELOG.md").write_text("edited")
    assert chart_digest(copy) == before
    (copy / "templates" / "NOTES.txt").write_text((copy / "templates" / "NOTES.txt").read_text() + " ")
    assert chart_digest(copy) != before


def test_license_file_matches_pyproject():
    license_id = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]  # SPDX expression (PEP 639)
    assert license_id == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["annotations"]["artifacthub.io/license"] == license_id
