"""Fixtures for the container-image tests: podman set up in isolation, a stand-in base image,
the project's image built from the root Dockerfile, and a throwaway Redis server.

CI MEASURE -- the stand-in base. No container registry is reachable from CI or the developer
machines, so `python:3.12-slim` cannot be pulled. Instead a Debian bookworm rootfs is made with
`debootstrap --variant=minbase` (python3, python3-venv, ca-certificates: what the Dockerfile
needs from its base), imported with `podman import` and tagged `docker.io/library/python:3.12-slim`
-- in a podman storage of its own (under STREAMGROUP_IMAGE_TEST_CACHE), never in the machine's
default storage, so nothing else on the machine mistakes it for the official image. The build
runs with `--pull=never`. The official image has Python 3.12 at /usr/local/bin; the stand-in has
Debian's 3.11 at /usr/bin: the Dockerfile only ever calls `python3` and works in venvs, so it is
the same Dockerfile for both. See docs/image.md.

The stand-in is kept between runs (a fresh machine builds it once, ~1 minute) and rebuilt when
the recipe below changes (its hash is a label on the image).

Podman on these machines needs `runtime = "runc"` and raised default ulimits (crun fails on the
hybrid cgroup setup and on raising limits); that goes in a containers.conf of our own, pointed at
by CONTAINERS_CONF, so /etc is never relied upon or changed.

A missing tool (podman, runc, debootstrap, redis-server) or a failing build FAILS the tests:
nothing here skips.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

REPO_ROOT = Path(__file__).resolve().parents[2]

# The Dockerfile's default base (ARG PYTHON_BASE), fully qualified as podman stores it.
BASE_IMAGE = "docker.io/library/python:3.12-slim"
IMAGE = "localhost/streamgroup:image-test"
BUILDER_IMAGE = "localhost/streamgroup:image-test-builder"

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("STREAMGROUP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)
RECIPE_LABEL = "io.streamgroup.ci-stand-in-recipe"
RECIPE = hashlib.sha256(repr((DEBIAN_SUITE, "minbase", BASE_PACKAGES, BASE_CHANGES)).encode()).hexdigest()[:16]

CACHE_DIR = Path(os.environ.get("STREAMGROUP_IMAGE_TEST_CACHE", "/var/tmp/streamgroup-image-test"))
RUN_DIR = Path("/run/streamgroup-image-test")

CONTAINERS_CONF = """\
# Written by tests/image/conftest.py: podman settings that work on the CI machines.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{run}/events.log"
tmp_dir = "{run}/libpod"
"""

STORAGE_CONF = """\
# Written by tests/image/conftest.py: a podman storage used only by the image tests.
[storage]
driver = "overlay"
graphroot = "{cache}/storage"
runroot = "{run}/storage"
"""

REQUIRED_TOOLS = ("podman", "runc", "debootstrap", "tar", "redis-server")


@dataclass(frozen=True)
class Podman:
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"podman {' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
            )
        return proc

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0


def _log(msg: str) -> None:
    print(f"[image-test] {msg}", flush=True)


@pytest.fixture(scope="session")
def podman() -> Podman:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"tools missing for the image tests: {', '.join(missing)} "
            "(Debian packages listed in .ci/apt-packages; `make system-deps` installs them)"
        )
    if os.geteuid() != 0:
        pytest.fail("the image tests need root (debootstrap, rootful podman)")

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    containers_conf = CACHE_DIR / "containers.conf"
    storage_conf = CACHE_DIR / "storage.conf"
    containers_conf.write_text(CONTAINERS_CONF.format(run=RUN_DIR))
    storage_conf.write_text(STORAGE_CONF.format(cache=CACHE_DIR, run=RUN_DIR))

    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(containers_conf)
    env["CONTAINERS_STORAGE_CONF"] = str(storage_conf)
    # Never let a registry be contacted for a short name, whatever the machine's settings say.
    env.pop("REGISTRY_AUTH_FILE", None)
    return Podman(env=env)


def _build_stand_in_base(podman: Podman) -> None:
    """debootstrap a minbase bookworm with Python and import it as BASE_IMAGE (CI measure)."""
    started = time.monotonic()
    for stale in CACHE_DIR.glob("rootfs-*"):  # left by an interrupted earlier run
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                DEBIAN_SUITE,
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            pytest.fail(f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        # Like the official slim image: no package lists, no downloaded .debs.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        changes = [arg for change in BASE_CHANGES for arg in ("--change", change)]
        changes += ["--change", f"LABEL {RECIPE_LABEL}={RECIPE}"]
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."],
            stdout=subprocess.PIPE,
        )
        try:
            podman.run("import", *changes, "-", BASE_IMAGE, stdin=tar.stdout, timeout=300)
        finally:
            tar.stdout.close()
            assert tar.wait(timeout=60) == 0, "tar of the debootstrap rootfs failed"
    _log(f"stand-in base {BASE_IMAGE} made in {time.monotonic() - started:.0f}s")


@pytest.fixture(scope="session")
def base_image(podman: Podman) -> str:
    if podman.image_exists(BASE_IMAGE):
        label = podman.run(
            "image", "inspect", "--format", f'{{{{index .Labels "{RECIPE_LABEL}"}}}}', BASE_IMAGE
        ).stdout.strip()
        if label == RECIPE:
            _log(f"reusing stand-in base {BASE_IMAGE}")
            return BASE_IMAGE
        podman.run("rmi", "--force", BASE_IMAGE)
    _build_stand_in_base(podman)
    return BASE_IMAGE


def _host_ca_bundle() -> Path | None:
    for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def image_build_args(base_image: str) -> list[str]:
    """`podman build` arguments shared by every build of the root Dockerfile here (the same
    arguments, so a second build with another --target reuses the cached layers)."""
    # CI measure: the Dockerfile pins its base by digest; the stand-in cannot have that digest,
    # so the build is pointed at the stand-in's tag instead (docs/image.md).
    args = ["--pull=never", "--network=host", "--build-arg", f"PYTHON_BASE={base_image}"]
    ca = _host_ca_bundle()
    if ca is not None:
        # HTTPS here goes through a re-signing proxy: give pip in the builder the host's bundle.
        args += ["--volume", f"{ca}:/run/host-ca.crt:ro"]
        args += ["--build-arg", "PIP_CERT=/run/host-ca.crt"]
    return [*args, "--file", str(REPO_ROOT / "Dockerfile"), str(REPO_ROOT)]


@pytest.fixture(scope="session")
def images(podman: Podman, image_build_args: list[str]) -> tuple[str, str]:
    """The project's image, built from the root Dockerfile on the stand-in base, and its
    `builder` stage (tagged too, so its layers stay cached and tests can look into it)."""
    started = time.monotonic()
    podman.run("build", "--target", "builder", "--tag", BUILDER_IMAGE, *image_build_args, timeout=600)
    podman.run("build", "--tag", IMAGE, *image_build_args, timeout=600)
    _log(f"image {IMAGE} built in {time.monotonic() - started:.0f}s")
    # Drop leftovers of earlier builds (untagged, childless); the current layer chains stay.
    podman.run("image", "prune", "--force", check=False)
    return IMAGE, BUILDER_IMAGE


@pytest.fixture(scope="session")
def image(images: tuple[str, str]) -> str:
    return images[0]


@pytest.fixture(scope="session")
def builder_image(images: tuple[str, str]) -> str:
    return images[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port():
    """A function returning a currently free loopback TCP port."""
    return _free_port


@dataclass(frozen=True)
class RedisServer:
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)


@pytest.fixture
def image_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, reachable from --network=host containers."""
    port = _free_port()
    log = tmp_path / "redis.log"
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(tmp_path),
            "--logfile", str(log),
        ]
    )  # fmt: skip
    server = RedisServer(port)
    client = server.client()
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                output = log.read_text() if log.exists() else ""
                pytest.fail(f"redis-server did not start:\n{output}")
            time.sleep(0.05)
    try:
        yield server
    finally:
        client.close()
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
