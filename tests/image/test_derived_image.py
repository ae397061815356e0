"""The documented way to ship a handler: a derived image (examples/orders-handler/Dockerfile,
`FROM` the streamgroup image + the handler package), really built with podman on top of the image
the other image tests build, and really run: orders go in, the example handler counts them once
each, and every entry is acknowledged."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "orders-handler"
DERIVED = "localhost/orders-consumer:image-test"


@pytest.fixture(scope="session")
def derived_image(podman, image: str, image_build_args: list[str]) -> str:
    # The options the streamgroup image was built with (no pull; the CA bundle for pip behind
    # the re-signing proxy), without its Dockerfile and context.
    options = image_build_args[: image_build_args.index("--file")]
    args = [*options, "--build-arg", f"STREAMGROUP_IMAGE={image}"]
    podman.run("build", *args, "--tag", DERIVED, "--file", str(EXAMPLE / "Dockerfile"), str(EXAMPLE), timeout=600)
    return DERIVED


def test_derived_image_keeps_the_base_image_setup(podman, image: str, derived_image: str) -> None:
    probe = "id -u; command -v pip || echo no-pip; python3 -c 'import orders_handler, streamgroup; print(\"ok\")'"
    proc = podman.run("run", "--rm", "--network=none", derived_image, "sh", "-c", probe)
    assert proc.stdout.split() == ["10001", "no-pip", "ok"], proc.stdout
    for key in ("Entrypoint", "Cmd", "User"):
        fmt = f"{{{{json .Config.{key}}}}}"
        base = podman.run("image", "inspect", "--format", fmt, image).stdout
        assert podman.run("image", "inspect", "--format", fmt, derived_image).stdout == base, key


def test_derived_image_handles_orders_once_each_end_to_end(
    podman, derived_image: str, image_redis, free_port, tmp_path: Path
) -> None:
    stream, group = "orders", "billing"
    client = image_redis.client()
    for n, order_id in enumerate(["A-1", "A-2", "A-1", "A-3"]):  # A-1 twice: a producer's re-send
        client.xadd(stream, {"order_id": order_id, "customer": "acme", "amount_cents": str(1000 + n)})
    name = f"orders-consumer-test-{uuid.uuid4().hex[:8]}"
    log_path = tmp_path / "consumer.log"
    with log_path.open("w") as log_file:
        run = subprocess.Popen(
            [
                "podman", "run", "--rm", "--name", name, "--network=host",
                "-e", f"STREAMGROUP_REDIS_URL={image_redis.url}",
                "-e", f"STREAMGROUP_STREAM={stream}",
                "-e", f"STREAMGROUP_GROUP={group}",
                "-e", f"STREAMGROUP_METRICS_PORT={free_port()}",
                "-e", "STREAMGROUP_SHUTDOWN_GRACE_SECONDS=5",
                derived_image,  # its default command: streamgroup-consumer, with the orders handler
            ],
            env=podman.env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        info: dict = {}
        while time.monotonic() < deadline:
            if run.poll() is not None:
                pytest.fail(f"consumer exited ({run.returncode}):\n{log_path.read_text()[-4000:]}")
            groups = client.xinfo_groups(stream)
            info = groups[0] if groups else {}
            if info.get("entries-read") == 4 and info.get("pending") == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"orders not handled: {info}\n{log_path.read_text()[-4000:]}")
        # Counted by the example handler, A-1 once: 1000 + 1001 + 1003.
        assert client.hgetall("{orders}:revenue_cents") == {"acme": "3004"}
        assert client.xlen(f"{stream}:dead") == 0
        podman.run("stop", "--time", "30", name, timeout=60)
        assert run.wait(timeout=60) == 0, log_path.read_text()[-4000:]
    finally:
        if run.poll() is None:
            podman.run("rm", "--force", name, check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(timeout=60)
        client.close()
