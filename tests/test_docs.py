"""The README documents every variable the services read and every metric they export."""

from __future__ import annotations

import re
from pathlib import Path

import prometheus_client

from streamgroup.metrics import Metrics
from streamgroup.settings import ENV_PREFIX, Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_variable_is_in_the_readme() -> None:
    missing = [
        ENV_PREFIX + name.upper() for name in Settings.model_fields if f"`{ENV_PREFIX}{name.upper()}`" not in README
    ]
    assert missing == []


def test_every_metric_is_in_the_readme() -> None:
    metrics = Metrics("s", "g", group_level=True)
    metrics.set_consumers([("0", "c", 1, 1.0)])
    text = prometheus_client.generate_latest(metrics.registry).decode()
    families = {re.sub(r"_(bucket|count|sum|created)$", "", line.split("{")[0].split(" ")[0])
                for line in text.splitlines() if line and not line.startswith("#")}  # fmt: skip
    assert len(families) > 15
    missing = sorted(name for name in families if f"`{name}`" not in README and f"`{name}_total`" not in README)
    assert missing == []
