"""The chart for a Redis Cluster, Redis Sentinel and sharded streams (issue 10): values, schema,
the services' environment, and KEDA scaling on the sum over the shards."""

from __future__ import annotations

import math
import os
import re

import helm_python as helm
import pytest

from conftest import CHART, alert_rule_groups, ci_values, one, render
from streamgroup import keys, topology
from streamgroup.errors import ConfigError
from streamgroup.settings import load_settings

CLUSTER = {"mode": "cluster", "bundled": {"enabled": False}, "external": {"url": "redis://cluster.example:7000/0"}}
SENTINELS = ["s-0.sentinel.redis.svc:26379", "s-1.sentinel.redis.svc:26379", "[fd00::7]:26379"]
SENTINEL = {
    "mode": "sentinel",
    "sentinels": SENTINELS,
    "sentinelMaster": "mymaster",
    "bundled": {"enabled": False},
    "external": {"url": "rediss://redis.example/2"},
}
KEDA = {"consumer": {"autoscaling": {"keda": {"enabled": True}}}}


def _config(objects) -> dict[str, str]:
    return one(objects, "ConfigMap", "rel-streamgroup")["data"]


def _settings(monkeypatch, objects):
    """The settings a service builds from the rendered ConfigMap (its STREAMGROUP_* variables)."""
    for name in [n for n in os.environ if n.startswith("STREAMGROUP_")]:
        monkeypatch.delenv(name)
    for name, value in _config(objects).items():
        monkeypatch.setenv(name, value)
    return load_settings()


# --- the services' environment -------------------------------------------------------------------


def test_defaults_render_no_topology_variable():
    """Only what differs from the services' defaults is rendered, so an image older than these
    settings still starts with the default values."""
    config = _config(render())
    assert not {"STREAMGROUP_REDIS_MODE", "STREAMGROUP_REDIS_SENTINELS", "STREAMGROUP_REDIS_SENTINEL_MASTER"} & set(
        config
    )
    assert not {"STREAMGROUP_SHARDS", "STREAMGROUP_PREVIOUS_SHARDS", "STREAMGROUP_PARTITION_FIELD"} & set(config)


def test_sentinel_values_become_the_services_sentinel_settings(monkeypatch):
    objects = render({"redis": SENTINEL})
    env = _config(objects)
    assert env["STREAMGROUP_REDIS_MODE"] == "sentinel"
    assert env["STREAMGROUP_REDIS_SENTINELS"] == ",".join(SENTINELS)
    assert env["STREAMGROUP_REDIS_SENTINEL_MASTER"] == "mymaster"
    settings = _settings(monkeypatch, objects)
    assert settings.redis_mode == "sentinel"
    assert settings.sentinel_addresses == [
        ("s-0.sentinel.redis.svc", 26379),
        ("s-1.sentinel.redis.svc", 26379),
        ("fd00::7", 26379),
    ]
    assert settings.redis_db == 2


def test_cluster_and_shard_values_become_the_services_settings(monkeypatch):
    objects = render({"redis": CLUSTER, "config": {"stream": "orders", "shards": 6, "partitionField": "customer"}})
    env = _config(objects)
    assert env["STREAMGROUP_REDIS_MODE"] == "cluster"
    assert env["STREAMGROUP_SHARDS"] == "6"
    assert env["STREAMGROUP_PARTITION_FIELD"] == "customer"
    assert "STREAMGROUP_REDIS_SENTINELS" not in env
    settings = _settings(monkeypatch, objects)
    assert (settings.redis_mode, settings.shards, settings.partition_field) == ("cluster", 6, "customer")


@pytest.mark.parametrize(
    ("redis", "message"),
    [
        ({**SENTINEL, "sentinels": []}, "at '/redis/sentinels': minItems"),
        ({**SENTINEL, "sentinelMaster": ""}, "at '/redis/sentinelMaster': minLength"),
        ({"sentinels": SENTINELS, "bundled": {"enabled": False}, "external": {"url": "redis://r/0"}}, "sentinelMaster"),
        ({**SENTINEL, "mode": "standalone"}, "at '/redis/mode'"),
        ({**SENTINEL, "mode": "cluster"}, "at '/redis/mode'"),
        ({**SENTINEL, "sentinels": ["sentinel.example"]}, "at '/redis/sentinels/0'"),
        ({**SENTINEL, "sentinels": ["a:1,b:2"]}, "at '/redis/sentinels/0'"),
        ({"mode": "replicated"}, "at '/redis/mode'"),
    ],
)
def test_schema_refuses_incomplete_sentinel_values(redis, message):
    with pytest.raises(helm.HelmValuesError) as raised:
        render({"redis": redis})
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"shards": 0}, "at '/config/shards'"),
        ({"shards": "3"}, "at '/config/shards'"),
        ({"previousShards": -1}, "at '/config/previousShards'"),
        ({"partitionField": ""}, "at '/config/partitionField'"),
    ],
)
def test_schema_refuses_bad_shard_values(config, message):
    with pytest.raises(helm.HelmValuesError) as raised:
        render({"config": config})
    assert message in str(raised.value)


@pytest.mark.parametrize("mode", ["cluster", "sentinel"])
def test_the_bundled_single_redis_is_refused_for_cluster_and_sentinel(mode):
    redis = {"mode": mode, "sentinels": SENTINELS, "sentinelMaster": "m"} if mode == "sentinel" else {"mode": mode}
    with pytest.raises(helm.HelmRenderError, match=f"redis.mode={mode} needs an external Redis"):
        render({"redis": redis})


def test_sentinels_without_an_external_redis_are_refused():
    with pytest.raises(helm.HelmRenderError, match="the bundled Redis is not watched by sentinels"):
        render({"redis": {"sentinels": SENTINELS, "sentinelMaster": "m"}})


def test_a_cluster_has_only_database_0():
    with pytest.raises(helm.HelmRenderError, match="only database 0, the URL names database 3"):
        render({"redis": {**CLUSTER, "external": {"url": "redis://cluster.example:7000/3"}}, "config": {"shards": 3}})
    render({"redis": {**CLUSTER, "external": {"url": "redis://cluster.example:7000"}}, "config": {"shards": 3}})


# Stream and dead-letter names: (stream, deadLetterStream).
SLOT_CASES = [
    ("messageStream", None),
    ("{orders}", None),
    ("orders", "{orders}:dead"),
    ("{orders}", "orders-dead"),
    ("{orders}", "{orders}-dead"),
    ("{orders}.v2", "{orders}:poison"),
    ("{}orders", None),
    ("a{b}c", "x{b}y"),
    ("{a}{b}", "{b}:dead"),
    ("{a}{b}", "{a}:dead"),
    ("x{", "x{:dead"),
    ("{orders", None),
]


@pytest.mark.parametrize(("stream", "dead"), SLOT_CASES)
def test_on_a_cluster_the_chart_refuses_what_the_services_refuse(stream, dead):
    """One shard on a cluster: the stream and its dead-letter stream must share a hash slot. The
    chart refuses the release exactly when the services' start check (topology.check_slots) would
    exit 2, so `helm install` fails instead of pods crash-looping."""
    config = {"stream": stream, "deadLetterStream": dead}
    stream_keys = keys.StreamKeys(stream, "g", dead or f"{stream}:dead")
    try:
        topology.check_slots(stream_keys)
        services_accept = True
    except ConfigError:
        services_accept = False
    try:
        render({"redis": CLUSTER, "config": config})
        chart_accepts = True
    except helm.HelmRenderError as error:
        assert "different Redis Cluster hash slots" in str(error)
        chart_accepts = False
    assert chart_accepts == services_accept
    # Shards have hash tags of their own: any name goes.
    render({"redis": CLUSTER, "config": {**config, "shards": 4}})


def test_the_slot_refusal_says_how_to_fix_it():
    with pytest.raises(helm.HelmRenderError) as raised:
        render({"redis": CLUSTER, "config": {"stream": "orders"}})
    assert "config.stream={orders} (dead letters then go to {orders}:dead)" in str(raised.value)


# --- KEDA ---------------------------------------------------------------------------------------


def _keda(values, **keda):
    merged = {key: value for key, value in values.items() if key != "consumer"}
    merged["consumer"] = {"autoscaling": {"keda": {"enabled": True, **keda}}}
    return one(render(merged), "ScaledObject")


def test_one_shard_keeps_one_trigger_per_signal_and_no_formula():
    spec = _keda({"redis": CLUSTER, "config": {"stream": "{orders}"}}, pendingEntriesCount=300)["spec"]
    assert "advanced" not in spec
    assert [(t["name"], t["type"], t["metadata"]["stream"]) for t in spec["triggers"]] == [
        ("lag", "redis-cluster-streams", "{orders}"),
        ("pending", "redis-cluster-streams", "{orders}"),
    ]


@pytest.mark.parametrize("shards", [2, 6])
@pytest.mark.parametrize("dead", [None, "orders-poison"])
def test_each_shard_gets_a_trigger_on_the_key_the_services_use(shards, dead):
    config = {"stream": "orders", "shards": shards, "deadLetterStream": dead}
    spec = _keda({"redis": CLUSTER, "config": config}, pendingEntriesCount=500)["spec"]
    expected = [k.stream for k in keys.shard_keys("orders", "g", shards, dead)]
    lag = [t for t in spec["triggers"] if t["name"].startswith("lag")]
    pending = [t for t in spec["triggers"] if t["name"].startswith("pending")]
    assert [t["metadata"]["stream"] for t in lag] == expected
    assert [t["metadata"]["stream"] for t in pending] == expected
    assert [t["name"] for t in lag] == [f"lag{i}" for i in range(shards)]
    assert all(t["type"] == "redis-cluster-streams" for t in spec["triggers"])


def test_while_the_shard_count_changes_keda_also_counts_the_old_shards():
    """STREAMGROUP_PREVIOUS_SHARDS: consumers also drain the old layout; its backlog must keep
    them scaled. Order as the services' shard label: the new layout, then old keys not in it."""
    config = {"stream": "orders", "shards": 2, "previousShards": 3}
    spec = _keda({"redis": CLUSTER, "config": config})["spec"]
    new = [k.stream for k in keys.shard_keys("orders", "g", 2)]
    old = [k.stream for k in keys.shard_keys("orders", "g", 3) if k.stream not in new]
    assert (
        [t["metadata"]["stream"] for t in spec["triggers"]]
        == new + old
        == [
            "{orders:0}",
            "{orders:1}",
            "{orders:2}",
        ]
    )
    assert spec["advanced"]["scalingModifiers"]["formula"] == "lag0 + lag1 + lag2"
    back_to_one = _keda({"redis": CLUSTER, "config": {"stream": "{orders}", "shards": 1, "previousShards": 2}})
    assert [t["metadata"]["stream"] for t in back_to_one["spec"]["triggers"]] == [
        "{orders}",
        "{orders:0}",
        "{orders:1}",
    ]


def _evaluate(formula: str, values: dict[str, float]) -> float:
    """The formulas the chart writes, as KEDA's expr-lang computes them: sums, divisions and at
    most one `a > b ? a : b` (taken apart here, since Python has no `?:`)."""
    assert re.fullmatch(r"[\w\s()+/.>?:]+", formula), formula
    ternary = re.fullmatch(r"(.+) > (.+) \? (.+) : (.+)", formula)
    if ternary:
        left, right, then, otherwise = ternary.groups()
        return (
            _evaluate(then, values)
            if _evaluate(left, values) > _evaluate(right, values)
            else _evaluate(otherwise, values)
        )
    return float(eval(formula, {"__builtins__": {}}, dict(values)))  # noqa: S307 - the chart's own arithmetic


def _replicas(spec, values: dict[str, float]) -> int:
    """What the HPA makes of KEDA's composite metric (AverageValue: ceil(value / target)),
    before min/max replicas."""
    modifiers = spec["advanced"]["scalingModifiers"]
    assert modifiers["metricType"] == "AverageValue"
    return math.ceil(_evaluate(modifiers["formula"], values) / float(modifiers["target"]))


def test_keda_scales_on_the_sum_over_the_shards_not_the_largest_shard():
    spec = _keda({"redis": CLUSTER, "config": {"stream": "orders", "shards": 3}}, lagCount=100)["spec"]
    assert spec["advanced"]["scalingModifiers"]["target"] == "100"
    # 90 undelivered entries on each of 3 shards: 270 in all, 3 pods; the largest shard alone says 1.
    assert _replicas(spec, {"lag0": 90, "lag1": 90, "lag2": 90}) == 3
    assert _replicas(spec, {"lag0": 0, "lag1": 0, "lag2": 950}) == 10
    # An unknown lag is -1 (KEDA's scaler for nil): it barely moves the sum.
    assert _replicas(spec, {"lag0": -1, "lag1": 450, "lag2": 0}) == 5


def test_with_lag_and_pending_the_larger_of_the_two_sums_decides():
    spec = _keda(
        {"redis": CLUSTER, "config": {"stream": "orders", "shards": 2}}, lagCount=100, pendingEntriesCount=400
    )["spec"]
    assert spec["advanced"]["scalingModifiers"]["target"] == "1"
    lag_heavy = {"lag0": 250, "lag1": 250, "pending0": 100, "pending1": 100}
    pending_heavy = {"lag0": 0, "lag1": 10, "pending0": 1000, "pending1": 1000}
    assert _replicas(spec, lag_heavy) == 5  # 500 / 100
    assert _replicas(spec, pending_heavy) == 5  # 2000 / 400
    assert _replicas(spec, {"lag0": 0, "lag1": 0, "pending0": 0, "pending1": 0}) == 0
    # The names the formula uses are exactly the triggers' names (KEDA refuses others).
    names = {t["name"] for t in spec["triggers"]}
    assert set(re.findall(r"[a-z]+\d+", spec["advanced"]["scalingModifiers"]["formula"])) == names


def test_pending_alone_is_summed_too():
    spec = _keda({"redis": CLUSTER, "config": {"stream": "o", "shards": 2}}, lagCount=None, pendingEntriesCount=200)[
        "spec"
    ]
    assert [t["name"] for t in spec["triggers"]] == ["pending0", "pending1"]
    assert _replicas(spec, {"pending0": 150, "pending1": 150}) == 2


def test_scale_to_zero_stays_refused_with_shards():
    with pytest.raises(helm.HelmRenderError, match="minReplicaCount: 0 is refused"):
        _keda({"redis": CLUSTER, "config": {"stream": "o", "shards": 3}}, minReplicaCount=0)


def test_keda_talks_to_a_cluster_through_any_node():
    spec = _keda({"redis": CLUSTER, "config": {"stream": "{o}"}})["spec"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis-cluster-streams"
    assert trigger["metadata"]["addresses"] == "cluster.example:7000"
    assert "address" not in trigger["metadata"] and "databaseIndex" not in trigger["metadata"]
    listed = _keda({"redis": CLUSTER, "config": {"stream": "{o}"}}, address="n1.redis.svc:7000,n2.redis.svc:7000")
    assert listed["spec"]["triggers"][0]["metadata"]["addresses"] == "n1.redis.svc:7000,n2.redis.svc:7000"


def test_keda_asks_the_sentinels_for_the_primary():
    objects = render({**KEDA, "redis": {**SENTINEL, "auth": {"existingSecret": "pw", "username": "app"}}})
    (trigger,) = one(objects, "ScaledObject")["spec"]["triggers"]
    assert trigger["type"] == "redis-sentinel-streams"
    metadata = trigger["metadata"]
    assert metadata["addresses"] == ",".join(SENTINELS)
    assert metadata["sentinelMaster"] == "mymaster"
    assert (metadata["databaseIndex"], metadata["enableTLS"], metadata["username"]) == ("2", "true", "app")
    assert trigger["authenticationRef"] == {"name": "rel-streamgroup-consumer"}
    refs = one(objects, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert refs == [{"parameter": "password", "name": "pw", "key": "password"}]


def test_auto_mode_with_sentinels_is_sentinel_for_keda_too():
    redis = {key: value for key, value in SENTINEL.items() if key != "mode"}
    (trigger,) = one(render({**KEDA, "redis": redis}), "ScaledObject")["spec"]["triggers"]
    assert trigger["type"] == "redis-sentinel-streams"
    assert "STREAMGROUP_REDIS_MODE" not in _config(render({"redis": redis}))


def test_the_ci_values_cover_cluster_shards_and_sentinel():
    cluster = render(ci_values(CHART / "ci" / "cluster-shards-values.yaml"))
    spec = one(cluster, "ScaledObject")["spec"]
    assert {t["type"] for t in spec["triggers"]} == {"redis-cluster-streams"}
    assert len(spec["triggers"]) == 12  # lag and pending of 6 shards
    assert "formula" in spec["advanced"]["scalingModifiers"]
    sentinel = render(ci_values(CHART / "ci" / "sentinel-values.yaml"))
    assert {t["type"] for t in one(sentinel, "ScaledObject")["spec"]["triggers"]} == {"redis-sentinel-streams"}


def test_pending_alert_threshold_counts_every_shard_a_consumer_reads():
    """A busy consumer holds up to two batches per shard it reads."""
    rules = alert_rule_groups({"config": {"shards": 3}, "consumer": {"replicas": 2}})
    (pending,) = [r for group in rules for r in group["rules"] if r["alert"] == "StreamgroupPendingHigh"]
    assert pending["expr"].endswith("> 1200")  # 2 x 100 x 2 pods x 3 shards


def test_a_list_of_keda_addresses_needs_a_cluster_or_sentinels():
    external = {"bundled": {"enabled": False}, "external": {"url": "redis://r.example:6379/0"}}
    with pytest.raises(helm.HelmRenderError, match="a list of addresses is for a cluster's nodes or the sentinels"):
        _keda({"redis": external}, address="a.example:6379,b.example:6379")
    (trigger,) = _keda({"redis": external}, address="a.example:6379")["spec"]["triggers"]
    assert trigger["metadata"]["address"] == "a.example:6379"
