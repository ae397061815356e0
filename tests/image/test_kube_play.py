"""The chart's pods for real (issue 13): the Deployments rendered by real Helm, run by
`podman kube play` with the image built from this checkout, against a real redis-server.

No Kubernetes API server runs here, so Services, the StatefulSet, KEDA and the monitoring objects
are not run; the pod specs, their ConfigMap, security context, downward API, entrypoint and
signals are. Each change the test makes to the rendered pods is a CI MEASURE for what podman 4.3
or this machine cannot do the Kubernetes way, and is named where it is made:

- hostNetwork: true -- there is no Service DNS or pod network here; the pods reach the loopback
  Redis and the test reaches their metrics ports directly;
- a distinct metrics port per played pod and no `ports:` -- every pod shares the host's network,
  so each must listen on its own port (and the probes then name the port by number);
- one ConfigMap copy per played pod carrying that port -- podman 4.3 lets `envFrom` override `env`
  (Kubernetes: `env` wins), so the port cannot be set through `env`; the copy changes nothing else;
- the consumer Deployment played twice under two names (consumer-a, consumer-b) instead of
  replicas: 2 -- its replicas would share one metrics port on the host network;
- no probes in the played spec -- podman runs liveness probes as systemd-timer health checks with
  curl, which neither this machine (no systemd) nor the image has; the test makes the probes'
  own requests (their path and port from the rendered spec) itself;
- `podman pod stop -t <terminationGracePeriodSeconds>` -- podman ignores the field.
"""

from __future__ import annotations

import copy
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import helm_python as helm
import pytest
import redis
import yaml

from streamgroup.devserver import free_port as _free_port
from support.processes import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)

CHART = REPO_ROOT / "deploy" / "helm" / "streamgroup"
RELEASE = "sg"
STREAM, GROUP = "kube-play-stream", "kube-play-group"
UID = 10001


@dataclass
class Redis:
    """A redis-server on a fixed loopback port that the test can stop and start again (AOF on, so
    the stream and its group survive)."""

    directory: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5)

    def start(self) -> Redis:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--save", "", "--logfile", str(self.directory / "redis.log")]
        )  # fmt: skip
        wait_for(lambda: self._pings(), 20, interval=0.5, what="redis-server up")
        return self

    def _pings(self) -> bool:
        try:
            with self.client() as client:
                return client.ping()
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


@pytest.fixture
def kube_redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path, _free_port()).start()
    try:
        yield server
    finally:
        server.stop()


def _values_file(name: str) -> dict:
    return yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text()) if name else {}


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _render(values: dict) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=RELEASE, namespace="default", is_install=True)
    return [d for p, t in rendered.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]


def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


@dataclass
class Played:
    name: str  # the Deployment name as played
    component: str
    metrics_port: int
    probes: dict  # the rendered probes, before they were taken out
    pod: str = ""

    @property
    def container(self) -> str:
        return f"{self.pod}-{self.component}"


def _podman_ready_pods(podman, deployment: Played) -> str:
    pods = json.loads(podman.run("pod", "ps", "--format", "json").stdout or "[]")
    names = [p["Name"] for p in pods if p["Name"].startswith(f"{deployment.name}-pod")]
    assert len(names) <= 1, names
    return names[0] if names else ""


def _play(podman, objects: list[dict], tmp_path: Path, plays: list[tuple[str, str]]) -> list[Played]:
    """Play the rendered Deployments, adjusted for podman (each adjustment a CI measure)."""
    config_map = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("streamgroup"))
    deployments = {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o for o in objects if o["kind"] == "Deployment"
    }
    played = []
    for name, component in plays:
        deployment = copy.deepcopy(deployments[component])
        port = _free_port()
        deployment["metadata"]["name"] = name  # CI measure: two plays stand for two replicas
        deployment["spec"]["replicas"] = 1
        pod = deployment["spec"]["template"]["spec"]
        pod["hostNetwork"] = True  # CI measure: no pod network or Service DNS here
        (container,) = [c for c in pod["containers"] if c["name"] == component]
        container.pop("ports")  # CI measure: host network, nothing to map
        probes = {k: container.pop(k) for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in container}
        # CI measure: podman 4.3 lets envFrom override env, so the port goes into a ConfigMap copy.
        copy_map = copy.deepcopy(config_map)
        copy_map["metadata"]["name"] = f"{name}-config"
        copy_map["data"]["STREAMGROUP_METRICS_PORT"] = str(port)
        (source,) = container["envFrom"]
        source["configMapRef"]["name"] = f"{name}-config"
        # ConfigMaps the values refer to and a cluster would already have (everything-on mounts one).
        extra_maps = [o for o in objects if o["kind"] == "ConfigMap" and o is not config_map] + [
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": v["configMap"]["name"]}, "data": {"x": "1"}}
            for v in pod.get("volumes", [])
            if "configMap" in v
        ]
        map_files = []
        for number, obj in enumerate([copy_map, *extra_maps]):
            path = tmp_path / f"{name}-configmap-{number}.yaml"
            path.write_text(yaml.safe_dump(obj))
            map_files += ["--configmap", str(path)]
        play_file = tmp_path / f"{name}.yaml"
        play_file.write_text(yaml.safe_dump(deployment))
        podman.run("kube", "play", *map_files, str(play_file), timeout=180)
        entry = Played(name, component, port, probes)
        entry.pod = wait_for(
            lambda entry=entry: _podman_ready_pods(podman, entry), 60, interval=0.5, what=f"pod of {name}"
        )
        played.append(entry)
    return played


def _inspect(podman, container: str) -> dict:
    return json.loads(podman.run("inspect", container).stdout)[0]


def _exec(podman, container: str, *command: str) -> subprocess.CompletedProcess:
    return podman.run("exec", container, *command, check=False)


def _probe(entry: Played, name: str) -> int:
    get = entry.probes[name]["httpGet"]
    assert get["port"] == "metrics", get  # the named port the pod's container declares
    return _get(entry.metrics_port, get["path"])


def _run_release(podman, image: str, kube_redis: Redis, tmp_path: Path, values_name: str) -> None:
    repository, tag = image.rsplit(":", 1)
    values = _merge(
        _values_file(values_name),
        {
            "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
            "redis": {
                "bundled": {"enabled": False},
                "external": {"url": kube_redis.url},
                "auth": {"existingSecret": ""},
            },
            "producer": {"enabled": True},
            "config": {"stream": STREAM, "group": GROUP, "producerIntervalMs": 50, "deadLetterStream": None,
                       "claimMinIdleMs": 60000, "logFormat": "json", "maxMessages": 0},
        },
    )  # fmt: skip
    objects = _render(values)
    grace = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    plays = [(f"{RELEASE}-consumer-a", "consumer"), (f"{RELEASE}-consumer-b", "consumer"),
             (f"{RELEASE}-producer", "producer"), (f"{RELEASE}-reclaimer", "reclaimer")]  # fmt: skip
    played: list[Played] = []
    # Pods an interrupted earlier run may have left behind would make `kube play` refuse the names.
    for name, _ in plays:
        leftovers = podman.run("pod", "ps", "--quiet", "--filter", f"name=^{name}-pod", check=False).stdout.split()
        for pod_id in leftovers:
            podman.run("pod", "rm", "--force", pod_id, check=False, timeout=120)
    try:
        played = _play(podman, objects, tmp_path, plays)
        consumers = [p for p in played if p.component == "consumer"]
        client = kube_redis.client()

        # Every process answers its probes' requests: alive and, connected to Redis, ready.
        for entry in played:
            wait_for(
                lambda entry=entry: _probe(entry, "readinessProbe") == 200, 60, interval=0.5, what=f"{entry.name} ready"
            )
            assert _probe(entry, "livenessProbe") == 200

        # Messages flow end to end, through both consumers, named after their pods (downward API).
        def flowing() -> bool:
            names = {c["name"]: c for c in client.xinfo_consumers(STREAM, GROUP)} if client.exists(STREAM) else {}
            return (
                all(names.get(c.pod, {}).get("pending", -1) >= 0 for c in consumers)
                and client.xinfo_groups(STREAM)[0]["entries-read"] > 50
            )

        wait_for(flowing, 90, interval=0.5, what="messages consumed by both consumer pods")
        assert {c["name"] for c in client.xinfo_consumers(STREAM, GROUP)} == {c.pod for c in consumers}

        # The security context holds, and tini is PID 1 with the service as its child.
        for entry in played:
            config = _inspect(podman, entry.container)
            assert config["HostConfig"]["ReadonlyRootfs"] is True, entry.name
            assert _exec(podman, entry.container, "id", "-u").stdout.strip() == str(UID)
            assert _exec(podman, entry.container, "touch", "/opt/written").returncode != 0
            pid1 = _exec(podman, entry.container, "cat", "/proc/1/cmdline").stdout.split("\0")
            assert pid1[0].rsplit("/", 1)[-1] == "tini", f"{entry.name}: PID 1 is {pid1}"
            assert f"streamgroup-{entry.component}" in " ".join(pid1), pid1
            status = _exec(podman, entry.container, "cat", "/proc/self/status").stdout
            assert f"Uid:\t{UID}\t{UID}" in status

        # Redis stops: readiness drops, liveness stays (no restart for an outage); back, ready again.
        kube_redis.stop()
        for entry in played:
            wait_for(
                lambda entry=entry: _probe(entry, "readinessProbe") == 503,
                60,
                interval=0.5,
                what=f"{entry.name} not ready",
            )
            assert _probe(entry, "livenessProbe") == 200, entry.name
        kube_redis.start()
        for entry in played:
            wait_for(
                lambda entry=entry: _probe(entry, "readinessProbe") == 200,
                90,
                interval=0.5,
                what=f"{entry.name} ready again",
            )

        # No new work; the consumers catch up, then stop within the grace period: exit 0, nothing
        # left pending.
        podman.run("pod", "stop", "-t", str(grace), played[2].pod, timeout=grace + 60)
        client = kube_redis.client()
        wait_for(lambda: client.xinfo_groups(STREAM)[0]["lag"] == 0, 90, interval=0.5, what="consumers caught up")
        for consumer in consumers:
            podman.run("pod", "stop", "-t", str(grace), consumer.pod, timeout=grace + 60)
            state = _inspect(podman, consumer.container)["State"]
            assert state["ExitCode"] == 0, (consumer.name, state)
        assert client.xpending(STREAM, GROUP)["pending"] == 0
        assert {c["name"] for c in client.xinfo_consumers(STREAM, GROUP) if c["pending"]} == set()
    except BaseException:
        for entry in played:
            logs = podman.run("logs", "--tail", "40", entry.container, check=False)
            print(f"--- {entry.container}\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        raise
    finally:
        for entry in played:
            podman.run("pod", "rm", "--force", entry.pod, check=False, timeout=120)


@pytest.mark.parametrize("values_name", ["", "everything-on-values"], ids=["defaults", "everything-on"])
def test_rendered_pods_run_under_podman_kube_play(podman, image, kube_redis, tmp_path, values_name):
    _run_release(podman, image, kube_redis, tmp_path, values_name)
