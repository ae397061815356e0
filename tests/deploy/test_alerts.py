"""The alert rules and the dashboard checked by Prometheus' own tools: the rules are taken from the
rendered PrometheusRule, `promtool check rules` parses them and `promtool test rules` shows each
alert firing when it should and staying quiet when it should."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import prometheus_client
import yaml

from conftest import CHART, ROOT, alert_rule_groups
from streamgroup.metrics import Metrics

UNIT_TESTS = Path(__file__).parent / "prometheus" / "alerts_test.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"
DASHBOARD = CHART / "dashboards" / "streamgroup.json"
ALERTS = {
    "StreamgroupRedisDown", "StreamgroupPendingHigh", "StreamgroupStuckPending", "StreamgroupLagGrowing",
    "StreamgroupNoActiveConsumer", "StreamgroupDeadLettersIncreasing", "StreamgroupLagUnknown",
    "StreamgroupReclaimerDown", "StreamgroupShardOrphaned",
}  # fmt: skip


def _rules(groups):
    return [rule for group in groups for rule in group["rules"]]


def _promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def _write_rules(directory: Path, groups) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def test_rendered_rules_pass_promtool_check(promtool, tmp_path):
    groups = alert_rule_groups()
    assert {rule["alert"] for rule in _rules(groups)} == ALERTS
    result = _promtool(promtool, "check", "rules", str(_write_rules(tmp_path, groups)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_alerts_fire_and_stay_quiet_as_the_unit_tests_say(promtool, tmp_path):
    _write_rules(tmp_path, alert_rule_groups())
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = _promtool(promtool, "test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_unit_tests_cover_every_alert_both_ways():
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired, quiet = set(), set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired == ALERTS
    assert quiet == ALERTS


def test_unit_tests_fail_when_a_threshold_is_wrong(promtool, tmp_path):
    """The unit tests really pin the rules: a lower pending threshold fires too early."""
    _write_rules(tmp_path, alert_rule_groups({"prometheusRule": {"rules": {"pendingHigh": {"threshold": 300}}}}))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = _promtool(promtool, "test", "rules", UNIT_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "StreamgroupPendingHigh" in result.stdout + result.stderr


def test_thresholds_and_durations_come_from_values():
    rules = {r["alert"]: r for r in _rules(alert_rule_groups({"prometheusRule": {"rules": {
        "pendingHigh": {"threshold": 42, "for": "3m", "severity": "critical"},
        "lagGrowing": {"window": "7m"},
        "reclaimerDown": {"enabled": False},
    }}}))}  # fmt: skip
    assert rules["StreamgroupPendingHigh"]["expr"].endswith("> 42")
    assert rules["StreamgroupPendingHigh"]["for"] == "3m"
    assert rules["StreamgroupPendingHigh"]["labels"]["severity"] == "critical"
    assert "[7m]" in rules["StreamgroupLagGrowing"]["expr"]
    assert "StreamgroupReclaimerDown" not in rules


def test_selector_picks_the_release_series():
    default = _rule("StreamgroupPendingHigh")["expr"]
    assert 'job="streamgroup/rel-streamgroup", namespace="streamgroup", component="reclaimer"' in default
    custom = _rule("StreamgroupPendingHigh", {"prometheusRule": {"selector": 'cluster="eu", app="orders"'}})["expr"]
    assert 'cluster="eu", app="orders", component="reclaimer"' in custom


def _rule(alert: str, values: dict | None = None) -> dict:
    return next(r for r in _rules(alert_rule_groups(values)) if r["alert"] == alert)


def test_pending_threshold_follows_the_most_consumers_and_their_batches():
    """Each busy consumer holds up to two batches: 10 KEDA pods x 2 x 100 = 2000 pending is normal."""
    keda = {"consumer": {"autoscaling": {"keda": {"enabled": True, "maxReplicaCount": 10}}}}
    assert _rule("StreamgroupPendingHigh", keda)["expr"].endswith("> 2000")
    hpa = {"consumer": {"autoscaling": {"hpa": {"enabled": True, "maxReplicas": 4}}}, "config": {"batchSize": 50}}
    assert _rule("StreamgroupPendingHigh", hpa)["expr"].endswith("> 400")
    assert _rule("StreamgroupPendingHigh", {"consumer": {"replicas": 3}})["expr"].endswith("> 600")


def test_stuck_pending_compares_idle_time_with_the_claim_window():
    rule = _rule("StreamgroupStuckPending", {"config": {"claimMinIdleMs": 300000, "reclaimIntervalMs": 10000}})
    assert "streamgroup_group_oldest_pending_idle_seconds" in rule["expr"]
    assert "oldest_pending_age" not in rule["expr"]
    assert rule["expr"].endswith("> 320")


def _anchors(markdown: str) -> set[str]:
    return {
        re.sub(r"[^\w-]", "", h.strip().lower().replace(" ", "-")) for h in re.findall(r"^#+ (.+)$", markdown, re.M)
    }


def test_every_alert_explains_itself_and_links_its_runbook_section():
    anchors = _anchors(RUNBOOK.read_text())
    for rule in _rules(alert_rule_groups()):
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        base, _, anchor = annotations["runbook_url"].partition("#")
        assert base.endswith("/docs/runbook.md")
        assert anchor == rule["alert"].lower()
        assert anchor in anchors, f"docs/runbook.md has no section for {rule['alert']}"


def test_runbook_says_what_it_means_how_to_look_and_what_to_do():
    sections = re.split(r"^## ", RUNBOOK.read_text(), flags=re.M)
    by_alert = {s.split("\n", 1)[0].strip(): s for s in sections[1:]}
    assert set(by_alert) >= ALERTS
    for alert in ALERTS:
        for part in ("What it means", "How to look", "What to do"):
            assert f"**{part}**" in by_alert[alert], f"{alert}: no '{part}'"


# --- the dashboard -------------------------------------------------------------------------------


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]  # rows have none
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(<selector>, label) is Grafana's; the selector inside is PromQL.
            match = re.fullmatch(r"label_values\((.+), *\w+\)", variable["query"]["query"])
            assert match, variable["query"]
            queries.append(match.group(1))
    # Grafana's interval macro is not PromQL; $namespace etc. sit inside label strings.
    return [q.replace("$__rate_interval", "5m") for q in queries]


def test_every_dashboard_query_parses(promtool, tmp_path):
    queries = _dashboard_queries()
    assert len(queries) > 20
    groups = [
        {"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)]}
    ]
    result = _promtool(promtool, "check", "rules", str(_write_rules(tmp_path, groups)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_promtool_rejects_a_broken_query(promtool, tmp_path):
    groups = [
        {"name": "dashboard", "rules": [{"record": "dashboard:bad", "expr": "sum by (stream (streamgroup_group_lag)"}]}
    ]
    result = _promtool(promtool, "check", "rules", str(_write_rules(tmp_path, groups)), cwd=tmp_path)
    assert result.returncode != 0


def test_dashboard_shows_what_operators_need():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Throughput", "Lag", "Pending", "Oldest pending age", "Pending per consumer",
            "Processing time", "End-to-end latency", "Dead letters"} <= titles  # fmt: skip
    exprs = " ".join(_dashboard_queries())
    for quantile in ("0.5", "0.95", "0.99"):
        for histogram in ("streamgroup_message_processing_seconds", "streamgroup_end_to_end_latency_seconds"):
            assert f"histogram_quantile({quantile}, sum by (stream, group, le) (rate({histogram}_bucket" in exprs


def test_dashboard_picks_a_release_and_never_adds_up_reclaimer_gauges():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"namespace", "job", "stream", "group"} <= variables
    for query in _dashboard_queries():
        if "label_values" in query or query.startswith("streamgroup_stream_length{component"):
            continue
        assert 'job=~"$job"' in query or "namespace" not in query, query
        gauge = 'component="reclaimer"' in query and "rate(" not in query and "increase(" not in query
        # Two reclaimers (a rollout, or replicas: 2) export the same gauge twice: max, not sum.
        # Shards are summed, over the reclaimers' max per shard.
        if gauge and query.startswith("sum"):
            summed = re.fullmatch(r"sum by \(([\w, ]+)\) \(max by \(([\w, ]+)\) \(streamgroup_\w+\{[^}]*\}\)\)", query)
            assert summed and summed.group(2) == f"{summed.group(1)}, shard", query
    dead = [q for q in _dashboard_queries() if "streamgroup_messages_dead_lettered_total" in q]
    assert dead and all("component=" not in q for q in dead), "consumers dead-letter too"
    idle = [q for q in _dashboard_queries() if "streamgroup_group_oldest_pending_idle_seconds" in q]
    assert idle


def test_dashboard_sums_shards_and_drills_into_one():
    """Lag and pending add up over the shards (the largest shard would hide the rest); a `shard`
    variable picks shards for the per-shard panels."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["shard"]["query"]["query"].endswith(", shard)")
    assert variables["shard"]["includeAll"] and variables["shard"]["allValue"] == ".*"
    panels = {p["title"]: p for p in dashboard["panels"]}
    for title in ("Lag", "Pending", "Lag (undelivered)", "Pending (unacknowledged)"):
        (expr, *_) = [t["expr"] for t in panels[title]["targets"]]
        assert expr.startswith("sum by (stream, group) (max by (stream, group, shard) ("), title
    per_shard = [t["expr"] for p in dashboard["panels"] if "per shard" in p["title"] for t in p["targets"]]
    assert len(per_shard) >= 5
    assert all('shard=~"$shard"' in q and ", shard)" in q for q in per_shard)
    assert any("streamgroup_group_consumers_active" in q for q in per_shard)


def _exported_names() -> set[str]:
    """Every series name the services' metrics registry exposes."""
    metrics = Metrics("s", "g", group_level=True)
    metrics.set_consumers([("0", "c", 1, 1.0)])
    text = prometheus_client.generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_rules_and_dashboard_use_only_metrics_the_services_export():
    exported = _exported_names()
    used = set()
    for text in [json.dumps(alert_rule_groups()), " ".join(_dashboard_queries())]:
        used |= set(re.findall(r"\bstreamgroup_[a-z_]+\b", text))
    assert used, "no metric names found"
    assert used - exported == set()
