"""The container image, really built with podman from the root Dockerfile and really run.

The base is a CI stand-in for python:3.12-slim (see conftest.py and docs/image.md). Building the
image and the stand-in happens once per session in the `image` fixture; a failure there fails
every test here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.timeout(600)  # a fresh machine: debootstrap + build, ~2-3 minutes

UID = 10001
REPO_ROOT = Path(__file__).resolve().parents[2]


def _inspect(podman, image: str) -> dict:
    return json.loads(podman.run("image", "inspect", image).stdout)[0]


def _sh(podman, image: str, script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script in a throwaway container of the image (entrypoint kept: tini)."""
    return podman.run("run", "--rm", "--network=none", image, "sh", "-c", script, check=False)


def test_image_config_runs_tini_as_numeric_non_root_user(podman, image: str) -> None:
    config = _inspect(podman, image)["Config"]
    user = config.get("User", "")
    assert user.split(":")[0] == str(UID), f"image user: {user!r}"
    assert config["Entrypoint"] == ["tini", "--"]
    assert config["Cmd"] == ["streamgroup-consumer"]
    assert "9180/tcp" in config.get("ExposedPorts", {})
    assert "PYTHONUNBUFFERED=1" in config["Env"]


def test_container_process_is_uid_10001_under_tini(podman, image: str) -> None:
    proc = _sh(podman, image, 'id -u; id -g; tr "\\0" " " </proc/1/cmdline; echo')
    assert proc.returncode == 0, proc.stderr
    uid, gid, pid1 = proc.stdout.splitlines()
    assert (int(uid), int(gid)) == (UID, UID)
    # PID 1 is tini (it forwards SIGTERM and reaps), the command runs as its child.
    assert pid1.split()[:2] == ["tini", "--"], pid1
    assert Path(pid1.split()[0]).name == "tini"


def test_final_image_has_no_build_tools_or_build_leftovers(podman, image: str, builder_image: str) -> None:
    tools = ["gcc", "cc", "c++", "g++", "make", "ld", "as", "pip", "pip3"]
    probe = "; ".join(f'command -v {t} >/dev/null && echo "tool: {t}"' for t in tools)
    leftovers = ["/wheels", "/src", "/opt/build-venv", "/root/.cache/pip"]
    leftovers += ["/opt/streamgroup/bin/pip"]  # pip is removed from the runtime venv
    probe += "; " + "; ".join(f'[ -e {p} ] && echo "left: {p}"' for p in leftovers)
    proc = _sh(podman, image, probe + "; true")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"found in the final image:\n{proc.stdout}"
    # The probe does find things: the builder stage of the same Dockerfile has its build venv
    # with pip, the sources and the wheels.
    proc = _sh(podman, builder_image, probe + "; true")
    found = set(proc.stdout.splitlines())
    expected = {"left: /wheels", "left: /src", "left: /opt/build-venv"}
    assert expected <= found, proc.stdout + proc.stderr
    # And the runtime has what it needs: the compiled dependencies import without a compiler.
    proc = _sh(
        podman,
        image,
        "python3 -c 'import hiredis, pydantic_core, redis, streamgroup; print(redis.__version__)'",
    )
    assert proc.returncode == 0, proc.stderr


def test_cli_entrypoints_run_in_the_image(podman, image: str) -> None:
    commands = ["streamgroup"] + [f"streamgroup-{s}" for s in ("producer", "consumer", "reclaimer")]
    script = "; ".join(f"command -v {command}" for command in commands)
    proc = podman.run("run", "--rm", "--network=none", image, "sh", "-c", script)
    assert proc.stdout.split() == [f"/opt/streamgroup/bin/{command}" for command in commands]
    # A misspelled variable is a configuration error with its own exit code, not a crash.
    proc = podman.run(
        "run", "--rm", "--network=none", "--env", "STREAMGROUP_STREEM=x",
        image, "streamgroup-producer",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "STREAMGROUP_STREEM" in proc.stderr


def test_image_holds_the_current_sources(podman, image: str) -> None:
    """Every module of the working tree is in the image, byte for byte: a build cache that
    reused stale layers (or a .dockerignore that dropped a file) would fail here."""
    packages = sorted(p.parent.name for p in (REPO_ROOT / "services").glob("*/__init__.py"))
    assert "streamgroup" in packages, packages
    expected = {
        str(path.relative_to(REPO_ROOT / "services")): hashlib.sha256(path.read_bytes()).hexdigest()
        for package in packages
        for path in (REPO_ROOT / "services" / package).rglob("*.py")
    }
    script = (
        "cd /opt/streamgroup/lib/python3*/site-packages && "
        f"find {' '.join(packages)} -name '*.py' -type f | sort | xargs sha256sum"
    )
    proc = podman.run("run", "--rm", "--network=none", image, "sh", "-c", script)
    found = {name: digest for digest, name in (line.split() for line in proc.stdout.splitlines())}
    assert found == expected


def _service_env(redis_server, stream: str, group: str, **extra: str) -> list[str]:
    env = {
        "STREAMGROUP_REDIS_URL": redis_server.url,
        "STREAMGROUP_STREAM": stream,
        "STREAMGROUP_GROUP": group,
        "STREAMGROUP_LOG_FORMAT": "json",
        **extra,
    }
    return [arg for name, value in env.items() for arg in ("--env", f"{name}={value}")]


def _json_lines(text: str) -> list[dict]:
    events = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def test_producer_and_consumer_from_the_image_move_messages_through_redis(
    podman, image: str, image_redis, free_port, tmp_path: Path
) -> None:
    stream, group, consumer = "image-test-stream", "image-test-group", "image-consumer-1"
    client = image_redis.client()

    # 1. The producer (host network: it reaches the loopback Redis) stops by itself after 5.
    producer = podman.run(
        "run", "--rm", "--network=host",
        *_service_env(
            image_redis, stream, group,
            STREAMGROUP_MAX_MESSAGES="5",
            STREAMGROUP_PRODUCER_INTERVAL_MS="50",
            STREAMGROUP_METRICS_PORT=str(free_port()),
        ),
        image, "streamgroup-producer",
        timeout=120, check=False,
    )  # fmt: skip
    assert producer.returncode == 0, producer.stderr[-4000:]
    assert client.xlen(stream) == 5
    assert {fields["serial"] for _id, fields in client.xrange(stream)} == {"1", "2", "3", "4", "5"}

    # 2. A consumer, with the image's default command, works through them.
    name = f"streamgroup-image-test-{uuid.uuid4().hex[:8]}"
    metrics_port = free_port()
    log_path = tmp_path / "consumer.log"
    with log_path.open("w") as log_file:
        run = subprocess.Popen(
            [
                "podman", "run", "--rm", "--name", name, "--network=host",
                *_service_env(
                    image_redis, stream, group,
                    STREAMGROUP_CONSUMER_NAME=consumer,
                    STREAMGROUP_METRICS_PORT=str(metrics_port),
                    STREAMGROUP_SHUTDOWN_GRACE_SECONDS="5",
                ),
                image,
            ],
            env=podman.env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        group_info: dict = {}
        while time.monotonic() < deadline:
            if run.poll() is not None:
                pytest.fail(f"consumer exited early ({run.returncode}):\n{log_path.read_text()}")
            groups = client.xinfo_groups(stream) if client.exists(stream) else []
            group_info = next((g for g in groups if g["name"] == group), {})
            if group_info.get("entries-read") == 5 and group_info.get("pending") == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"messages not consumed: {group_info}\n{log_path.read_text()[-4000:]}")

        assert group_info["lag"] == 0
        assert client.xpending(stream, group)["pending"] == 0
        consumers = {c["name"]: c for c in client.xinfo_consumers(stream, group)}
        assert consumer in consumers, consumers

        # The metrics endpoint of the containerised consumer answers on the configured port.
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            metrics = reply.read().decode()
        assert "streamgroup_" in metrics

        # `streamgroup status --json` from the same image agrees.
        status = podman.run(
            "run", "--rm", "--network=host",
            *_service_env(image_redis, stream, group),
            image, "streamgroup", "status", "--json",
            timeout=60,
        )  # fmt: skip
        stats = json.loads(status.stdout)
        assert (stats["stream_length"], stats["pending"], stats["entries_read"]) == (5, 0, 5)

        # 3. SIGTERM through tini: the consumer stops cleanly (exit 0), well before a SIGKILL.
        started = time.monotonic()
        podman.run("stop", "--time", "30", name, timeout=60)
        code = run.wait(timeout=60)
        assert code == 0, f"consumer exit code {code}\n{log_path.read_text()[-4000:]}"
        assert time.monotonic() - started < 25
    finally:
        if run.poll() is None:
            podman.run("rm", "--force", name, check=False)
            run.wait(timeout=60)
        client.close()

    # The service logs JSON on the container's output (what the default handler handled is checked
    # in Redis above, not in its logs); it saw the SIGTERM that `podman stop` sent to tini (PID 1),
    # which passed it on.
    events = _json_lines(log_path.read_text())
    stopping = [e for e in events if str(e.get("event", "")).startswith("stopping")]
    assert [e.get("signal") for e in stopping] == ["SIGTERM"], events[-5:]


# --- reproducible build (issue 11.11) -------------------------------------------------------------


def test_dockerfile_pins_its_base_by_digest() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG PYTHON_BASE=(\S+)$", dockerfile, re.M)
    assert re.fullmatch(r"docker\.io/library/python:3\.12-slim@sha256:[0-9a-f]{64}", base), base
    # Every stage builds on it; nothing else is pulled.
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${PYTHON_BASE}", "${PYTHON_BASE}"]


def test_dependencies_install_only_from_the_hashed_lock() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if re.search(r"pip install", line)]
    assert installs and all("--require-hashes" in line or "--no-index" in line for line in installs), installs
    lock = (REPO_ROOT / "requirements" / "image.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock, re.M))
    # Every runtime dependency of pyproject.toml is pinned, at a version its specifier allows.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    for requirement in map(Requirement, project["dependencies"]):
        name = canonicalize_name(requirement.name)
        pinned = {canonicalize_name(k): v for k, v in pins.items()}
        assert name in pinned, f"{requirement.name} is not in requirements/image.txt: run `make image-lock`"
        assert requirement.specifier.contains(pinned[name]), f"{requirement} vs {pinned[name]}: run `make image-lock`"
    # ...each with at least one hash.
    for block in re.split(r"\n(?=[A-Za-z0-9_.-]+==)", lock):
        if re.match(r"[A-Za-z0-9_.-]+==", block):
            assert "--hash=sha256:" in block, block.splitlines()[0]


def test_image_python_is_the_base_python(podman, image: str, base_image: str) -> None:
    """The venv was made by and runs the base's own interpreter: same version, same binary."""
    probe = "import sys, platform; print(platform.python_version(), sys.base_prefix, sys.implementation.cache_tag)"
    base = podman.run("run", "--rm", "--network=none", base_image, "python3", "-c", probe).stdout.split()
    service = podman.run(
        "run", "--rm", "--network=none", "--entrypoint", "/opt/streamgroup/bin/python", image, "-c", probe
    ).stdout.split()
    assert service == base
    cfg = podman.run("run", "--rm", "--network=none", image, "cat", "/opt/streamgroup/pyvenv.cfg").stdout
    assert re.search(rf"^version(_info)? = {re.escape(base[0])}", cfg, re.M), cfg
