"""The chart as Helm sees it: lint, schema, documented values, and the contract with the services."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess

import helm_python as helm
import pytest
import yaml

from conftest import (
    CHART,
    CI_VALUES,
    OLDEST_KUBERNETES,
    ci_values,
    component_name,
    find,
    one,
    render,
    render_templates,
)
from streamgroup.settings import ENV_PREFIX, Settings

COMPONENTS = ("producer", "consumer", "reclaimer")
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


# --- Helm lint and rendering ------------------------------------------------------------------


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_strict_lint_is_clean(values_file):
    values = ci_values(values_file) if values_file else None
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{OLDEST_KUBERNETES}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings would fail a strict lint.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_chart_claims_its_oldest_kubernetes():
    with helm.Chart.load(CHART) as chart:
        assert chart.metadata["kubeVersion"] == f">={OLDEST_KUBERNETES}-0"


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_ci_values_render_every_component(values_file):
    values = ci_values(values_file)
    objects = render(values)
    deployments = {d["metadata"]["name"] for d in find(objects, "Deployment")}
    defaults = {"producer": False, "consumer": True, "reclaimer": True}
    expected = {component_name(c) for c in COMPONENTS if values.get(c, {}).get("enabled", defaults[c])}
    assert deployments == expected


def test_ci_values_cover_the_optional_objects():
    kinds = {o["kind"] for path in CI_VALUES for o in render(ci_values(path))}
    for kind in (
        "PodMonitor",
        "PrometheusRule",
        "ScaledObject",
        "TriggerAuthentication",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "StatefulSet",
    ):
        assert kind in kinds, f"no ci/*.yaml renders a {kind}"


def test_optional_objects_are_off_by_default(rendered_defaults):
    kinds = sorted({o["kind"] for o in rendered_defaults})
    assert kinds == ["ConfigMap", "Deployment", "Pod", "Secret", "Service", "ServiceAccount", "StatefulSet"]


def test_the_load_generator_is_off_by_default_and_on_in_the_demo(rendered_defaults, renders):
    assert find(rendered_defaults, "Deployment", component_name("producer")) == []
    assert one(renders("demo-values"), "Deployment", component_name("producer"))


def test_notes_tell_the_next_steps():
    notes = render_templates()["streamgroup/templates/NOTES.txt"]
    assert "helm test rel --namespace streamgroup" in notes
    assert f"scale deploy/{component_name('consumer')}" in notes
    assert "streamgroup status" in notes
    assert "/metrics" in notes


# --- values.schema.json --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"consumer": {"replicas": -1}}, "at '/consumer/replicas': minimum: got -1, want 0"),
        ({"consumer": {"replicas": "2"}}, "at '/consumer/replicas': got string, want integer"),
        ({"consumer": {"replicas": 1.5}}, "at '/consumer/replicas': got number, want integer"),
        ({"consumerz": {}}, "additional properties 'consumerz' not allowed"),
        ({"consumer": {"replica": 2}}, "at '/consumer': additional properties 'replica' not allowed"),
        ({"config": {"logFormat": "xml"}}, "at '/config/logFormat'"),
        (
            {"prometheusRule": {"rules": {"pendingHigh": {"for": "ten minutes"}}}},
            "at '/prometheusRule/rules/pendingHigh/for'",
        ),
        ({"redis": {"external": {"url": "redis://:secret@redis:6379/0"}}}, "at '/redis/external/url'"),
    ],
)
def test_schema_rejects_bad_values(values, message):
    with pytest.raises(helm.HelmValuesError) as raised:
        render_templates(values)
    assert message in str(raised.value)


def _own_objects(node, path="values"):
    """Every object schema the chart defines itself (not Kubernetes types passed through)."""
    own = node.get("type") == "object" and "passed through verbatim" not in node.get("description", "")
    if own and "properties" in node:
        yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _own_objects(child, f"{path}.{key}")
    for child in node.get("anyOf", []):
        yield from _own_objects(child, path)
    for key, child in node.get("$defs", {}).items():
        yield from _own_objects(child, f"$defs.{key}")


def test_schema_closes_every_object_the_chart_defines():
    objects = dict(_own_objects(SCHEMA))
    assert len(objects) > 20
    open_ones = [path for path, node in objects.items() if node.get("additionalProperties") is not False]
    assert open_ones == []


def _schema_at(path: list[str]):
    node = SCHEMA
    for key in path:
        node = node.get("properties", {}).get(key)
        if node is None:
            return None
        if "$ref" in node:
            node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _free_form(node) -> bool:
    node = node or {}
    return "passed through verbatim" in node.get("description", "") or isinstance(
        node.get("additionalProperties"), dict
    )


def test_every_value_is_documented_with_a_comment_above_it():
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented = []
    checked = 0
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parents = [k for _, k in stack]
        stack.append((indent, key))
        # Keys inside Kubernetes objects (probes, security contexts) and inside free-form maps
        # (labels) are not the chart's: the value holding them is documented, they are not.
        if any(_free_form(_schema_at(parents[: i + 1])) for i in range(len(parents))):
            continue
        assert _schema_at([*parents, key]) is not None, f"{'.'.join([*parents, key])} is not in the schema"
        checked += 1
        previous = next((lines[i].strip() for i in range(number - 1, -1, -1) if lines[i].strip()), "")
        if not previous.startswith("#"):
            undocumented.append(".".join([*parents, key]))
    assert checked > 100
    assert undocumented == []


def test_schema_describes_every_default_value():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.values)
        assert set(SCHEMA["properties"]) - {"global"} == set(chart.values)


# --- the contract with the services ------------------------------------------------------------


def _container(deployment):
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container):
    return {e["name"]: e for e in container.get("env", [])}


def test_each_component_runs_its_service_in_args_under_the_image_entrypoint(renders):
    """`args` replace only the image's CMD: its ENTRYPOINT, tini, stays PID 1. A `command:` would
    replace tini (issue 11.6)."""
    objects = renders("demo-values")
    for component in COMPONENTS:
        deployment = one(objects, "Deployment", component_name(component))
        container = _container(deployment)
        assert "command" not in container
        assert container["args"] == [f"streamgroup-{component}"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector["app.kubernetes.io/component"] == component
        assert deployment["metadata"]["labels"]["app.kubernetes.io/component"] == component
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()


def test_consumer_name_comes_from_the_pod_name(rendered_defaults):
    container = _container(one(rendered_defaults, "Deployment", component_name("consumer")))
    assert _env(container)["STREAMGROUP_CONSUMER_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_only_variables_the_services_know_are_rendered(values_file):
    """An unknown STREAMGROUP_* variable makes a service exit 2 at start: none may be rendered."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    objects = render(ci_values(values_file) if values_file else None)
    names = set(one(objects, "ConfigMap", "rel-streamgroup")["data"])
    for pod in [d["spec"]["template"]["spec"] for d in find(objects, "Deployment")] + [
        p["spec"] for p in find(objects, "Pod")
    ]:
        for container in pod["containers"]:
            names |= set(_env(container))
    rendered = {n for n in names if n.startswith(ENV_PREFIX)}
    assert rendered - known == set()
    assert {"STREAMGROUP_REDIS_URL", "STREAMGROUP_STREAM", "STREAMGROUP_GROUP", "STREAMGROUP_CONSUMER_NAME"} <= rendered


def _pod_specs(objects):
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield obj["metadata"]["name"], obj["spec"]


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_every_container_is_locked_down(values_file):
    objects = render(ci_values(values_file) if values_file else None)
    pods = dict(_pod_specs(objects))
    assert pods
    for name, pod in pods.items():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert isinstance(sc["runAsUser"], int) and sc["runAsUser"] > 0, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            if not name.endswith("-redis"):
                assert sc["runAsUser"] == 10001, name
                mounts = {m["mountPath"] for m in container["volumeMounts"]}
                assert "/tmp" in mounts, name


def test_probes_use_healthz_and_readyz_on_the_metrics_port(renders):
    for component in COMPONENTS:
        container = _container(one(renders("demo-values"), "Deployment", component_name(component)))
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert container["ports"] == [{"name": "metrics", "containerPort": 9180, "protocol": "TCP"}]


def test_grace_period_covers_shutdown_grace_block_and_two_redis_timeouts(renders):
    """A stopping consumer may wait out a block, finish within its grace, and spend two Redis
    timeouts acknowledging and giving back its work: SIGKILL must not come before."""
    settings = Settings()
    for component in COMPONENTS:
        pod = one(renders("demo-values"), "Deployment", component_name(component))["spec"]["template"]["spec"]
        needed = 20 + settings.block_ms / 1000 + 2 * settings.redis_timeout_ms / 1000
        assert pod["terminationGracePeriodSeconds"] >= needed
    with pytest.raises(helm.HelmRenderError, match=r"terminationGracePeriodSeconds \(41\) must be at least .* = 42 s"):
        render({"terminationGracePeriodSeconds": 41})
    render({"terminationGracePeriodSeconds": 42})
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render({"config": {"redisTimeoutMs": 30000}})
    render({"terminationGracePeriodSeconds": 70, "config": {"shutdownGraceSeconds": 5, "redisTimeoutMs": 30000}})


def test_consumer_replicas_follow_values():
    objects = render({"consumer": {"replicas": 7}, "producer": {"enabled": True, "replicas": 0}})
    assert one(objects, "Deployment", component_name("consumer"))["spec"]["replicas"] == 7
    assert one(objects, "Deployment", component_name("producer"))["spec"]["replicas"] == 0


@pytest.mark.parametrize(
    ("values_file", "owner_kind"),
    [
        ("keda-on-values", "ScaledObject"),
        ("everything-on-values", "ScaledObject"),
        ("external-redis-values", "HorizontalPodAutoscaler"),
    ],
)
def test_autoscaled_consumer_leaves_replicas_to_its_scaler(renders, values_file, owner_kind):
    objects = renders(values_file)
    consumer = one(objects, "Deployment", component_name("consumer"))
    assert "replicas" not in consumer["spec"]
    owner = one(objects, owner_kind, component_name("consumer"))
    assert owner["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": component_name("consumer"),
    }
    # The other components keep theirs.
    assert one(objects, "Deployment", component_name("reclaimer"))["spec"]["replicas"] == 1


def test_hpa_and_keda_together_are_refused():
    both = {"consumer": {"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}}}
    with pytest.raises(helm.HelmRenderError, match="enable hpa or keda, not both"):
        render(both)


def test_keda_triggers_watch_lag_and_pending_of_the_group(renders):
    objects = renders("everything-on-values")
    triggers = one(objects, "ScaledObject")["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["redis-streams", "redis-streams"]
    lag, pending = triggers
    for trigger in triggers:
        assert trigger["metadata"]["stream"] == "orders"
        assert trigger["metadata"]["consumerGroup"] == "order-workers"
        # KEDA's operator resolves names in its own namespace: the address names ours.
        assert trigger["metadata"]["address"] == "rel-streamgroup-redis.streamgroup.svc:6379"
        assert trigger["authenticationRef"] == {"name": component_name("consumer")}
    assert lag["metadata"]["lagCount"] == "500"
    assert pending["metadata"]["pendingEntriesCount"] == "200"
    auth = one(objects, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "streamgroup-redis", "key": "password"}
    ]


def test_keda_address_comes_from_the_external_url():
    objects = render(
        {
            "redis": {"bundled": {"enabled": False}, "external": {"url": "rediss://cache.example:6380/3"}},
            "consumer": {"autoscaling": {"keda": {"enabled": True}}},
        }
    )
    (trigger,) = one(objects, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "cache.example:6380"
    assert trigger["metadata"]["databaseIndex"] == "3"
    assert trigger["metadata"]["enableTLS"] == "true"
    assert "authenticationRef" not in trigger


def test_keda_address_gets_the_default_port_when_the_url_has_none():
    objects = render(
        {
            "redis": {"bundled": {"enabled": False}, "external": {"url": "redis://cache.example/1"}},
            "consumer": {"autoscaling": {"keda": {"enabled": True}}},
        }
    )
    (trigger,) = one(objects, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "cache.example:6379"


def test_keda_gets_the_private_ca_client_certificate_and_acl_user(renders):
    values = ci_values(CHART / "ci" / "external-redis-values.yaml")
    values["consumer"]["autoscaling"] = {"keda": {"enabled": True}}
    values["redis"]["auth"]["username"] = "streams"
    objects = render(values)
    config = one(objects, "ConfigMap", "rel-streamgroup")["data"]
    assert config["STREAMGROUP_REDIS_URL"] == "rediss://streams@redis.example.internal:6380/2"
    (trigger,) = one(objects, "ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["username"] == "streams"
    assert trigger["metadata"]["enableTLS"] == "true"
    assert trigger["authenticationRef"] == {"name": component_name("consumer")}
    refs = one(objects, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert {(r["parameter"], r["name"], r["key"]) for r in refs} == {
        ("password", "redis-credentials", "redis-password"),
        ("ca", "redis-tls", "ca.crt"),
        ("cert", "redis-tls", "tls.crt"),
        ("key", "redis-tls", "tls.key"),
    }


def test_keda_scale_to_zero_is_refused():
    """KEDA maps an unknown (nil) lag to -1, "inactive": from zero replicas nothing would read again."""
    with pytest.raises(helm.HelmRenderError, match="minReplicaCount: 0 is refused"):
        render({"consumer": {"autoscaling": {"keda": {"enabled": True, "minReplicaCount": 0}}}})


def test_bundled_redis_keeps_an_append_only_file_on_a_volume(rendered_defaults):
    redis = one(rendered_defaults, "StatefulSet", component_name("redis"))
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert re.fullmatch(r"docker\.io/library/redis:7\.4\.\d+@sha256:[0-9a-f]{64}", container["image"])
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    service = one(rendered_defaults, "Service", component_name("redis"))
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    headless = one(rendered_defaults, "Service", redis["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    config = one(rendered_defaults, "ConfigMap", "rel-streamgroup")["data"]
    assert config["STREAMGROUP_REDIS_URL"] == "redis://rel-streamgroup-redis.streamgroup.svc:6379/0"


@pytest.mark.parametrize(("limit", "maxmemory"), [("512Mi", 402653184), ("2Gi", 1610612736), ("1G", 750000000)])
def test_bundled_redis_refuses_writes_before_its_memory_limit(limit, maxmemory):
    objects = render({"redis": {"bundled": {"resources": {"limits": {"memory": limit}}}}})
    args = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory") + 1] == str(maxmemory)
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    explicit = render({"redis": {"bundled": {"maxmemory": "100Mi"}}})
    args = one(explicit, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory") + 1] == str(100 * 1024 * 1024)


def test_bundled_redis_gets_a_generated_password_the_services_and_keda_use(rendered_defaults, renders):
    secret = one(rendered_defaults, "Secret", "rel-streamgroup-redis-password")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert len(base64.b64decode(secret["data"]["password"])) == 32
    redis = one(rendered_defaults, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert redis["args"][-2:] == ["--requirepass", "$(REDISCLI_AUTH)"]
    assert _env(redis)["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == {
        "name": "rel-streamgroup-redis-password",
        "key": "password",
    }
    consumer = one(rendered_defaults, "Deployment", component_name("consumer"))["spec"]["template"]["spec"]
    volume = next(v for v in consumer["volumes"] if v["name"] == "redis-password")
    assert volume["secret"]["secretName"] == "rel-streamgroup-redis-password"
    objects = render({"consumer": {"autoscaling": {"keda": {"enabled": True}}}})
    assert one(objects, "TriggerAuthentication")["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "rel-streamgroup-redis-password", "key": "password"}
    ]


def test_bundled_redis_probes_fail_on_an_error_reply(rendered_defaults, tmp_path):
    """redis-cli exits 0 on NOAUTH: the probes must compare the reply. Run each probe's shell
    command with a stand-in redis-cli answering NOAUTH, LOADING or PONG."""
    container = one(rendered_defaults, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    fake = tmp_path / "redis-cli"
    outcomes = {}
    for reply in ("PONG", "NOAUTH Authentication required.", "LOADING Redis is loading the dataset in memory"):
        fake.write_text(f"#!/bin/sh\necho '{reply}'\n")
        fake.chmod(0o755)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = container[probe]["exec"]["command"]
            env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
            code = subprocess.run(command, env=env, capture_output=True, timeout=10).returncode
            outcomes[(probe, reply.split()[0])] = code == 0
    assert outcomes == {
        ("startupProbe", "PONG"): True, ("livenessProbe", "PONG"): True, ("readinessProbe", "PONG"): True,
        ("startupProbe", "NOAUTH"): False, ("livenessProbe", "NOAUTH"): False, ("readinessProbe", "NOAUTH"): False,
        ("startupProbe", "LOADING"): False, ("livenessProbe", "LOADING"): True, ("readinessProbe", "LOADING"): False,
    }  # fmt: skip


def test_redis_exporter_sidecar_is_pinned_and_authenticated(renders):
    pod = one(renders("everything-on-values"), "StatefulSet")["spec"]["template"]["spec"]
    exporter = next(c for c in pod["containers"] if c["name"] == "exporter")
    assert re.fullmatch(r"quay\.io/oliver006/redis_exporter:v[\d.]+@sha256:[0-9a-f]{64}", exporter["image"])
    assert _env(exporter)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "streamgroup-redis"
    assert exporter["ports"] == [{"name": "redis-metrics", "containerPort": 9121, "protocol": "TCP"}]


def test_external_redis_password_is_a_mounted_secret_file(renders):
    objects = renders("external-redis-values")
    assert find(objects, "StatefulSet") == []
    config = one(objects, "ConfigMap", "rel-streamgroup")["data"]
    assert config["STREAMGROUP_REDIS_URL"] == "rediss://redis.example.internal:6380/2"
    for name, pod in _pod_specs(objects):
        (container,) = pod["containers"]
        env = _env(container)
        password_file = env["STREAMGROUP_REDIS_PASSWORD_FILE"]["value"]
        mount = next(m for m in container["volumeMounts"] if password_file.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "redis-credentials", name
        item = volume["secret"]["items"][0]
        assert item["key"] == "redis-password"
        assert password_file == f"{mount['mountPath']}/{item['path']}"
        assert env["STREAMGROUP_REDIS_CA_FILE"]["value"].endswith("/ca.crt")
        assert env["STREAMGROUP_REDIS_CERT_FILE"]["value"].endswith("/tls.crt")
        assert env["STREAMGROUP_REDIS_KEY_FILE"]["value"].endswith("/tls.key")
        # The password never travels as a plain environment value.
        assert all("secretKeyRef" not in str(e) for e in container["env"])


def test_bundled_redis_with_password_requires_it(renders):
    redis = one(renders("everything-on-values"), "StatefulSet")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][-2:] == ["--requirepass", "$(REDISCLI_AUTH)"]
    assert _env(container)["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == {
        "name": "streamgroup-redis",
        "key": "password",
    }


def test_helm_test_hook_checks_redis_with_streamgroup_status(rendered_defaults):
    pod = one(rendered_defaults, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "command" not in pod["spec"]["containers"][0]
    assert pod["spec"]["containers"][0]["args"] == ["streamgroup", "status"]
    assert pod["spec"]["restartPolicy"] == "Never"


def test_config_numbers_render_as_plain_integers():
    config = one(render({"config": {"maxMessages": 10_000_000}}), "ConfigMap", "rel-streamgroup")["data"]
    assert config["STREAMGROUP_MAX_MESSAGES"] == "10000000"


def test_pod_disruption_budgets_select_their_component(renders):
    budgets = find(renders("everything-on-values"), "PodDisruptionBudget")
    assert sorted(b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for b in budgets) == sorted(
        COMPONENTS
    )


def test_network_policy_lets_only_the_release_reach_redis(renders):
    policy = one(renders("everything-on-values"), "NetworkPolicy", component_name("redis"))
    peers = policy["spec"]["ingress"][0]["from"]
    assert peers[0] == {
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "streamgroup", "app.kubernetes.io/instance": "rel"}}
    }
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "redis", "protocol": "TCP"}]


def test_dashboard_configmap_carries_the_repository_json_with_a_uid_per_release(renders):
    config_map = one(renders("everything-on-values"), "ConfigMap", "rel-streamgroup-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "streamgroup.json").read_text())
    rendered = json.loads(config_map["data"]["streamgroup.json"])
    assert rendered["title"] == "streamgroup streamgroup/rel-streamgroup"
    assert {**rendered, "uid": shipped["uid"], "title": shipped["title"]} == shipped
    with helm.Chart.load(CHART) as chart:
        other = chart.render({"grafanaDashboard": {"enabled": True}}, name="rel2", namespace="streamgroup")
    other_uid = json.loads(
        yaml.safe_load(other["streamgroup/templates/grafana-dashboard.yaml"])["data"]["streamgroup.json"]
    )["uid"]
    assert len({rendered["uid"], other_uid, shipped["uid"]}) == 3
    assert len(rendered["uid"]) <= 40  # Grafana's limit


def test_values_yaml_parses_to_the_chart_defaults():
    with helm.Chart.load(CHART) as chart:
        assert chart.values == yaml.safe_load((CHART / "values.yaml").read_text())


def test_pods_carry_the_recommended_labels_common_labels_and_the_image_version():
    objects = render({"commonLabels": {"team": "data"}, "image": {"tag": "1.4.2"}, "podLabels": {"tier": "queue"}})
    pods = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    assert len(pods) == 3  # consumer, reclaimer, redis
    for obj in pods:
        labels = obj["spec"]["template"]["metadata"]["labels"]
        for key in ("name", "instance", "component", "part-of", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, (obj["metadata"]["name"], key)
        assert labels["app.kubernetes.io/version"] == "1.4.2"
        assert labels["helm.sh/chart"] == "streamgroup-0.3.0"
        assert labels["team"] == "data" and labels["tier"] == "queue"
        assert obj["metadata"]["labels"]["app.kubernetes.io/version"] == "1.4.2"
    # Without a tag the version is the chart's appVersion.
    deployment = one(render(), "Deployment", component_name("consumer"))
    assert deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == "0.1.0"


def test_pod_disruption_budgets_let_unhealthy_pods_go(renders):
    budgets = find(renders("everything-on-values"), "PodDisruptionBudget")
    assert budgets and all(b["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow" for b in budgets)


def test_components_take_sidecars_init_containers_volumes_and_scheduling_settings():
    extra = {
        "priorityClassName": "high",
        "strategy": {"type": "Recreate"},
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "failureThreshold": 30},
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "1"]}}},
        "extraVolumes": [{"name": "certs", "secret": {"secretName": "handler-certs"}}],
        "extraVolumeMounts": [{"name": "certs", "mountPath": "/etc/handler-certs", "readOnly": True}],
        "sidecars": [{"name": "proxy", "image": "envoyproxy/envoy:v1.31.0"}],
        "initContainers": [{"name": "wait", "image": "busybox:1.36", "command": ["true"]}],
    }
    deployment = one(render({"reclaimer": extra}), "Deployment", component_name("reclaimer"))
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["priorityClassName"] == "high"
    assert [c["name"] for c in pod["containers"]] == ["reclaimer", "proxy"]
    assert [c["name"] for c in pod["initContainers"]] == ["wait"]
    service = pod["containers"][0]
    assert service["startupProbe"]["failureThreshold"] == 30
    assert service["lifecycle"] == extra["lifecycle"]
    assert {"name": "certs", "mountPath": "/etc/handler-certs", "readOnly": True} in service["volumeMounts"]
    assert {"name": "certs", "secret": {"secretName": "handler-certs"}} in pod["volumes"]
    with pytest.raises(helm.HelmValuesError, match="command"):
        render({"consumer": {"command": ["streamgroup-consumer"]}})


def test_notes_point_to_no_repository_path():
    notes = render_templates({"producer": {"enabled": True}})["streamgroup/templates/NOTES.txt"]
    assert "docs/" not in notes.replace("/docs/runbook.md", "")
    assert "https://" in notes
    assert "load-generating producer is on" in notes


def test_redis_exporter_is_scraped_and_admitted(renders):
    objects = renders("everything-on-values")
    monitor = one(objects, "PodMonitor")
    assert "redis" in monitor["spec"]["selector"]["matchExpressions"][0]["values"]
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics", "redis-metrics"]
    policy = one(objects, "NetworkPolicy", component_name("redis"))
    rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "redis-metrics")
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert (
        "redis"
        not in one(render({"metrics": {"podMonitor": {"enabled": True}}}), "PodMonitor")["spec"]["selector"][
            "matchExpressions"
        ][0]["values"]
    )
