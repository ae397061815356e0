"""End to end: a real Prometheus (Debian's package) scrapes the real services on loopback and
evaluates the chart's rendered alert rules. Stopping the consumers makes the lag and no-consumer alerts fire;
starting them again resolves them. Stopping Redis then pages: the Redis-down and reclaimer-down alerts fire."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import NAMESPACE, RELEASE, alert_rule_groups, require_tool
from streamgroup.devserver import DevServer, free_port
from support.processes import Services, wait_for

JOB = f"{NAMESPACE}/{RELEASE}-streamgroup"  # the job label the chart's PodMonitor gives its targets
# Short thresholds so the test runs in seconds; the expressions are the chart's.
RULE_VALUES = {
    "prometheusRule": {
        "rules": {
            "lagGrowing": {"threshold": 30, "window": "15s", "for": "2s"},
            "noActiveConsumer": {"for": "2s"},
            "redisDown": {"for": "3s"},
            "reclaimerDown": {"for": "3s"},
            "shardOrphaned": {"window": "15s", "for": "2s"},
        }
    }
}


class Prometheus:
    def __init__(self, directory: Path, targets: dict[str, list[int]]) -> None:
        self.binary = require_tool("prometheus")
        self.directory = directory
        self.port = free_port()
        (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": alert_rule_groups(RULE_VALUES)}))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [{
                "job_name": JOB,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{port}" for port in ports],
                     "labels": {"namespace": NAMESPACE, "component": component}}
                    for component, ports in targets.items()
                ],
            }],
        }  # fmt: skip
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = directory / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Prometheus:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [self.binary, f"--config.file={self.directory / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.directory / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(self._ready, timeout=30, what="prometheus ready")
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}", timeout=5) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self) -> dict[str, str]:
        """Active alerts by name: 'pending' or 'firing'."""
        return {a["labels"]["alertname"]: a["state"] for a in self.api("alerts")["alerts"]}

    def value(self, query: str) -> float | None:
        result = self.api(f"query?query={urllib.request.quote(query)}")["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(20)


@pytest.fixture
def valkey() -> Iterator[DevServer]:
    server = DevServer("valkey").start()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.timeout(240)
def test_stopping_consumers_fires_the_lag_alerts_and_restarting_resolves_them(valkey, tmp_path):
    services = Services(valkey.url, tmp_path)
    prometheus = None
    try:
        fast = {"RECLAIM_INTERVAL_MS": 300, "ACTIVE_CONSUMER_IDLE_MS": 2000}
        reclaimer = services.start("reclaimer", metrics=True, **fast)
        producer = services.start("producer", metrics=True, PRODUCER_INTERVAL_MS=20)
        consumers = [services.start("consumer", name=f"consumer-{i}", metrics=True) for i in (1, 2)]
        prometheus = Prometheus(tmp_path, {
            "reclaimer": [reclaimer.metrics_port], "producer": [producer.metrics_port],
            "consumer": [c.metrics_port for c in consumers],
        }).start()  # fmt: skip

        # Healthy: every target up, messages flow, no alert of ours is active.
        wait_for(
            lambda: prometheus.value(f'sum(up{{job="{JOB}"}})') == 4, timeout=30, interval=0.5, what="4 targets up"
        )
        wait_for(lambda: (prometheus.value('sum(streamgroup_messages_processed_total{outcome="acked"})') or 0) > 20,
                 timeout=30, interval=0.5, what="messages processed")  # fmt: skip
        time.sleep(5)  # several evaluations with consumers keeping up
        assert prometheus.alerts() == {}

        # Consumers stop cleanly; the producer keeps writing, so the lag grows.
        for consumer in consumers:
            assert consumer.stop() == 0

        def lag_and_no_consumer_firing() -> dict | None:
            alerts = prometheus.alerts()
            wanted = ("StreamgroupLagGrowing", "StreamgroupNoActiveConsumer")
            return alerts if all(alerts.get(name) == "firing" for name in wanted) else None

        fired = wait_for(lag_and_no_consumer_firing, timeout=60, interval=0.5, what="lag and no-consumer alerts firing")
        assert set(fired) <= {"StreamgroupLagGrowing", "StreamgroupNoActiveConsumer", "StreamgroupPendingHigh"}
        lag = prometheus.value(f'streamgroup_group_lag{{job="{JOB}", component="reclaimer"}}')
        assert lag is not None and lag > 30

        # Consumers back: the backlog drains and the alert resolves.
        consumers = [services.start("consumer", name=f"consumer-{i}", metrics=True) for i in (3, 4)]
        active = f'streamgroup_group_consumers_active{{job="{JOB}", component="reclaimer"}}'
        wait_for(lambda: (prometheus.value(active) or 0) >= 1, timeout=30, interval=0.5, what="consumers active again")
        wait_for(lambda: not prometheus.alerts(), timeout=60, interval=0.5, what="alerts resolved")
        assert (prometheus.value(f'streamgroup_group_lag{{job="{JOB}", component="reclaimer"}}') or 0) < 30

        # Redis goes away: every process reports redis_connected 0 and keeps serving /metrics.
        valkey.stop()

        def redis_down_firing() -> dict | None:
            alerts = prometheus.alerts()
            wanted = ("StreamgroupRedisDown", "StreamgroupReclaimerDown")
            return alerts if all(alerts.get(name) == "firing" for name in wanted) else None

        wait_for(redis_down_firing, timeout=90, interval=0.5, what="Redis-down alerts firing")
        # The scraped ones: reclaimer and producer (the restarted consumers are not Prometheus targets).
        disconnected = prometheus.value(f'count(streamgroup_redis_connected{{job="{JOB}"}} == 0)')
        assert disconnected == 2
        firing = {a["labels"]["alertname"]: a for a in prometheus.api("alerts")["alerts"]}
        assert firing["StreamgroupRedisDown"]["labels"]["namespace"] == NAMESPACE
        assert firing["StreamgroupReclaimerDown"]["labels"]["namespace"] == NAMESPACE
    except BaseException:
        print(services.logs())
        if prometheus is not None:
            print(prometheus.log.read_text()[-3000:])
        raise
    finally:
        if prometheus is not None:
            prometheus.stop()
        services.stop_all()


@pytest.mark.timeout(240)
def test_a_shard_no_consumer_reads_fires_the_orphaned_shard_alert(valkey, tmp_path):
    """Three shards; the consumers run with two (an update of STREAMGROUP_SHARDS that reached the
    producer and the reclaimer but not them): shard 2 fills while shards 0 and 1 are read. The
    reclaimer's per-shard gauges make StreamgroupShardOrphaned fire for shard "2" alone, and the
    rules' sums count all three shards. A consumer that reads all three shards resolves it."""
    services = Services(valkey.url, tmp_path)
    prometheus = None
    try:
        fast = {"RECLAIM_INTERVAL_MS": 300, "ACTIVE_CONSUMER_IDLE_MS": 2000}
        reclaimer = services.start("reclaimer", metrics=True, SHARDS=3, **fast)
        producer = services.start("producer", metrics=True, SHARDS=3, PRODUCER_INTERVAL_MS=20)
        behind = services.start("consumer", name="consumer-two-shards", metrics=True, SHARDS=2)
        prometheus = Prometheus(tmp_path, {
            "reclaimer": [reclaimer.metrics_port], "producer": [producer.metrics_port],
            "consumer": [behind.metrics_port],
        }).start()  # fmt: skip
        lag = f'streamgroup_group_lag{{job="{JOB}", component="reclaimer", shard="2"}}'
        wait_for(lambda: (prometheus.value(lag) or 0) > 30, timeout=60, interval=0.5, what="shard 2 filling")

        def orphaned() -> list[dict] | None:
            alerts = [a for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"]
            found = [a for a in alerts if a["labels"]["alertname"] == "StreamgroupShardOrphaned"]
            return found or None

        (alert,) = wait_for(orphaned, timeout=60, interval=0.5, what="orphaned-shard alert firing")
        assert alert["labels"]["shard"] == "2"
        assert alert["labels"]["stream"] == "messageStream"
        assert "StreamgroupNoActiveConsumer" not in prometheus.alerts()
        # The totals the rules use add the shards up: shard 2's lag is part of them.
        per_shard = f'max by (stream, group, shard) (streamgroup_group_lag{{job="{JOB}", component="reclaimer"}})'
        total = prometheus.value(f"sum by (stream, group) ({per_shard})")
        assert total is not None and total >= prometheus.value(lag) > 30

        services.start("consumer", name="consumer-three-shards", SHARDS=3)
        wait_for(lambda: "StreamgroupShardOrphaned" not in prometheus.alerts(), timeout=90, interval=0.5,
                 what="orphaned-shard alert resolved")  # fmt: skip
        wait_for(lambda: (prometheus.value(lag) or 0) < 30, timeout=60, interval=0.5, what="shard 2 drained")
    except BaseException:
        print(services.logs())
        if prometheus is not None:
            print(prometheus.log.read_text()[-3000:])
        raise
    finally:
        if prometheus is not None:
            prometheus.stop()
        services.stop_all()
