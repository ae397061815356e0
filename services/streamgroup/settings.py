"""The one typed settings object, read from STREAMGROUP_* environment variables."""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import Field, FilePath, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamgroup.errors import ConfigError

ENV_PREFIX = "STREAMGROUP_"
REDIS_URL_SCHEMES = ("redis", "rediss", "unix")

PositiveMs = Annotated[int, Field(gt=0, le=86_400_000)]


def default_consumer_name() -> str:
    """Kubernetes gives each pod its name in HOSTNAME; POD_NAME is the downward-API convention."""
    return os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    # Connection. The password may sit in the URL or, better, in a mounted secret file.
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    redis_password_file: FilePath | None = None
    redis_ca_file: FilePath | None = None
    redis_cert_file: FilePath | None = None
    redis_key_file: FilePath | None = None
    redis_timeout_ms: PositiveMs = 10_000

    # What to work on.
    stream: str = Field("messageStream", min_length=1)
    group: str = Field("messageGroup", min_length=1)
    consumer_name: str = Field(default_factory=default_consumer_name, min_length=1)
    dead_letter_stream: str | None = Field(None, min_length=1)
    # Where a group that never existed starts; a group that vanishes under running services is
    # recreated where they last read instead.
    group_start_id: Literal["0", "$"] = "0"

    # Observability.
    metrics_port: int = Field(9180, ge=0, le=65535)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Consumer.
    handler: str = Field("streamgroup.handlers:log_message", pattern=r"^[\w.]+:[\w.]+$")
    batch_size: int = Field(100, gt=0, le=10_000)
    block_ms: PositiveMs = 2000
    concurrency: int = Field(1, gt=0, le=1024)
    read_ahead: bool = True
    shutdown_grace_seconds: float = Field(20.0, gt=0, le=3600)
    max_deliveries: int = Field(5, ge=1, le=1_000_000)
    # How long a consumer name stays taken after its process stopped renewing it (a twin waits that long).
    consumer_name_lease_ms: int = Field(10_000, ge=1000, le=3_600_000)

    # Producer.
    producers: int = Field(1, gt=0, le=100_000)
    producer_interval_ms: int = Field(1000, ge=0, le=86_400_000)
    max_messages: int = Field(0, ge=0)

    # Reclaimer.
    claim_min_idle_ms: PositiveMs = 60_000
    reclaim_interval_ms: PositiveMs = 5000
    consumer_delete_idle_ms: int = Field(600_000, ge=0, le=30 * 86_400_000)
    active_consumer_idle_ms: PositiveMs = 60_000
    retention_enabled: bool = False
    retention_min_entries: int = Field(0, ge=0)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, value: SecretStr) -> SecretStr:
        scheme = urlsplit(value.get_secret_value()).scheme
        if scheme not in REDIS_URL_SCHEMES:
            raise ValueError(f"URL scheme must be one of {', '.join(REDIS_URL_SCHEMES)}, not {scheme!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if (self.redis_cert_file is None) != (self.redis_key_file is None):
            raise ValueError("STREAMGROUP_REDIS_CERT_FILE and STREAMGROUP_REDIS_KEY_FILE go together")
        if self.dead_letter_stream == self.stream:
            raise ValueError("STREAMGROUP_DEAD_LETTER_STREAM must differ from STREAMGROUP_STREAM")
        return self

    @property
    def dead_letter_key(self) -> str:
        return self.dead_letter_stream or f"{self.stream}:dead"

    @property
    def redis_url_redacted(self) -> str:
        """The URL for logs: the password (in the user part or a `?password=` query argument) as ***."""
        parts = urlsplit(self.redis_url.get_secret_value())
        userinfo, at, hostport = parts.netloc.rpartition("@")
        netloc = parts.netloc
        if at:
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}{':***' if colon else ''}@{hostport}"
        query = urlencode(
            [
                (name, "***" if "password" in name.lower() else value)
                for name, value in parse_qsl(parts.query, keep_blank_values=True)
            ],
            safe="*",
        )
        return parts._replace(netloc=netloc, query=query).geturl()


def _unknown_variables(environ: Mapping[str, str]) -> list[str]:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    problems = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{name}: unknown variable{hint}")
    return problems


def _describe(error: dict) -> str:
    location = error["loc"]
    if location:
        name = ENV_PREFIX + str(location[0]).upper()
    else:  # a cross-field rule: its message names the variables itself
        return str(error["msg"]).removeprefix("Value error, ")
    message = str(error["msg"]).removeprefix("Value error, ")
    given = error.get("input")
    if isinstance(given, str) and "url" not in name.lower():
        message += f" (got {given!r})"
    return f"{name}: {message}"


def load_settings() -> Settings:
    """Build the settings from the environment, or raise ConfigError with one line per problem."""
    problems = _unknown_variables(os.environ)
    settings = None
    try:
        settings = Settings()
    except ValidationError as exc:
        problems += [_describe(error) for error in exc.errors(include_url=False)]
    if problems or settings is None:
        raise ConfigError(problems)
    return settings


def read_password_file(path: Path) -> str:
    return path.read_text(encoding="utf-8").rstrip("\r\n")
