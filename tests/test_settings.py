"""Configuration: every problem names its variable and exits 2, without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from streamgroup.errors import EXIT_CONFIG, ConfigError
from streamgroup.settings import load_settings
from support.processes import MODULES, service_env


def _run(kind: str, **settings: object) -> subprocess.CompletedProcess:
    env = service_env("redis://127.0.0.1:1/0", **settings)
    return subprocess.run([sys.executable, "-m", MODULES[kind]], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("kind", sorted(MODULES))
@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "STREAMGROUP_BATCH_SIZE",
            "lots",
            "STREAMGROUP_BATCH_SIZE: Input should be a valid integer",
        ),
        ("STREAMGROUP_BATCH_SIZE", "0", "STREAMGROUP_BATCH_SIZE: Input should be greater than 0"),
        (
            "STREAMGROUP_METRICS_PORT",
            "70000",
            "STREAMGROUP_METRICS_PORT: Input should be less than or equal to 65535",
        ),
        (
            "STREAMGROUP_LOG_FORMAT",
            "xml",
            "STREAMGROUP_LOG_FORMAT: Input should be 'json' or 'console'",
        ),
        (
            "STREAMGROUP_REDIS_URL",
            "http://localhost:6379",
            "STREAMGROUP_REDIS_URL: URL scheme must be one of",
        ),
        (
            "STREAMGROUP_BATCH_SIZ",
            "10",
            "STREAMGROUP_BATCH_SIZ: unknown variable (did you mean STREAMGROUP_BATCH_SIZE?)",
        ),
        (
            "STREAMGROUP_REDIS_PASSWORD_FILE",
            "/nonexistent",
            "STREAMGROUP_REDIS_PASSWORD_FILE: Path does not point to a file",
        ),
        ("STREAMGROUP_SHARDS", "0", "STREAMGROUP_SHARDS: Input should be greater than or equal to 1"),
        ("STREAMGROUP_SHARDS", "2000", "STREAMGROUP_SHARDS: Input should be less than or equal to 1024"),
        (
            "STREAMGROUP_PREVIOUS_SHARDS",
            "-1",
            "STREAMGROUP_PREVIOUS_SHARDS: Input should be greater than or equal to 0",
        ),
        ("STREAMGROUP_PARTITION_FIELD", "", "STREAMGROUP_PARTITION_FIELD: String should have at least 1 character"),
    ],
)
def test_bad_variable_exits_2_naming_it(kind: str, variable: str, value: str, expected: str) -> None:
    result = _run(kind, **{variable: value})
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_every_problem_is_reported_on_its_own_line() -> None:
    result = _run("consumer", BATCH_SIZE="-1", CONCURRENCY="many", STREAMGROUP_GROUPE="x")
    assert result.returncode == EXIT_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    assert {line.split(": ")[2] for line in lines} == {
        "STREAMGROUP_BATCH_SIZE", "STREAMGROUP_CONCURRENCY", "STREAMGROUP_GROUPE",
    }  # fmt: skip


def test_handler_that_cannot_be_imported_is_a_config_error() -> None:
    result = _run("consumer", HANDLER="no_such_module:handle")
    assert result.returncode == EXIT_CONFIG
    assert "STREAMGROUP_HANDLER: cannot load 'no_such_module:handle'" in result.stdout + result.stderr


def test_password_in_url_never_reaches_the_error_output() -> None:
    result = _run("consumer", REDIS_URL="ftp://user:hunter2@localhost/0")
    assert result.returncode == EXIT_CONFIG
    assert "hunter2" not in result.stderr


def test_variable_for_another_service_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGROUP_PRODUCERS", "1000")
    monkeypatch.setenv("STREAMGROUP_CLAIM_MIN_IDLE_MS", "30000")
    settings = load_settings()
    assert settings.producers == 1000
    assert settings.claim_min_idle_ms == 30000


def test_consumer_name_defaults_to_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMGROUP_CONSUMER_NAME", raising=False)
    monkeypatch.setenv("HOSTNAME", "consumer-7d9f-abcde")
    monkeypatch.delenv("POD_NAME", raising=False)
    assert load_settings().consumer_name == "consumer-7d9f-abcde"
    monkeypatch.setenv("POD_NAME", "from-downward-api")
    assert load_settings().consumer_name == "from-downward-api"


def test_cross_field_rule(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    cert = tmp_path / "client.crt"
    cert.write_text("x")
    monkeypatch.setenv("STREAMGROUP_REDIS_CERT_FILE", str(cert))
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.problems == ["STREAMGROUP_REDIS_CERT_FILE and STREAMGROUP_REDIS_KEY_FILE go together"]


def test_redacted_url_hides_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGROUP_REDIS_URL", "rediss://app:s3cret@redis.example:6380/2")
    settings = load_settings()
    assert settings.redis_url_redacted == "rediss://app:***@redis.example:6380/2"
    assert "s3cret" not in repr(settings)
