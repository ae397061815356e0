"""`helm install streamgroup ...` (issue 11.1): with the release named like the chart, the bundled
Redis' Service is `streamgroup-redis`, and Kubernetes would inject STREAMGROUP_REDIS_PORT,
STREAMGROUP_REDIS_SERVICE_HOST, ... into every pod of the namespace. The chart turns service links
off; the services must start even where they are on (another release, an older chart, a Service
of someone else named streamgroup-*). So a real consumer process is started here with exactly the
environment its rendered pod gets, plus every service-link variable Kubernetes would inject for
the release's Services."""

from __future__ import annotations

import base64
import ipaddress
import re
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from conftest import CHART, NAMESPACE
from streamgroup.devserver import DevServer, free_port
from support.processes import ServiceProcess, service_env, wait_for

RELEASE = "streamgroup"


def _render_release() -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [
        doc
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def service_link_variables(services: list[dict]) -> dict[str, str]:
    """What the kubelet injects for each Service with a cluster IP (pkg/kubelet/envvars): the
    Docker-links style variables and the {NAME}_SERVICE_HOST/PORT ones. Headless Services get none."""
    env: dict[str, str] = {}
    for number, service in enumerate(services):
        spec = service["spec"]
        if spec.get("clusterIP") == "None":
            continue
        ip = str(ipaddress.ip_address("10.96.0.10") + number)  # the API server assigns one
        name = re.sub(r"[^A-Z0-9]", "_", service["metadata"]["name"].upper())
        first = spec["ports"][0]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(first["port"])
        env[f"{name}_PORT"] = f"{first.get('protocol', 'TCP').lower()}://{ip}:{first['port']}"
        for port in spec["ports"]:
            protocol = port.get("protocol", "TCP")
            if "name" in port:
                env[f"{name}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
            prefix = f"{name}_PORT_{port['port']}_{protocol}"
            env[prefix] = f"{protocol.lower()}://{ip}:{port['port']}"
            env[f"{prefix}_PROTO"] = protocol.lower()
            env[f"{prefix}_PORT"] = str(port["port"])
            env[f"{prefix}_ADDR"] = ip
    return env


def test_service_link_variables_look_like_the_kubelets():
    service = {"metadata": {"name": "streamgroup-redis"}, "spec": {"ports": [{"name": "redis", "port": 6379}]}}
    assert service_link_variables([service]) == {
        "STREAMGROUP_REDIS_SERVICE_HOST": "10.96.0.10",
        "STREAMGROUP_REDIS_SERVICE_PORT": "6379",
        "STREAMGROUP_REDIS_SERVICE_PORT_REDIS": "6379",
        "STREAMGROUP_REDIS_PORT": "tcp://10.96.0.10:6379",
        "STREAMGROUP_REDIS_PORT_6379_TCP": "tcp://10.96.0.10:6379",
        "STREAMGROUP_REDIS_PORT_6379_TCP_PROTO": "tcp",
        "STREAMGROUP_REDIS_PORT_6379_TCP_PORT": "6379",
        "STREAMGROUP_REDIS_PORT_6379_TCP_ADDR": "10.96.0.10",
    }


def test_every_pod_of_release_streamgroup_turns_service_links_off():
    objects = _render_release()
    pods = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    pods += [o["spec"] for o in objects if o["kind"] == "Pod"]
    assert len(pods) >= 3
    assert all(pod["enableServiceLinks"] is False for pod in pods)


@pytest.mark.timeout(120)
def test_consumer_starts_with_its_rendered_environment_and_injected_service_links(tmp_path: Path):
    """Needs the settings to ignore Kubernetes' service-link variables (issue 11.1, code side)."""
    objects = _render_release()
    services = [o for o in objects if o["kind"] == "Service"]
    assert "streamgroup-redis" in {s["metadata"]["name"] for s in services}
    links = service_link_variables(services)
    assert "STREAMGROUP_REDIS_PORT" in links

    pod = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "streamgroup-consumer")
    pod_spec = pod["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    config_map = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "streamgroup")
    secret = next(o for o in objects if o["kind"] == "Secret")
    password = base64.b64decode(secret["data"]["password"]).decode()

    # The pod's environment as the kubelet builds it: service links first, then envFrom, then env.
    pod_name = "streamgroup-consumer-6d9f7b-x2x7q"
    environment = dict(links)
    environment.update(config_map["data"])
    for variable in container["env"]:
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
        elif variable["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}:
            environment[variable["name"]] = pod_name
        else:
            raise AssertionError(f"unexpected env source {variable}")

    # Only what a machine without a cluster cannot provide is replaced: the Service DNS name by
    # the real server's address, the mounted Secret's path by a file with the same password.
    server = DevServer("redis", extra_args=["--requirepass", password]).start()
    try:
        url = environment["STREAMGROUP_REDIS_URL"]
        assert url == f"redis://streamgroup-redis.{NAMESPACE}.svc:6379/0"
        environment["STREAMGROUP_REDIS_URL"] = f"redis://127.0.0.1:{server.port}/0"
        password_file = tmp_path / "password"
        password_file.write_text(password)
        assert environment["STREAMGROUP_REDIS_PASSWORD_FILE"].startswith("/var/run/secrets/streamgroup/")
        environment["STREAMGROUP_REDIS_PASSWORD_FILE"] = str(password_file)
        environment["STREAMGROUP_METRICS_PORT"] = str(free_port())  # 9180 may be taken here

        env = {k: v for k, v in service_env("unused").items() if not k.startswith("STREAMGROUP_")}
        env.update(environment)
        consumer = ServiceProcess("consumer", env, tmp_path / "consumer.log", int(env["STREAMGROUP_METRICS_PORT"]))
        consumer.start()
        try:

            def ready() -> bool:
                if not consumer.alive():
                    raise AssertionError(f"consumer exited {consumer.process.returncode}:\n{consumer.output}")
                try:
                    return consumer.get("/readyz")[0] == 200
                except OSError:
                    return False

            wait_for(ready, timeout=60, interval=0.2, what="consumer ready")
            assert consumer.stop() == 0, consumer.output
        finally:
            if consumer.alive():
                consumer.kill()
    finally:
        server.close()
